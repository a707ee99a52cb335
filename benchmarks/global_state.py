"""The global model a client holds against the round count, at TinyLlama-1.1B q,v shapes: the
rounds' updates held side by side (before) against the compact global state (now).

    .venv/bin/python -m benchmarks.global_state                       # about 10 minutes on 2 CPU cores
    .venv/bin/python -m benchmarks.global_state --rounds 1,2,10 --before 1,2,10

Every round's global update is FLoRIST's (τ = 0.9) aggregate of two clients of rank 16
(FlowerTune's 2 clients per round), drawn from the model fitted to trained clients
(`benchmarks/client_updates.py`), for every q_proj (2048×2048) and v_proj (256×2048) of 22 layers.
At each measured round count T:

- **held**: the numbers a client holds for the global update (fp32), and the form per module;
- **load + attach**: reading what the client receives from disk (before: T round adapters; now:
  one state directory) and attaching it to a bf16 stack of the 44 linear layers (median of 3);
- **forward**: 4 × 256 tokens through the 44 layers with the held update, against the bare bf16
  layers (median of 5);
- **server fold** (now): the seconds to fold round T into the state, and to write it.

"Before" is the concatenation the clients used to attach (A_g = [A_1; …; A_T], B_g = [s_1 B_1, …]):
the same hook over a rank-ΣR factor pair. Its memory grows with T, so it is measured up to 40 rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.measure import machine_record, peak_rss_gib
from benchmarks.client_updates import SpectrumModel, realistic_update
from florist_hf.aggregation import get_method
from florist_hf.aggregation.cumulative import HeldUpdate
from florist_hf.global_state import GlobalState, attach_global_state, detach_global_state, fold, read_global_state, write_global_state

LAYERS = 22
SHAPES = {"q_proj": (2048, 2048), "v_proj": (256, 2048)}
HERE = Path(__file__).resolve().parent


def module_names() -> list[str]:
    return [f"base_model.model.model.layers.{i}.self_attn.{kind}" for i in range(LAYERS) for kind in SHAPES]


def stack_model() -> torch.nn.Module:
    """The 44 q/v linear layers of TinyLlama-1.1B, in bf16, under their model names."""
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList()
    for _ in range(LAYERS):
        layer = torch.nn.Module()
        layer.self_attn = torch.nn.Module()
        for kind, (m, n) in SHAPES.items():
            setattr(layer.self_attn, kind, torch.nn.Linear(n, m, bias=False, dtype=torch.bfloat16))
        model.model.layers.append(layer)
    return model


class RoundUpdate:
    """One round's global update (an `adapters.LoraAdapter`-like: ``modules`` and ``path``)."""

    def __init__(self, round_index: int):
        florist = get_method("florist", threshold=0.9)
        self.path = f"round {round_index}"
        self.modules = {}
        for index, name in enumerate(module_names()):
            shape = SHAPES[name.rsplit(".", 1)[1]]
            clients = [realistic_update(shape, 16, (round_index * 1000 + index) * 2 + k, round_index * 1000 + index,
                                        SpectrumModel()) for k in range(2)]
            aggregate = florist.aggregate_module(clients, torch.tensor([0.5, 0.5], dtype=torch.float64))
            self.modules[name] = type(clients[0])(lora_a=aggregate.lora_a.float(), lora_b=aggregate.lora_b.float(), scale=1.0)


def concatenated(rounds: list[RoundUpdate]) -> GlobalState:
    """The old side-by-side layout, as one low-rank pair per module of rank Σ r_t."""
    modules = {}
    for name in module_names():
        parts = [r.modules[name] for r in rounds]
        modules[name] = HeldUpdate(parts[0].shape, lora_b=torch.cat([p.scale * p.lora_b for p in parts], dim=1),
                                   lora_a=torch.cat([p.lora_a for p in parts]))
    return GlobalState(modules, list(range(1, len(rounds) + 1)))


def write_round_files(rounds: list[RoundUpdate], directory: Path) -> list[Path]:
    from safetensors.torch import save_file

    paths = []
    directory.mkdir(parents=True, exist_ok=True)
    for index, round_update in enumerate(rounds, start=1):
        path = directory / f"round_{index}.safetensors"
        if not path.exists():
            save_file({f"{n}.lora_{f}.weight": (m.lora_a if f == "A" else m.lora_b).contiguous()
                       for n, m in round_update.modules.items() for f in "AB"}, str(path))
        paths.append(path)
    return paths


def read_round_files(paths: list[Path]) -> GlobalState:
    from safetensors.torch import load_file

    tensors = [load_file(str(path)) for path in paths]
    modules = {}
    for name in module_names():
        modules[name] = HeldUpdate(SHAPES[name.rsplit(".", 1)[1]], lora_b=torch.cat([t[f"{name}.lora_B.weight"] for t in tensors], dim=1),
                                   lora_a=torch.cat([t[f"{name}.lora_A.weight"] for t in tensors]))
    return GlobalState(modules, list(range(1, len(paths) + 1)))


def time_attach(model, load, repeats=3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        attach_global_state(model, load())
        times.append(time.perf_counter() - started)
        detach_global_state(model)
    return statistics.median(times)


def time_forward(model, x, repeats=5) -> float:
    layers = [module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            for layer in layers:
                layer(x)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def held_summary(state: GlobalState) -> dict:
    dense = sum(held.is_dense for held in state.modules.values())
    ranks = [held.rank for held in state.modules.values() if not held.is_dense]
    return {"held_gib": state.wire_bytes / 2**30, "dense_modules": dense, "max_low_rank": max(ranks, default=None)}


def measure(model, x, held: GlobalState, load, base_forward: float) -> dict:
    """What a client holds, its load + attach time, and the forward cost with it attached."""
    row = {**held_summary(held), "load_attach_seconds": time_attach(model, load)}
    attach_global_state(model, held)
    row["forward_seconds"] = time_forward(model, x)
    detach_global_state(model)
    row["forward_vs_base"] = row["forward_seconds"] / base_forward
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.global_state", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", default="1,2,10,50,100,200", help="round counts measured now")
    parser.add_argument("--before", default="1,2,10,20,40", help="round counts measured before (side by side)")
    parser.add_argument("--json", type=Path, default=HERE / "global_state.json")
    args = parser.parse_args(argv)
    now_counts = sorted(int(t) for t in args.rounds.split(","))
    before_counts = sorted(int(t) for t in args.before.split(",") if t)
    torch.manual_seed(0)
    model = stack_model()
    x = torch.randn(4 * 256, 2048, dtype=torch.bfloat16)
    base_forward = time_forward(model, x)
    results = {**machine_record(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "base_forward_seconds": base_forward, "before": [], "now": []}
    print(f"bare bf16 q,v layers: forward of 4 × 256 tokens {base_forward:.3f} s", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        rounds: list[RoundUpdate] = []
        state, folds = None, []
        for t in range(1, max(now_counts + before_counts) + 1):
            rounds.append(RoundUpdate(t))
            started = time.perf_counter()
            state = fold(state, [rounds[-1]], [t])
            fold_seconds = time.perf_counter() - started
            folds.append(fold_seconds)
            if t in before_counts:
                paths = write_round_files(rounds, scratch / "rounds")
                held = concatenated(rounds)
                row = {"rounds": t, "round_rank_median": statistics.median(rounds[-1].modules[n].rank for n in module_names()),
                       **measure(model, x, held, lambda: read_round_files(paths), base_forward)}
                results["before"].append(row)
                print(f"before T={t:>3}: held {row['held_gib']:.3f} GiB, load+attach {row['load_attach_seconds']:.2f} s, "
                      f"forward {row['forward_vs_base']:.2f}× base", flush=True)
            if len(rounds) > max(before_counts, default=0):  # the side-by-side rounds are not needed further
                rounds[-1] = None
            if t in now_counts:
                started = time.perf_counter()
                write_global_state(state, scratch / "state")
                write_seconds = time.perf_counter() - started
                row = {"rounds": t, "fold_seconds": fold_seconds, "write_seconds": write_seconds,
                       **measure(model, x, state, lambda: read_global_state(scratch / "state"), base_forward)}
                results["now"].append(row)
                print(f"now    T={t:>3}: held {row['held_gib']:.3f} GiB ({row['dense_modules']} of 44 dense), "
                      f"load+attach {row['load_attach_seconds']:.2f} s, forward {row['forward_vs_base']:.2f}× base, "
                      f"fold {fold_seconds:.2f} s, write {write_seconds:.2f} s", flush=True)
    results["fold_seconds_per_round"] = folds
    results["peak_rss_gib"] = peak_rss_gib()
    args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
