"""What a τ sweep costs: `florist-hf sweep` against one `florist-hf run` per threshold.

    python -m benchmarks.sweep_cost [--recipe recipes/tiny_cpu_demo.yaml] [--thresholds 0.8,0.85,0.9,0.95]
                                    [--rounds 1] [--set key=value ...]

Both sides run in this process, one after the other, on fresh directories. Client trainings are
counted by wrapping `florist_hf.clients.run.run_client_round`; server steps by wrapping
`florist_hf.server.aggregate_adapters`; held-out evaluations by wrapping
`florist_hf.heldout.heldout_loss`. The sweep should cost one round of client training plus one
server step and one evaluation per τ (for a one-round recipe).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/tiny_cpu_demo.yaml")
    parser.add_argument("--thresholds", default="0.8,0.85,0.9,0.95")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from transformers.utils import logging as transformers_logging

    from florist_hf import evaluation, server
    from florist_hf.clients import run as client
    from florist_hf.recipe import load_recipe
    from florist_hf.runner import run_federation
    from florist_hf.sweep import parse_thresholds, run_sweep

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    counts: Counter = Counter()
    for module, name in ((client, "run_client_round"), (server, "aggregate_adapters"), (evaluation, "heldout_loss")):
        original = getattr(module, name)

        def counted(*a, _original=original, _name=name, **k):
            counts[_name] += 1
            return _original(*a, **k)

        setattr(module, name, counted)
    thresholds = parse_thresholds(args.thresholds)
    quiet = Console(file=open(os.devnull, "w"))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        base = [f"federation.rounds={args.rounds}", *args.overrides]
        counts.clear()
        started = time.perf_counter()
        for threshold in thresholds:
            recipe = load_recipe(args.recipe, [*base, f"federation.threshold={threshold}", f"output_dir={scratch}/runs/{threshold:g}"])
            run_federation(recipe, console=quiet)
        rows.append(("one `run` per τ", time.perf_counter() - started, dict(counts)))
        counts.clear()
        started = time.perf_counter()
        run_sweep(load_recipe(args.recipe, [*base, f"output_dir={scratch}/sweep"]), thresholds, console=quiet)
        rows.append(("`sweep`", time.perf_counter() - started, dict(counts)))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"recipe: {args.recipe} ({args.rounds} round(s)), τ ∈ {thresholds}")
    print("| | wall time (s) | client trainings | server steps | held-out evaluations |")
    print("|---|---|---|---|---|")
    for label, seconds, counted in rows:
        print(f"| {label} | {seconds:.1f} | {counted.get('run_client_round', 0)} | {counted.get('aggregate_adapters', 0)} "
              f"| {counted.get('heldout_loss', 0)} |")


if __name__ == "__main__":
    main()
