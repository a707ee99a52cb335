"""The server step as an operator runs it: whole `florist-hf aggregate` processes at Llama-7B shapes.

    python -m benchmarks.aggregate_processes [--targets qv] [--dtype bfloat16] [--repeats 7] [--threads 2]
        [--code before=/path/to/an/older/checkout --code after=.] [--json OUT]

The eight Llama-7B clients of benchmarks/aggregation.py (ranks 64,32,16,16,8,8,4,4, the paper's
Dolly sample counts as weights), stored in ``--dtype``, aggregated by FedIT and by FLoRIST (τ = 0.9,
the outlier report on, as every `florist-hf aggregate` writes it), each run a fresh
``python -m florist_hf aggregate`` process. Beside them, the import floor: a process that imports
what `aggregate` imports (``florist_hf.cli``, ``florist_hf.server``) and does nothing else.

Per process: wall time, CPU time (user + system, all threads) and peak RSS, read with GNU time.
Reported: medians over --repeats; the server step as the process minus the import floor (wall,
CPU, and peak RSS rise over the floor's peak), FLoRIST over FedIT, and the peak rise over the
client adapters' bytes on disk.

``--code LABEL=DIR`` (repeatable) runs the same processes against another checkout of florist_hf
(its DIR first on PYTHONPATH), interleaved repeat by repeat, the order alternating, so that a
before/after comparison on a machine other jobs share sees the same load on both sides.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.aggregation import CLIENT_RANKS, DEFAULT_CACHE, TARGET_SETS, files_bytes, llama_7b_client_set
from benchmarks.measure import machine_facts, write_json

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
#: (label, `aggregate` options): the cheap baseline and FLoRIST.
METHODS = (("fedit", ["--method", "fedit"]), ("florist τ=0.9", ["--method", "florist", "--threshold", "0.9"]))
FLOOR = "import floor"
FLOOR_CODE = "import florist_hf.cli, florist_hf.server"
#: GNU time: each process's CPU time and peak RSS.
TIME = "/usr/bin/time"


def run_process(argv: list[str], code: Path, threads: int, scratch: Path) -> dict:
    """Run one process against the florist_hf under ``code``; its wall time, CPU time and peak RSS.

    Started through GNU time, whose own small process forks it: Linux carries a process's peak RSS
    across exec, so a child forked straight from this (large) Python would report this one's.
    """
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    usage_file = scratch / "usage.txt"
    with tempfile.TemporaryFile(dir=scratch) as errors:
        started = time.perf_counter()
        process = subprocess.run([TIME, "-f", "%U %S %M", "-o", str(usage_file), *argv], env=env, cwd=scratch,
                                 stdout=subprocess.DEVNULL, stderr=errors, check=False)
        seconds = time.perf_counter() - started
        if process.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(argv[:4])} ... failed ({process.returncode}): {errors.read().decode()[-2000:]}")
    user, system, peak_kib = usage_file.read_text().split()[-3:]
    return {"seconds": seconds, "cpu_seconds": float(user) + float(system), "peak_rss_bytes": int(peak_kib) * 1024}


def commands(client_dirs: list[Path], out_dir: Path) -> dict[str, list[str]]:
    aggregate = [sys.executable, "-m", "florist_hf", "aggregate", *map(str, client_dirs), "--force", "--out", str(out_dir)]
    return {FLOOR: [sys.executable, "-c", FLOOR_CODE], **{label: aggregate + options for label, options in METHODS}}


def run(code: dict[str, Path], targets_key: str, dtype: str, repeats: int, threads: int, cache_root: Path) -> dict:
    machine = machine_facts(threads)
    client_dirs = llama_7b_client_set(cache_root, targets_key, shared_a=False, dtype=dtype)
    client_bytes = files_bytes(client_dirs)
    runs: dict[str, dict[str, list[dict]]] = {label: {name: [] for name in commands(client_dirs, cache_root)} for label in code}
    with tempfile.TemporaryDirectory(dir=cache_root) as scratch:
        scratch = Path(scratch)
        argvs = commands(client_dirs, scratch / "global")
        for repeat in range(repeats):
            order = list(code) if repeat % 2 == 0 else list(reversed(code))
            for label in order:
                for name, argv in argvs.items():
                    print(f"repeat {repeat + 1}/{repeats}: {label}: {name} ...", file=sys.stderr, flush=True)
                    runs[label][name].append(run_process(argv, code[label], threads, scratch))
    return {
        "benchmark": "florist-hf/aggregate-processes",
        "machine": {**machine, "load_average_at_end": os.getloadavg()},
        "setting": {"model_shapes": "Llama-7B", "targets": list(TARGET_SETS[targets_key]), "client_ranks": list(CLIENT_RANKS),
                    "dtype": dtype, "repeats": repeats, "threads": threads, "floor": FLOOR_CODE},
        "client_bytes": client_bytes,
        "code": {label: str(path) for label, path in code.items()},
        "runs": runs,
        "summary": {label: summarise(by_name, client_bytes) for label, by_name in runs.items()},
    }


def summarise(by_name: dict[str, list[dict]], client_bytes: int) -> dict:
    """Medians per process kind; each method's step over the floor; FLoRIST against FedIT."""
    median = {name: {key: statistics.median(run[key] for run in runs) for key in runs[0]} for name, runs in by_name.items()}
    floor = median[FLOOR]
    steps = {}
    for name, _ in METHODS:
        steps[name] = {
            "seconds": median[name]["seconds"] - floor["seconds"],
            "cpu_seconds": median[name]["cpu_seconds"] - floor["cpu_seconds"],
            "peak_rss_rise_bytes": median[name]["peak_rss_bytes"] - floor["peak_rss_bytes"],
        }
        steps[name]["peak_over_client_bytes"] = steps[name]["peak_rss_rise_bytes"] / client_bytes
    florist, fedit = steps["florist τ=0.9"], steps["fedit"]
    return {
        "medians": median,
        "steps": steps,
        "florist_over_fedit": florist["seconds"] / fedit["seconds"],
        "florist_over_fedit_cpu": florist["cpu_seconds"] / fedit["cpu_seconds"],
    }


def markdown_report(report: dict) -> str:
    machine, setting = report["machine"], report["setting"]
    lines = [
        f"Machine: {machine['cpu_model']}, {machine['cores']} cores, torch {machine['torch']} ({setting['threads']} threads), "
        f"{machine['date_utc']}; 1-min load average {machine['load_average_at_start'][0]:.2f} at start, "
        f"{machine['load_average_at_end'][0]:.2f} at end. Llama-7B {'+'.join(setting['targets'])}, "
        f"{setting['dtype']} client adapters ({report['client_bytes'] / MIB:.1f} MiB), medians of {setting['repeats']} "
        "processes each, interleaved.",
        "",
        "| code | import floor (s) | FedIT step (s) | FLoRIST step (s) | FLoRIST / FedIT (wall) | FLoRIST / FedIT (CPU) "
        "| FedIT peak / adapters | FLoRIST peak / adapters |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, summary in report["summary"].items():
        steps = summary["steps"]
        fedit, florist = steps["fedit"], steps["florist τ=0.9"]
        lines.append(
            f"| {label} | {summary['medians'][FLOOR]['seconds']:.2f} | {fedit['seconds']:.2f} | {florist['seconds']:.2f} | "
            f"{summary['florist_over_fedit']:.2f}× | {summary['florist_over_fedit_cpu']:.2f}× | "
            f"{fedit['peak_over_client_bytes']:.2f}× | {florist['peak_over_client_bytes']:.2f}× |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", choices=sorted(TARGET_SETS), default="qv")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="the client adapters' dtype")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="OMP_NUM_THREADS of each process")
    parser.add_argument("--code", action="append", default=[], metavar="LABEL=DIR",
                        help="a florist_hf checkout to time (repeatable; default: this one, labelled 'this')")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be ≥ 1")
    code = {}
    for item in args.code or [f"this={REPO}"]:
        label, separator, directory = item.partition("=")
        if not separator or not (Path(directory) / "florist_hf").is_dir():
            parser.error(f"--code {item!r}: expected LABEL=DIR with DIR/florist_hf, e.g. --code before=/tmp/old")
        code[label] = Path(directory).resolve()
    args.cache.mkdir(parents=True, exist_ok=True)
    report = run(code, args.targets, args.dtype, args.repeats, args.threads, args.cache.resolve())
    print(markdown_report(report))
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
