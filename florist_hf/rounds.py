"""A run's records: a round's line in metrics.jsonl (rebuilt from its sidecar) and its console
lines, what its clients that missed earlier rounds were sent, the digests of global adapters that
tell a stale round, and the run's summary (``run.json``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from florist_hf.adapters import SIDECAR
from florist_hf.aggregation import METHODS
from florist_hf.rundir import GLOBAL_ADAPTER, RUN_FORMAT, RunPaths, read_metrics
from florist_hf.server import rank_summary

#: (weights files with their size and mtime) -> digest: every round checks the digests of all
#: earlier rounds' global adapters, and each is hashed once per process, not once per round.
_DIGESTS: dict[tuple, str] = {}


def adapter_digest(adapter_dir: Path) -> str:
    """A hash of an adapter directory's weights (a FlexLoRA global's per-client truncations included)."""
    files = sorted(adapter_dir.rglob("*.safetensors"))
    key = tuple((str(path), stat.st_size, stat.st_mtime_ns) for path in files for stat in [path.stat()])
    if key not in _DIGESTS:
        _DIGESTS[key] = _hash_files(adapter_dir, files)
    return _DIGESTS[key]


def _hash_files(adapter_dir: Path, files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for weights in files:
        digest.update(str(weights.relative_to(adapter_dir)).encode())
        with open(weights, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def missed_rounds(paths: RunPaths, round_index: int) -> dict:
    """Per client of round ``round_index``: the earlier rounds whose global update it lacks, for
    merge-style methods with partial participation. A client holds round t's update once it
    trained in round t or in any later round (the round's own broadcast delivers it), so it lacks
    every round since its last participation (every round, if it never took part)."""
    sidecars = {t: json.loads((paths.global_dir(t) / SIDECAR).read_text()) for t in range(1, round_index + 1)
                if (paths.global_dir(t) / SIDECAR).exists()}
    clients = {t: {client_of_record(client) for client in sidecar["clients"]} for t, sidecar in sidecars.items()}
    earlier = [t for t in sorted(clients) if t < round_index]
    missed = {}
    for client in clients.get(round_index, ()):
        last = max((t for t in earlier if client in clients[t]), default=0)
        missed[client] = [t for t in earlier if t > last]
    return missed


#: (global adapters' digests) -> bytes of their compacted sum: the same catch-up is sent to
#: every client that missed the same rounds.
_CATCH_UP_BYTES: dict[tuple, int] = {}


def catch_up_form(missing: Sequence[int], state_rounds: Sequence[int], state_bytes: int | None, compacted_bytes) -> str:
    """What a client that lacks the updates of rounds ``missing`` (of the rounds ``state_rounds``
    the global state sums) is sent: "round", that one round's update as it is; "state", the whole
    state, when it holds nothing of it or where that is no larger than ``compacted_bytes()``; else
    "compacted", the missed rounds' sum compacted into one update. `catch_up_bytes` counts it and
    the Flower strategy sends it."""
    if len(missing) == 1:
        return "round"
    if list(missing) == list(state_rounds) or (state_bytes is not None and compacted_bytes() >= state_bytes):
        return "state"
    return "compacted"


def catch_up_bytes(paths: RunPaths, round_index: int) -> int:
    """Bytes of earlier global updates this round's clients receive before training (merge-style
    methods, partial participation): a client that missed one round gets that round's global
    adapter; one that missed several gets their sum compacted into one update (exact, fp32), or
    the whole global state where that is no larger (always, for a client that never took part).
    With every client in every round this is 0; the round's own broadcast is counted apart."""
    from florist_hf.adapters import read_adapter
    from florist_hf.global_state import fold, read_state_record, record_wire_bytes

    missed = {client: rounds for client, rounds in missed_rounds(paths, round_index).items() if rounds}
    if not missed:
        return 0
    done = [t for t in range(1, round_index) if (paths.global_dir(t) / SIDECAR).exists()]
    record = read_state_record(paths.global_state_dir(done[-1]))
    state_bytes = record_wire_bytes(record) if record is not None and record.get("rounds") == done else None

    def compacted_bytes(rounds: list[int]) -> int:
        key = tuple(adapter_digest(paths.global_dir(t)) for t in rounds)
        if key not in _CATCH_UP_BYTES:
            _CATCH_UP_BYTES[key] = fold(None, [read_adapter(paths.global_dir(t)) for t in rounds], rounds).wire_bytes
        return _CATCH_UP_BYTES[key]

    total = 0
    for rounds in missed.values():
        form = catch_up_form(rounds, done, state_bytes, lambda: compacted_bytes(rounds))
        if form == "round":
            sidecar = json.loads((paths.global_dir(rounds[0]) / SIDECAR).read_text())
            total += int(sidecar["communication"]["downlink_bytes_total"] / max(len(sidecar["clients"]), 1))
        else:  # the whole state (its record's size; or, without one, the same sum compacted)
            total += state_bytes if form == "state" and state_bytes is not None else compacted_bytes(rounds)
    return total


def round_record(paths: RunPaths, round_index: int, heldout: float | None, *, merges_into_base: bool = True) -> dict:
    """The round's line in metrics.jsonl, from its global adapter's sidecar (written atomically
    with the adapter, so a round stopped before its line was written gets the same line on resume)."""
    sidecar = json.loads((paths.global_dir(round_index) / SIDECAR).read_text())
    ranks = rank_summary(module["selected_rank"] for module in sidecar["modules"].values())
    comm = sidecar["communication"]
    record = {
        "kind": "round", "round": round_index, "clients": [client_of_record(client) for client in sidecar["clients"]],
        "total_selected_rank": ranks["total"], "rank_min": ranks["min"], "rank_median": ranks["median"],
        "rank_max": ranks["max"], "uplink_bytes_total": comm["uplink_bytes_total"],
        "downlink_bytes_total": comm["downlink_bytes_total"], "eff_x1e4": comm["eff_x1e4"],
        "server_seconds": sidecar.get("server_seconds"),
        # Earlier rounds' updates sent to clients that missed them (merge-style, partial participation).
        "catch_up_downlink_bytes": catch_up_bytes(paths, round_index) if merges_into_base else 0,
    }
    streamed = [module["streaming"] for module in sidecar["modules"].values() if module.get("streaming")]
    if streamed:  # what a streaming tolerance dropped, at the worst module
        record["streaming_discarded_energy_max"] = max(module["discarded_energy"] for module in streamed)
        record["streaming_error_bound_max"] = max(module["error_bound"] for module in streamed)
    if "plain" in comm:  # secure aggregation: what travelled, and what the plain round would have sent
        record["secure_aggregation"] = True
        record["plain_uplink_bytes_total"] = comm["plain"]["uplink_bytes_total"]
        record["plain_downlink_bytes_total"] = comm["plain"]["downlink_bytes_total"]
        secure = comm.get("secure", {})
        if "protocol_uplink_bytes" in secure:  # of which the masking protocol's keys and shares, up and down
            record["secure_protocol_bytes_total"] = sum(secure["protocol_uplink_bytes"]) + sum(secure["protocol_downlink_bytes"])
    bounding = sidecar.get("bounding")
    if bounding is not None:
        record["clients_clipped"] = sum(1 for client in sidecar["clients"] if client.get("clipped"))
        central = bounding.get("central_dp")
        if central is not None:
            record["central_epsilon"] = central.get("epsilon")
    if sidecar.get("outliers"):
        record["outliers"] = sidecar["outliers"]
    if heldout is not None:
        record["heldout_loss"] = heldout
    return record


def client_of_record(client: dict) -> int | str:
    """A client's id in a sidecar's client list (its index, or its name where that is not client_<k>)."""
    name = client.get("name") or Path(client["path"]).name
    return int(name.removeprefix("client_")) if name.removeprefix("client_").isdigit() else name


def describe_round(record: dict) -> str:
    return (
        f"  server: ranks {record['rank_min']}/{record['rank_median']:g}/{record['rank_max']} "
        f"(total {record['total_selected_rank']}), Eff {record['eff_x1e4']:.2f}, "
        f"up {record['uplink_bytes_total']:,} B, down {record['downlink_bytes_total']:,} B"
        + (f" (secure, {record['secure_protocol_bytes_total']:,} B of it keys and shares;"
           if "secure_protocol_bytes_total" in record else " (secure;" if record.get("secure_aggregation") else "")
        + (f" plain: up {record['plain_uplink_bytes_total']:,} B, down {record['plain_downlink_bytes_total']:,} B)"
           if record.get("secure_aggregation") else "")
        + (f", held-out loss {record['heldout_loss']:.4f}" if "heldout_loss" in record else "")
        + (f", streaming dropped ≤ {record['streaming_discarded_energy_max']:.1e} of the energy"
           if record.get("streaming_discarded_energy_max") else "")
        + (f", {record['clients_clipped']} clients clipped" if record.get("clients_clipped") else "")
        + (f", client-level ε {record['central_epsilon']:.3g}" if record.get("central_epsilon") is not None else "")
    )


def describe_outliers(sidecar: dict, sidecar_path: Path) -> list[str]:
    """One line per client of a round an operator should look at (`aggregation.bounding.outliers`:
    its update norm far above the round's median)."""
    from florist_hf.aggregation.bounding import median_norm

    clients = {client["name"]: client for client in sidecar["clients"]}
    median = median_norm([client["update_norm"] for client in clients.values() if client.get("update_norm") is not None])
    lines = []
    for name in sidecar.get("outliers", []):
        client = clients[name]
        cosine = client.get("cosine")
        lines.append(
            f"  [yellow]{name}: update norm {client['update_norm']:.3g}"
            + (f" ({client['update_norm'] / median:.3g}× the round's median)" if median > 0 else "")
            + (f", cosine {cosine:.3f} to the global update" if cosine is not None else "")
            + (f", clipped to {sidecar['bounding']['clip_update_norm']:g}" if client.get("clipped") else "")
            + f"; see {sidecar_path}[/]")
    return lines


def run_summary(recipe, paths: RunPaths, rounds_done: Sequence[int], client_sizes: Sequence[int], base_path: str) -> dict:
    """``run.json`` without its evaluation and published parts: what ran, what it cost, where the
    result is, from the recipe and the rounds' lines in metrics.jsonl."""
    from florist_hf.loading import gguf_provenance
    from florist_hf.privacy import privacy_summary
    from florist_hf.recipe import sample_clients

    federation = recipe.federation
    records = read_metrics(paths.metrics, strict=False)
    rounds = [r for r in records if r["kind"] == "round" and r["round"] in rounds_done]
    last = paths.global_dir(rounds_done[-1]) / SIDECAR if rounds_done else None
    data_source = recipe.data.source
    return {
        "format": RUN_FORMAT,
        "version": 1,
        "name": recipe.name,
        "method": federation.method,
        "threshold": federation.threshold if "threshold" in METHODS[federation.method].settings else None,
        "rounds": federation.rounds,
        "rounds_completed": len(rounds),
        "num_clients": federation.num_clients,
        "clients_per_round": len(sample_clients(federation.num_clients, federation.clients_per_round, federation.seed, 1)),
        "client_ranks": [recipe.client_rank(k) for k in range(federation.num_clients)],
        "client_samples": list(client_sizes),
        "base_model": base_path,
        # A base dequantized from a GGUF file: which file (its source, name and content hash).
        "base_gguf": None if not recipe.model.gguf_file else gguf_provenance(
            base_path, source=recipe.model.name_or_path, gguf_file=recipe.model.gguf_file, revision=recipe.model.revision),
        # Hub dataset ids only (for the model card); local files and builtin data are not linkable.
        "datasets": [] if data_source.startswith("builtin:") or Path(data_source).exists() else [data_source],
        "data_source": data_source,
        "global_adapter": GLOBAL_ADAPTER,
        "communication": {
            "uplink_bytes_total": sum(r["uplink_bytes_total"] for r in rounds),
            "downlink_bytes_total": sum(r["downlink_bytes_total"] for r in rounds),
            "catch_up_downlink_bytes_total": sum(r.get("catch_up_downlink_bytes", 0) for r in rounds),
            "eff_x1e4": rounds[-1]["eff_x1e4"] if rounds else None,
            "eff_x1e4_per_round": [r["eff_x1e4"] for r in rounds],
        },
        "heldout_loss": [r.get("heldout_loss") for r in rounds],
        # What the run guarantees and bounds, from the clients' lines and the last round's sidecar.
        "privacy": privacy_summary(recipe, records, rounds_done, json.loads(last.read_text()) if last is not None else None),
        "evaluation": None,
        "recipe": recipe.model_dump(mode="json"),
    }
