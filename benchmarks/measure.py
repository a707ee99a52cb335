"""What every benchmark records about where it ran."""

from __future__ import annotations

import os
import platform
import re
import resource
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform says."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_record() -> dict:
    """When and where a measurement ran: UTC date, CPU, cores, load average."""
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": cpu_name(),
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}


def step_clock():
    """A TrainerCallback that times every optimizer step (its ``seconds``, in order)."""
    import time

    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.started, self.seconds = 0.0, []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

    return StepClock()


# --- memory -----------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> tuple[int, bool]:
    """Reset the RSS high-water mark where Linux allows it; return (current RSS in bytes, whether reset)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS
        was_reset = True
    except OSError:  # then the figure is the rise of the high-water mark, a lower bound
        was_reset = False
    return _status_kib("VmRSS" if was_reset else "VmHWM") * 1024, was_reset


def peak_rss() -> int:
    """This process's RSS high-water mark in bytes (VmHWM, which `reset_peak_rss` can reset)."""
    return _status_kib("VmHWM") * 1024


def peak_rss_gib() -> float:
    """This process's peak RSS in GiB, whatever reset it (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak if platform.system() == "Darwin" else peak * 1024) / 2**30


def in_fresh_process(function, *args):
    """Run ``function(*args)`` in a new interpreter, so each peak RSS starts from a clean process."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()



# --- the machine, in full (the aggregation benchmarks) --------------------------------------------


def machine_facts(threads: int) -> dict:
    """The machine and the numerical libraries in full: what the aggregation benchmarks depend on."""
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text()

    def cpuinfo_field(name: str) -> str | None:
        found = re.search(rf"^{name}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        return found.group(1) if found else None

    meminfo = Path("/proc/meminfo").read_text()
    memory_kib = int(re.search(r"^MemTotal:\s*(\d+)", meminfo, re.MULTILINE).group(1))
    blas = dict(re.findall(r"(BLAS_INFO|LAPACK_INFO)=(\w+)", torch.__config__.show()))
    import numpy
    import peft
    import safetensors
    from threadpoolctl import threadpool_info

    # numpy's BLAS runs FLoRIST's large products (florist_hf.aggregation.linalg.blas_matmul).
    numpy_blas = next(
        (lib["internal_api"] for lib in threadpool_info() if lib["user_api"] == "blas" and "numpy" in lib["filepath"]),
        None,
    )
    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpuinfo_field("model name") or platform.processor(),
        "cpu_family_model": f"{cpuinfo_field('cpu family')}/{cpuinfo_field('model')}",
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(memory_kib / 2**20, 1),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "blas": blas.get("BLAS_INFO"),
        "lapack": blas.get("LAPACK_INFO"),
        "numpy": numpy.__version__,
        "numpy_blas": numpy_blas,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
    }


def write_json(path: Path, payload: dict) -> None:
    """A benchmark's results, written atomically (numpy and torch scalars as floats)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float))
    os.replace(tmp, path)
