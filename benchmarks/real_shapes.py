"""A paper recipe at its base's full dimensions (random weights) on the paper's real Dolly split.

    python -m benchmarks.real_shapes --base tinyllama [--rounds 1] [--steps 2] [--batch 1] [--cutoff 128]
    python -m benchmarks.real_shapes --base llama32_1b --rounds 3
    python -m benchmarks.real_shapes --base llama7b --steps 1 --no-heldout

Runs ``recipes/<base>_dolly_heter.yaml`` (8 clients, ranks 64…4, FLoRIST) through `run_federation`,
changed only in size: the base is a randomly initialised Llama with the real config (built once
into benchmarks/_cache/), the data the paper's 8-client split in FLoRA's layout (../shared/data/dolly
beside the clone, or --data), a few steps per client. On a machine without CUDA the recipe's bf16
runs on the CPU (``use_cpu``). Reports, per client, the time outside training split into base load,
PEFT build, global-update install and export; the server step; the held-out evaluation; peak
memory; and that the published adapter equals the sum of the round updates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from benchmarks.measure import peak_rss_gib

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / "_cache" / "real_shapes"
#: Where a client's time outside training goes (Trainer construction includes installing the global update).
LABELS = ("load base", "build PEFT", "build Trainer", "install global", "export", "free memory")
BASES = {"tinyllama": "TinyLlama/TinyLlama_v1.1", "llama32_1b": "meta-llama/Llama-3.2-1B", "llama7b": "huggyllama/llama-7b"}


class Timers:
    """Seconds spent in wrapped functions, attributed to the phase (client k / held-out) they ran in."""

    def __init__(self) -> None:
        self.phase: tuple = ("setup",)
        self.seconds: dict[tuple, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def wrap(self, owner, attribute: str, label: str, phase: tuple | None = None) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                self.seconds[phase or self.phase][label] += elapsed
                if phase is not None:
                    self.seconds[phase]["total"] += elapsed

        setattr(owner, attribute, timed)

    @contextmanager
    def in_phase(self, phase: tuple):
        previous, self.phase = self.phase, phase
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase]["total"] += time.perf_counter() - started
            self.phase = previous


def instrument(timers: Timers) -> None:
    import peft

    from florist_hf import heldout, loading
    from florist_hf.clients import callback
    from florist_hf.clients import run as client

    timers.wrap(loading, "load_causal_lm", "load base")
    timers.wrap(peft, "get_peft_model", "build PEFT")
    timers.wrap(client, "prepare_shard", "tokenize", phase=("tokenize",))  # once per client, before its first round
    timers.wrap(client, "build_client_trainer", "build Trainer")
    timers.wrap(callback, "install_global_state", "install global")
    timers.wrap(callback, "export_client_adapter", "export")
    timers.wrap(client, "free_memory", "free memory")
    timers.wrap(heldout, "heldout_loss", "held-out loss", phase=("held-out",))
    for module, name in ((client, "run_client_round"), (heldout, "load_global_model")):
        original = getattr(module, name)

        def phased(*args, _original=original, _name=name, **kwargs):
            phase = ("client", args[1].round, args[1].client_id) if _name == "run_client_round" else ("held-out",)
            with timers.in_phase(phase):
                return _original(*args, **kwargs)

        setattr(module, name, phased)


def published_equals_sum_of_rounds(run_dir: Path, rounds: int) -> float:
    """Largest relative difference, over modules, between the published update and Σ_t round t's."""
    from florist_hf.adapters import read_adapter

    def deltas(adapter_dir: Path) -> dict:
        adapter = read_adapter(adapter_dir)
        return {name: (m.scale, m.lora_b, m.lora_a) for name, m in adapter.modules.items()}

    published = deltas(run_dir / "global_adapter")
    per_round = [deltas(run_dir / "rounds" / str(t) / "global") for t in range(1, rounds + 1)]
    worst = 0.0
    for name, (scale, lora_b, lora_a) in published.items():
        got = scale * (lora_b.double() @ lora_a.double())
        expected = sum(s * (b.double() @ a.double()) for s, b, a in (r[name] for r in per_round))
        worst = max(worst, float((got - expected).norm() / expected.norm()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=sorted(BASES), required=True)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per client per round")
    parser.add_argument("--batch", type=int, default=1, help="per-device batch size (no accumulation)")
    parser.add_argument("--cutoff", type=int, default=128, help="tokens per example at most")
    parser.add_argument("--no-heldout", action="store_true", help="skip the held-out loss after each round")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "dolly")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a fresh one under _cache)")
    args = parser.parse_args()

    from rich.console import Console
    from transformers.utils import logging as transformers_logging

    from florist_hf.recipe import load_recipe
    from florist_hf.runner import run_federation
    from florist_hf.tiny import PAPER_BASES, build_random_llama

    transformers_logging.set_verbosity_error()
    if not (args.data / "8").is_dir():
        raise SystemExit(f"{args.data}: the paper's Dolly split (FLoRA layout, 8/local_training_<k>.json) not found; pass --data")
    name = BASES[args.base]
    cuda = torch.cuda.is_available()
    started = time.perf_counter()
    base_dir = build_random_llama(CACHE / "bases" / args.base, PAPER_BASES[name], base_name=name, dtype="bfloat16")
    build_seconds = time.perf_counter() - started
    out_dir = args.out or CACHE / "runs" / f"{args.base}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
    overrides = [
        f"model.name_or_path={base_dir}", "data.layout=flora", f"data.source={args.data}",
        f"data.cutoff_len={args.cutoff}", f"federation.rounds={args.rounds}", f"output_dir={out_dir}",
        f"training.max_steps={args.steps}", f"training.per_device_train_batch_size={args.batch}",
        "training.gradient_accumulation_steps=1", "evaluation=null",
        f"federation.eval_heldout_loss={str(not args.no_heldout).lower()}",
    ]
    if not cuda:
        overrides.append("training.use_cpu=true")
    recipe = load_recipe(REPO / "recipes" / f"{args.base}_dolly_heter.yaml", overrides)

    timers = Timers()
    instrument(timers)
    started = time.perf_counter()
    run_federation(recipe, console=Console(quiet=True))
    wall = time.perf_counter() - started

    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    clients = {(r["round"], r["client"]): r for r in records if r["kind"] == "client"}
    rounds = [r for r in records if r["kind"] == "round"]
    rows = []
    for (round_index, client_id), info in sorted(clients.items()):
        seconds = timers.seconds[("client", round_index, client_id)]
        rows.append({
            "round": round_index, "client": client_id, "rank": info["rank"], "steps": info["steps"],
            "train": info["train_seconds"], "outside": seconds["total"] - info["train_seconds"],
            **{label: seconds[label] for label in LABELS},
        })
    heldout = timers.seconds[("held-out",)]
    config = PAPER_BASES[name]
    device = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"# {name} shape ({config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
          f"{config['num_attention_heads']}/{config['num_key_value_heads']} heads, vocab {config['vocab_size']}), random bf16 weights")
    print(f"machine: {device}, torch {torch.__version__}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"8 clients x {args.rounds} round(s) x {args.steps} step(s), batch {args.batch}, cutoff {args.cutoff}; "
          f"base built in {build_seconds:.0f} s (0 if cached)")
    print("\n| round | client | rank | train (s) | outside training (s) | " + " | ".join(LABELS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(LABELS))
    for row in rows:
        print(f"| {row['round']} | {row['client']} | {row['rank']} | {row['train']:.1f} | {row['outside']:.2f} | "
              + " | ".join(f"{row[label]:.2f}" for label in LABELS) + " |")
    tokenize = timers.seconds[("tokenize",)]
    print(f"\ntokenizing the 8 shards (once, before each client's first round): {tokenize['total']:.1f} s in all")
    outside = [row["outside"] for row in rows]
    print(f"outside training per client: median {statistics.median(outside):.2f} s, max {max(outside):.2f} s")
    server_seconds = ", ".join(f"{r['server_seconds']:.2f}" for r in rounds)
    print(f"server step per round (s): {server_seconds}")
    if heldout:
        print(f"held-out evaluation: {heldout['total']:.1f} s in all ({heldout['held-out loss']:.1f} s of it the loss over "
              f"response tokens, "
              f"the rest loading base + {args.rounds if recipe.federation.method in ('florist', 'flora') else 1} update(s)); "
              f"losses {[round(r['heldout_loss'], 4) for r in rounds if 'heldout_loss' in r]}")
    print(f"total selected rank per round: {[r['total_selected_rank'] for r in rounds]}")
    print(f"wall time {wall:.0f} s; peak RSS {peak_rss_gib():.1f} GiB"
          + (f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""))
    print(f"published adapter vs sum of the round updates: max relative difference {published_equals_sum_of_rounds(out_dir, args.rounds):.1e}")


if __name__ == "__main__":
    main()
