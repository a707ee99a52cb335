"""Process memory across rounds: one process runs a multi-round federation on the tiny model.

    python -m benchmarks.memory [--rounds 5] [--recipe recipes/tiny_cpu_demo.yaml] [--set key=value ...] [--json out.json]

Every client round builds a model, a Trainer and an optimizer and must release them; a leak shows
as resident memory that keeps climbing from round to round. After each round (when its record is
written to metrics.jsonl) this records the current RSS and the process's peak RSS so far
(getrusage ru_maxrss), then prints the growth from the end of round 2 (imports, allocator pools and
lazily built kernels settle during round 1) to the last round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from benchmarks.measure import peak_rss

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MIB = 1024 * 1024


def current_rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # Linux without psutil
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--recipe", default="recipes/tiny_cpu_demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    parser.add_argument("--json", type=Path, help="also write the per-round figures here")
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from transformers.utils import logging as transformers_logging

    from florist_hf import engine, runner
    from florist_hf.recipe import load_recipe

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    rows: list[dict] = []
    started = time.perf_counter()
    write_record = engine.append_jsonl

    def record_memory(path, record):  # the round loop writes one "round" record at the end of each round
        write_record(path, record)
        if record.get("kind") == "round":
            rows.append({
                "round": record["round"],
                "rss_mib": current_rss() / MIB,
                "peak_rss_mib": peak_rss() / MIB,
                "seconds": time.perf_counter() - started,
            })

    engine.append_jsonl = record_memory
    with tempfile.TemporaryDirectory() as scratch:
        overrides = [f"federation.rounds={args.rounds}", f"output_dir={scratch}/run", *args.overrides]
        recipe = load_recipe(args.recipe, overrides)
        rss_before = current_rss() / MIB
        runner.run_federation(recipe, console=Console(file=open(os.devnull, "w")))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"recipe: {args.recipe} {' '.join(overrides[2:])} ({recipe.federation.num_clients} clients, {args.rounds} rounds, "
          f"{recipe.federation.method}); RSS before the run {rss_before:.0f} MiB")
    print("| round | RSS after the round (MiB) | peak RSS so far (MiB) | elapsed (s) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['round']} | {row['rss_mib']:.0f} | {row['peak_rss_mib']:.0f} | {row['seconds']:.0f} |")
    if len(rows) >= 3:
        settled = rows[1]
        rounds = rows[-1]["round"] - settled["round"]
        growth = rows[-1]["rss_mib"] - settled["rss_mib"]
        peak_growth = rows[-1]["peak_rss_mib"] - settled["peak_rss_mib"]
        print(f"from the end of round {settled['round']} to round {rows[-1]['round']}: RSS {growth:+.1f} MiB "
              f"({growth / rounds:+.1f} MiB per round), peak {peak_growth:+.1f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"recipe": args.recipe, "overrides": overrides[2:], "rss_before_mib": rss_before,
                                         "rounds": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
