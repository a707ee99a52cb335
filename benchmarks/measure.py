"""What every benchmark records about where it ran."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
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
