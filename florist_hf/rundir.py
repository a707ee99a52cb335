"""The run directory: its layout (`RunPaths`), its lock, and the one reader of each of its records."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from florist_hf.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SIDECAR
from florist_hf.errors import FloristError

RUN_FORMAT = "florist-hf/run"
RECIPE_RECORD = "recipe.json"
METRICS_FILE = "metrics.jsonl"
RUN_SUMMARY = "run.json"
ROUNDS_DIR = "rounds"
GLOBAL_ADAPTER = "global_adapter"
BASE_MODEL_DIR = "base_model"
#: What a round's clients were given (the global updates they trained on), to tell a round that
#: a --force re-aggregation of an earlier round made stale.
ROUND_INPUTS = "inputs.json"
SUPERSEDED_DIR = "superseded"
#: Names the process that holds a run directory's lock (an OS lock on the directory), while it does.
RUN_LOCK = ".florist-hf.lock"


@dataclass
class RunPaths:
    """Where a run keeps its state; every file here is written atomically."""

    root: Path

    def round_dir(self, round_index: int) -> Path:
        return self.root / ROUNDS_DIR / str(round_index)

    def global_dir(self, round_index: int) -> Path:
        return self.round_dir(round_index) / "global"

    def global_state_dir(self, round_index: int) -> Path:
        """Merge-style methods: the cumulative update of every round up to this one (`global_state`)."""
        return self.round_dir(round_index) / "global_state"

    def client_dir(self, round_index: int, client_id: int) -> Path:
        return self.round_dir(round_index) / "clients" / f"client_{client_id}"

    def client_dirs(self, round_index: int) -> list[Path]:
        """The round's finished client adapters (``client_<id>``, by id), not the ones set aside
        (``client_<id>.nonfinite``, ``.invalid``)."""
        found = (self.round_dir(round_index) / "clients").glob("client_*")
        return sorted((path for path in found if path.name.removeprefix("client_").isdigit()),
                      key=lambda path: int(path.name.removeprefix("client_")))

    def client_work_dir(self, round_index: int, client_id: int) -> Path:
        """The client's Trainer output dir: its mid-round checkpoints (``training.save_steps``)."""
        return self.round_dir(round_index) / "work" / f"client_{client_id}"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def run_record(self) -> Path:
        return self.root / RUN_SUMMARY

    @property
    def recipe_record(self) -> Path:
        return self.root / RECIPE_RECORD

    @property
    def work(self) -> Path:
        """Scratch space for the server's own Trainer runs (held-out evaluation)."""
        return self.root / "work"


class RunDirectoryLock:
    """An exclusive lock on a run directory, so that two processes never train into one.

    A POSIX ``flock`` on the directory itself: the OS releases it when the process ends, however
    it ends, so a killed run never leaves a stale lock. While it is held, ``RUN_LOCK`` names the
    holder for the refusal message; it is removed on release (a killed run's is overwritten by the
    next holder).
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.owner_file = self.root / RUN_LOCK
        self._descriptor: int | None = None

    def acquire(self) -> None:
        import fcntl
        import socket
        import sys

        from florist_hf.io_utils import write_text_atomic

        descriptor = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            try:
                holder = self.owner_file.read_text().strip() or "another process"
            except OSError:
                holder = "another process"
            raise FloristError(
                f"{self.root}: in use by {holder}; wait for it to finish (or stop it), or use another output_dir"
            ) from None
        self._descriptor = descriptor
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        write_text_atomic(self.owner_file, f"florist-hf process {os.getpid()} on {socket.gethostname()} "
                                           f"(started {started}: {command})\n")

    def release(self) -> None:
        if self._descriptor is not None:
            self.owner_file.unlink(missing_ok=True)
            os.close(self._descriptor)  # closing the descriptor releases the flock
            self._descriptor = None


def read_metrics(metrics_file: Path, *, strict: bool = True) -> list[dict]:
    """The records of metrics.jsonl.

    ``strict`` (a reader: report, sweep, the CLI): a missing file or a line that is not a JSON
    object is a one-line FloristError naming it. Not strict (the engine, resuming a run a kill may
    have stopped): a missing file is an empty log and a line that does not parse is skipped; the
    engine writes its record again.
    """
    metrics_file = Path(metrics_file)
    if not metrics_file.is_file():
        if strict:
            raise FloristError(f"{metrics_file}: not found; pass a run directory written by the florist-hf federation runner")
        return []
    records = []
    for line_number, line in enumerate(metrics_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if not strict:
                continue
            raise FloristError(f"{metrics_file}:{line_number}: corrupt JSON line ({error}); delete that line and retry") from None
        if not isinstance(record, dict):
            if not strict:
                continue
            raise FloristError(f"{metrics_file}:{line_number}: expected a JSON object per line; delete that line and retry")
        records.append(record)
    return records


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; a missing or corrupt file is a one-line FloristError."""
    if not path.is_file():
        raise FloristError(f"{path}: not found; pass a run directory written by the florist-hf federation runner")
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FloristError(f"{path}: corrupt JSON ({error}); re-run or restore this file") from None
    if not isinstance(payload, dict):
        raise FloristError(f"{path}: expected a JSON object, found {type(payload).__name__}; re-run or restore this file")
    return payload


def final_sidecar_path(run_dir: Path, run: Mapping) -> Path | None:
    """The final global adapter's sidecar, else the sidecar of the highest-numbered round, else None."""
    final = run_dir / run.get("global_adapter", GLOBAL_ADAPTER) / SIDECAR
    if final.is_file():
        return final
    round_sidecars = [
        (int(round_dir.name), round_dir / "global" / SIDECAR)
        for round_dir in (run_dir / ROUNDS_DIR).glob("*")
        if round_dir.name.isdigit() and (round_dir / "global" / SIDECAR).is_file()
    ]
    return max(round_sidecars)[1] if round_sidecars else None


def published_adapter(source: str | os.PathLike) -> Path:
    """A run directory's published adapter (run.json's ``global_adapter``), or ``source`` itself
    when it is an adapter directory; one line when it is neither."""
    source = Path(source)
    if (source / RUN_SUMMARY).is_file():
        source = source / read_json(source / RUN_SUMMARY).get("global_adapter", GLOBAL_ADAPTER)
    if not (source / ADAPTER_CONFIG).is_file() or not (source / ADAPTER_WEIGHTS).is_file():
        raise FloristError(
            f"{source}: not a finished run directory or a PEFT adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}); "
            "pass a run directory or its global_adapter/"
        )
    return source
