"""FLoRIST's server step against the number of clients: stacked and streaming aggregation at
Llama-7B q,v shapes, on random client updates (the worst case) and on realistic ones.

    python -m benchmarks.aggregation --clients 8,32,128,256 [--kinds random,realistic]
        [--tolerances 0,1e-2] [--layers 1] [--threads N] [--json OUT]

Every client has rank 16 (lora_alpha 32) on q_proj and v_proj (4096×4096) and the Dolly split's
sample counts, cycled, as weights. ``--layers`` decoder layers are timed (default 1: two modules)
and the figures scaled by 32 / layers to the whole 7B model (64 modules), said as extrapolated:
each module's step is independent of the others, so time and memory add up linearly.

Clients are generated from seeds (``benchmarks.client_updates``), never read from disk, so the
figures are the aggregation alone: stacked needs every client in memory and the timed call is
``Florist.aggregate``; streaming holds one client at a time and the timed calls are
``StreamingFloristRound.add`` for each client plus ``result``, generation excluded. Peak memory
is the process's RSS high-water mark above its RSS before the first client was made, in a fresh
process per configuration (so for stacked it includes the K clients it must hold).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

import torch

from benchmarks.client_updates import SpectrumModel, client_updates
from florist_hf.aggregation import get_method
from florist_hf.aggregation.linalg import energy

HIDDEN = 4096
LAYERS_7B = 32
TARGETS = ("q_proj", "v_proj")
CLIENT_RANK = 16
DOLLY_CLIENT_SAMPLES = (1579, 685, 3775, 1830, 2152, 1776, 2531, 607)
THRESHOLD = 0.9
SEED = 0
MIB = 2**20


def module_names(layers: int) -> list[str]:
    return [f"model.layers.{layer}.self_attn.{target}" for layer in range(layers) for target in TARGETS]


def client_stream(kind: str, num_clients: int, layers: int):
    """Client after client: ``{module: ClientModule}``, each module from its own seed."""
    weights = [float(DOLLY_CLIENT_SAMPLES[k % len(DOLLY_CLIENT_SAMPLES)]) for k in range(num_clients)]
    names = module_names(layers)
    per_module = [
        client_updates(kind, (HIDDEN, HIDDEN), [CLIENT_RANK] * num_clients, weights, SEED + 7919 * index, SpectrumModel())
        for index in range(len(names))
    ]
    for weight, modules in zip(weights, zip(*per_module)):
        yield dict(zip(names, modules)), weight


def measure(kind: str, num_clients: int, aggregation: str, tolerance: float, layers: int, threads: int) -> dict:
    """One configuration, in the calling (fresh) process."""
    from benchmarks.measure import peak_rss, reset_peak_rss

    torch.set_num_threads(threads)
    options = {"threshold": THRESHOLD}
    if aggregation == "streaming":
        options.update(aggregation="streaming", tolerance=tolerance)
    method = get_method("florist", **options)
    # Warm-up (lazy imports, first LAPACK calls) outside the figures.
    warm = [next(client_stream(kind, 1, 1))[0] for _ in range(2)]
    method.aggregate(warm, [1.0, 2.0])
    del warm

    baseline, _ = reset_peak_rss()
    seconds = 0.0
    if aggregation == "stacked":
        clients, weights = zip(*client_stream(kind, num_clients, layers))
        started = time.perf_counter()
        result = method.aggregate(list(clients), list(weights))
        seconds = time.perf_counter() - started
        kept_ranks = {name: CLIENT_RANK * num_clients for name in result.modules}  # the stacks
        del clients
    else:
        streamed = method.stream()
        for client, weight in client_stream(kind, num_clients, layers):
            started = time.perf_counter()
            streamed.add(client, weight)
            seconds += time.perf_counter() - started
            del client
        kept_ranks = {name: running.rank_held for name, running in streamed.modules.items()}
        started = time.perf_counter()
        result = streamed.result()
        seconds += time.perf_counter() - started
    peak = peak_rss() - baseline

    modules = list(result.modules.values())
    client_bytes = len(modules) * CLIENT_RANK * 2 * HIDDEN * 4  # one client's fp32 adapter
    global_bytes = sum(module.selected_rank * 2 * HIDDEN * 4 for module in modules)
    return {
        "kind": kind, "clients": num_clients, "aggregation": aggregation,
        "tolerance": tolerance if aggregation == "streaming" else None,
        "modules_timed": len(modules), "seconds": seconds, "peak_rss_increase_bytes": peak,
        "selected_ranks": [module.selected_rank for module in modules],
        "kept_ranks": list(kept_ranks.values()),
        # of the whole update: a streaming tolerance's dropped energy counts in the total
        "energy_kept": [float(energy(m.singular_values)[m.selected_rank - 1])
                        / (1.0 + (m.approximation["discarded_energy"] if m.approximation else 0.0)) for m in modules],
        "top_singular_values": [[float(s) for s in m.singular_values[:8]] for m in modules],
        "discarded_energy": [m.approximation["discarded_energy"] if m.approximation else 0.0 for m in modules],
        "error_bound": [m.approximation["error_bound"] if m.approximation else 0.0 for m in modules],
        "client_bytes": client_bytes, "global_adapter_bytes": global_bytes,
        # What the method keeps between clients, in its fp64 compute precision: the stacks (stacked)
        # or the running factors (streaming).
        "kept_factor_bytes": sum(rank * 2 * HIDDEN * 8 for rank in kept_ranks.values()),
    }


def accuracy(kind: str, num_clients: int, tolerances: Sequence[float], threads: int) -> list[dict]:
    """On one module: the streamed factorisation's actual error against the dense sum (which only a
    benchmark can afford to form), beside the bound the sidecar records, and the rank τ selects."""
    from florist_hf.aggregation.streaming import StreamingFloristRound

    torch.set_num_threads(threads)
    rounds = {tolerance: StreamingFloristRound(THRESHOLD, tolerance) for tolerance in tolerances}
    dense = torch.zeros(HIDDEN, HIDDEN, dtype=torch.float64)
    total_weight = 0.0
    for client, weight in client_stream(kind, num_clients, 1):
        client = {name: module for name, module in client.items() if name.endswith("q_proj")}
        for streamed in rounds.values():
            streamed.add(client, weight)
        (module,) = client.values()
        dense.addmm_(module.lora_b.double() * (module.scale * weight), module.lora_a.double())
        total_weight += weight
    dense /= total_weight
    rows = []
    for tolerance, streamed in rounds.items():
        (running,) = streamed.modules.values()
        running.fold()
        approximation = (running.u * (running.sigma / total_weight)) @ running.v.T
        actual = float((dense - approximation).norm() / approximation.norm())
        (module,) = streamed.result().modules.values()
        rows.append({"kind": kind, "clients": num_clients, "tolerance": tolerance, "kept_rank": running.sigma.numel(),
                     "actual_error": actual, "error_bound": module.approximation["error_bound"],
                     "discarded_energy": module.approximation["discarded_energy"], "selected_rank": module.selected_rank})
    return rows


def run_scaling(client_counts: Sequence[int], kinds: Sequence[str], tolerances: Sequence[float], layers: int,
                threads: int) -> dict:
    from benchmarks.measure import in_fresh_process, machine_facts

    machine = machine_facts(threads)
    rows = []
    for kind in kinds:
        for num_clients in client_counts:
            configurations = [("stacked", 0.0)] + [("streaming", tolerance) for tolerance in tolerances]
            for aggregation, tolerance in configurations:
                label = f"{kind}, K={num_clients}, {aggregation}" + (f" tol={tolerance:g}" if aggregation == "streaming" else "")
                print(f"{label} ...", file=sys.stderr, flush=True)
                rows.append(in_fresh_process(measure, kind, num_clients, aggregation, tolerance, layers, threads))
    accuracy_clients = max(k for k in client_counts if k <= 128) if min(client_counts) <= 128 else min(client_counts)
    print(f"accuracy of streaming, realistic, K={accuracy_clients} ...", file=sys.stderr, flush=True)
    checked = in_fresh_process(accuracy, "realistic", accuracy_clients, sorted({0.0, 1e-3, *tolerances, 3e-2}), threads)
    return {
        "benchmark": "florist-hf/aggregation-scaling",
        "accuracy": checked,
        "machine": {**machine, "load_average_at_end": os.getloadavg()},
        "setting": {"shape": [HIDDEN, HIDDEN], "targets": list(TARGETS), "layers_timed": layers,
                    "layers_in_model": LAYERS_7B, "client_rank": CLIENT_RANK, "threshold": THRESHOLD,
                    "spectrum_model": SpectrumModel().__dict__, "dtype": "float32"},
        "rows": rows,
    }


def markdown_report(report: dict) -> str:
    setting, machine = report["setting"], report["machine"]
    scale = setting["layers_in_model"] / setting["layers_timed"]
    lines = [
        f"### FLoRIST τ={setting['threshold']} against the number of clients: Llama-7B q,v (4096×4096), every client r = 16",
        "",
        (f"Machine: {machine['cpu_model']}, {machine['cores']} cores, torch {machine['torch']} ({machine['torch_threads']} threads), "
         f"{machine['date_utc']}; 1-min load average {machine['load_average_at_start'][0]:.2f} at start, "
         f"{machine['load_average_at_end'][0]:.2f} at end. Timed on {setting['layers_timed']} layer(s) "
         f"({2 * setting['layers_timed']} modules); the 7B columns are those × {scale:g} (extrapolated). "
         "Kept: the fp64 factors a method holds between clients, the stacks (stacked, rank Σr_k) or the running "
         "factors plus the pending block (streaming), at the end of the round."),
        "",
        ("| updates | K | aggregation | s / module | 7B round (s, extrap.) | × the K=8 step | peak RSS rise (MiB, 7B extrap.) "
         "| peak / (2 × kept + 1 client) | kept rank per module | τ=0.9 rank | energy kept | discarded energy | error bound |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {}
    for row in report["rows"]:
        key = (row["kind"], row["aggregation"], row["tolerance"])
        per_module = row["seconds"] / row["modules_timed"]
        base.setdefault(key, per_module)
        peak = row["peak_rss_increase_bytes"] * scale
        bound = (2 * row["kept_factor_bytes"] + row["client_bytes"]) * scale
        name = row["aggregation"] + (f" (tol {row['tolerance']:g})" if row["aggregation"] == "streaming" else "")
        lines.append(
            f"| {row['kind']} | {row['clients']} | {name} | {per_module:.3f} | {per_module * 2 * setting['layers_in_model']:,.1f} | "
            f"{per_module / base[key]:.1f}× | {peak / MIB:,.0f} | {peak / bound:.2f} | {max(row['kept_ranks'])} | "
            f"{max(row['selected_ranks'])} | {min(row['energy_kept']):.4f} | {max(row['discarded_energy']):.1e} | "
            f"{max(row['error_bound']):.1e} |"
        )
    lines += [
        "",
        "Streaming's approximation against the dense sum (one q_proj module, realistic updates): the actual relative "
        "error of the running factorisation, the bound the sidecar records (Σ over folds of what each dropped), and "
        f"the rank τ = {setting['threshold']} selects.",
        "",
        "| K | tolerance | kept rank | actual error | recorded bound | discarded energy | τ rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["accuracy"]:
        lines.append(f"| {row['clients']} | {row['tolerance']:g} | {row['kept_rank']} | {row['actual_error']:.1e} | "
                     f"{row['error_bound']:.1e} | {row['discarded_energy']:.1e} | {row['selected_rank']} |")
    return "\n".join(lines)
