"""Loopback stand-ins for the Hugging Face Hub: `LoopbackHubServer` serves just the endpoints
huggingface_hub 2.x calls for ``HfApi.create_repo`` + ``HfApi.upload_folder`` over the LFS transfer
path; `RefusingHubServer` refuses every download the way the Hub refuses a gated or missing repo.

Requests, in order:
  POST /api/repos/create                                  -> {"url": ...}
  POST /api/validate-yaml                                 README.md metadata check (before hashing)
  POST /api/models/{repo}/preupload/{revision}            which files go through LFS
  POST /{repo}.git/info/lfs/objects/batch                 where to PUT each LFS object
  PUT  /lfs-objects/{sha256}                              the LFS object itself (no Authorization, like S3)
  POST /api/models/{repo}/commit/{revision}               NDJSON: header, base64 "file"s, "lfsFile" pointers

Xet uploads need a CAS server this fake does not implement: tests set
``huggingface_hub.constants.HF_HUB_DISABLE_XET`` so the client picks the LFS path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

#: Extensions the Hub's default .gitattributes routes through LFS.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt")
#: A stalled client connection must not keep the server thread (and the test) alive.
SOCKET_TIMEOUT_S = 10

_PREUPLOAD = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<revision>[^/?]+)$")
_COMMIT = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<revision>[^/?]+)$")
_LFS_BATCH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_LFS_OBJECT = re.compile(r"^/lfs-objects/(?P<oid>[0-9a-f]{64})$")
_YAML_BLOCK = re.compile(r"^---\n(.*?)\n---\n", re.DOTALL)


@dataclass
class FakeHub:
    """Server state the tests inspect: repos, committed files, headers seen, requests it could not serve."""

    url: str = ""
    repos: dict[str, dict] = field(default_factory=dict)
    #: repo id -> path in repo -> committed bytes
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)
    authorization_headers: list[str | None] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    unhandled: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class HubHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = SOCKET_TIMEOUT_S

        def log_message(self, format, *args):  # noqa: A002  (signature of the base class)
            """Keep test output clean; the request list on FakeHub is the log."""

        def _body(self) -> bytes | None:
            """The request body; None (after a 411 reply) if it is not sized by Content-Length.

            huggingface_hub 2.x sends every body with a Content-Length; a chunked one would mean the
            client changed, and failing loudly beats decoding a protocol the real Hub path never uses.
            """
            if "Content-Length" not in self.headers:
                self.close_connection = True  # the unread body would corrupt the next request on this connection
                self._reply(411, {"error": "Content-Length required"})
                return None
            return self.rfile.read(int(self.headers["Content-Length"]))

        def _reply(self, status: int, payload: dict | None = None) -> None:
            body = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _record(self) -> str:
            path = self.path.split("?", 1)[0]
            with hub.lock:
                hub.requests.append((self.command, path))
                if not path.startswith("/lfs-objects/"):
                    hub.authorization_headers.append(self.headers.get("Authorization"))
            return path

        def do_POST(self):
            path = self._record()
            body = self._body()
            if body is None:
                return None
            if path == "/api/repos/create":
                return self._create_repo(json.loads(body))
            if path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body))
            if match := _PREUPLOAD.match(path):
                return self._preupload(match["repo"], json.loads(body))
            if match := _LFS_BATCH.match(path):
                return self._lfs_batch(match["repo"], json.loads(body))
            if match := _COMMIT.match(path):
                return self._commit(match["repo"], body)
            self._unhandled(path)

        def do_PUT(self):
            path = self._record()
            body = self._body()
            if body is None:
                return None
            if match := _LFS_OBJECT.match(path):
                if hashlib.sha256(body).hexdigest() != match["oid"]:
                    return self._reply(400, {"error": "sha256 of the body does not match the object id"})
                with hub.lock:
                    hub.lfs_objects[match["oid"]] = body
                return self._reply(200)
            self._unhandled(path)

        def do_GET(self):
            self._unhandled(self._record())

        def _unhandled(self, path: str) -> None:
            with hub.lock:
                hub.unhandled.append((self.command, path))
            self._reply(404, {"error": f"{self.command} {path} is not implemented by the fake Hub"})

        def _create_repo(self, payload: dict) -> None:
            repo_id = f"{payload['organization']}/{payload['name']}"
            url = f"{hub.url}/{repo_id}"
            with hub.lock:
                if repo_id in hub.repos:
                    return self._reply(409, {"error": "You already created this model repo", "url": url})
                hub.repos[repo_id] = payload
                hub.files[repo_id] = {}
            self._reply(200, {"url": url, "name": repo_id, "id": repo_id})

        def _validate_yaml(self, payload: dict) -> None:
            match = _YAML_BLOCK.match(payload["content"])
            metadata = yaml.safe_load(match[1]) if match else None
            if not isinstance(metadata, dict):
                return self._reply(400, {"errors": [{"message": "README.md has no YAML metadata block"}]})
            self._reply(200, {"errors": [], "warnings": []})

        def _preupload(self, repo_id: str, payload: dict) -> None:
            if repo_id not in hub.repos:
                return self._reply(404, {"error": "Repository not found"})
            files = [
                {
                    "path": entry["path"],
                    "uploadMode": "lfs" if entry["path"].endswith(LFS_SUFFIXES) else "regular",
                    "shouldIgnore": False,
                    "oid": None,
                }
                for entry in payload["files"]
            ]
            self._reply(200, {"files": files, "commitOid": "0" * 40})

        def _lfs_batch(self, repo_id: str, payload: dict) -> None:
            if repo_id not in hub.repos or payload.get("operation") != "upload":
                return self._reply(404, {"message": "Repository not found"})
            objects = [
                {
                    "oid": entry["oid"],
                    "size": entry["size"],
                    "authenticated": True,
                    "actions": {"upload": {"href": f"{hub.url}/lfs-objects/{entry['oid']}"}},
                }
                for entry in payload["objects"]
            ]
            self._reply(200, {"transfer": "basic", "objects": objects})

        def _commit(self, repo_id: str, body: bytes) -> None:
            if repo_id not in hub.repos:
                return self._reply(404, {"error": "Repository not found"})
            committed = {}
            for line in body.decode().splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "file":
                    committed[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    with hub.lock:
                        content = hub.lfs_objects.get(value["oid"])
                    if content is None or len(content) != value["size"]:
                        return self._reply(422, {"error": f"LFS object of {value['path']} was never uploaded"})
                    committed[value["path"]] = content
            commit_oid = hashlib.sha1(body).hexdigest()
            with hub.lock:
                hub.files[repo_id].update(committed)
            self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{commit_oid}", "commitOid": commit_oid, "pullRequestUrl": None})

    return HubHandler


class _ThreadedServer:
    """An HTTP server on 127.0.0.1 (a free port) in a daemon thread, from ``with`` to its end."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], name: str) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=SOCKET_TIMEOUT_S)


class LoopbackHubServer(_ThreadedServer):
    """``with LoopbackHubServer() as hub:`` serves a FakeHub on loopback in a thread."""

    def __init__(self) -> None:
        self.hub = FakeHub()
        super().__init__(_handler_for(self.hub), "fake-hub")
        self.hub.url = self.url

    def __enter__(self) -> FakeHub:
        self.start()
        return self.hub


class RefusingHubServer(_ThreadedServer):
    """``with RefusingHubServer(401, "GatedRepo") as url:`` a loopback Hub that answers every
    request with one refusal, as the real Hub does for a gated, missing or misnamed repository:
    the status plus the ``X-Error-Code`` header huggingface_hub turns into its typed error."""

    def __init__(self, status: int, error_code: str, message: str = "refused") -> None:
        class RefusingHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = SOCKET_TIMEOUT_S

            def log_message(self, format, *args):  # noqa: A002  (signature of the base class)
                pass

            def _refuse(self) -> None:
                body = json.dumps({"error": message}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", error_code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) if self.command != "HEAD" else 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = _refuse

        super().__init__(RefusingHandler, "refusing-hub")

    def __enter__(self) -> str:
        self.start()
        return self.url
