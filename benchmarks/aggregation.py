"""Server-step cost at Llama-7B scale: client adapter files on disk -> global adapter on disk.

    python -m benchmarks.aggregation [--targets qv|all] [--flexlora-modules 2] [--repeats 3] [--threads N] [--json OUT]
    python -m benchmarks.aggregation --clients 8,32,128,256   # FLoRIST stacked vs streaming: see aggregation_scaling.py

Eight synthetic clients (ranks 64,32,16,16,8,8,4,4, lora_alpha = 2r, the paper's Dolly sample
counts as aggregation weights) are written once as real PEFT adapter directories under
benchmarks/_cache/ and reused by later runs. FFA-LoRA gets its own client set in which every
client's A is the first r_k rows of one shared frozen A (the only input it accepts).

What is measured, each method in a fresh process:
- wall time: ``aggregate_adapters`` end to end (read the client files, aggregate, write the global
  PEFT adapter and sidecar atomically), best of --repeats, a new output directory every time; and
  the process's CPU time (user + system, all threads) of the same calls, which other jobs on a
  shared machine disturb less;
- peak memory: the process's RSS high-water mark (VmHWM) during the first repeat minus its RSS just
  before it, after imports and a warm-up on a tiny adapter (so lazy imports are not counted);
- the I/O floor: ``read_client_adapters`` alone, the same way.
Client files are in the page cache (warm reads), as they are on a server that just received them.

FlexLoRA's dense SVD takes about a minute per 4096x4096 module on two cores, so it runs on
--flexlora-modules modules of each distinct module shape only: the same client files cut down to
those modules, through the unchanged ``aggregate_adapters``. Its time per module is then scaled to
every module of that shape and reported as extrapolated; its peak memory is the cut-down run's.

On a machine whose cores other jobs also use, prefer --threads 1: with more OpenMP threads than
free cores, the small R×R LAPACK calls spin-wait and one server step can take 10-40× longer.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from benchmarks.measure import in_fresh_process, machine_facts, peak_rss, reset_peak_rss
from florist_hf.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CLIENT_INFO,
    PEFT_PREFIX,
    read_client_adapters,
)
from florist_hf.aggregation import get_method
from florist_hf.io_utils import atomic_directory
from florist_hf.server import aggregate_adapters

# --- the setting: Llama-7B shapes, the paper's heterogeneous clients ------------------------------

LLAMA_7B_LAYERS = 32
LLAMA_7B_HIDDEN = 4096
LLAMA_7B_INTERMEDIATE = 11008
#: Linear layer -> (its parent inside a decoder layer, (out_features, in_features)).
LLAMA_7B_LINEAR = {
    "q_proj": ("self_attn", (LLAMA_7B_HIDDEN, LLAMA_7B_HIDDEN)),
    "k_proj": ("self_attn", (LLAMA_7B_HIDDEN, LLAMA_7B_HIDDEN)),
    "v_proj": ("self_attn", (LLAMA_7B_HIDDEN, LLAMA_7B_HIDDEN)),
    "o_proj": ("self_attn", (LLAMA_7B_HIDDEN, LLAMA_7B_HIDDEN)),
    "gate_proj": ("mlp", (LLAMA_7B_INTERMEDIATE, LLAMA_7B_HIDDEN)),
    "up_proj": ("mlp", (LLAMA_7B_INTERMEDIATE, LLAMA_7B_HIDDEN)),
    "down_proj": ("mlp", (LLAMA_7B_HIDDEN, LLAMA_7B_INTERMEDIATE)),
}
TARGET_SETS = {"qv": ("q_proj", "v_proj"), "all": tuple(LLAMA_7B_LINEAR)}
CLIENT_RANKS = (64, 32, 16, 16, 8, 8, 4, 4)
DOLLY_CLIENT_SAMPLES = (1579, 685, 3775, 1830, 2152, 1776, 2531, 607)
#: Written into adapter_config.json as PEFT would; the benchmark never loads a model.
BASE_MODEL_ID = "meta-llama/Llama-2-7b-hf"
#: Trained LoRA B is small but non-zero; its scale does not change the cost of any method.
LORA_B_STD = 1e-3
SEED = 0
#: Bump when the generated files change, so stale caches are regenerated.
CACHE_FORMAT = 1
CACHE_MANIFEST = "benchmark_clients.json"
DEFAULT_CACHE = Path(__file__).resolve().parent / "_cache"

#: Methods timed over every module (label, registry name, options, uses the shared-A client set).
FULL_METHODS = (
    ("fedit", "fedit", {}, False),
    ("flora", "flora", {}, False),
    ("florist τ=0.9", "florist", {"threshold": 0.9}, False),
    ("ffa", "ffa", {}, True),
)
MIB = 2**20


def llama_7b_module_shapes(targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """PEFT module names (as in adapter_model.safetensors) -> (out, in), in layer order."""
    shapes = {}
    for layer in range(LLAMA_7B_LAYERS):
        for target in targets:
            parent, shape = LLAMA_7B_LINEAR[target]
            shapes[f"{PEFT_PREFIX}model.layers.{layer}.{parent}.{target}"] = shape
    return shapes


# --- synthetic PEFT client adapters, cached on disk -----------------------------------------------


def write_client_set(
    directory: Path,
    shapes: dict[str, tuple[int, int]],
    targets: Sequence[str],
    *,
    ranks: Sequence[int],
    samples: Sequence[int],
    shared_a: bool,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> list[Path]:
    """One PEFT LoRA adapter directory per client: adapter_config.json, adapter_model.safetensors, client.json.

    Factors are Gaussians (A ~ N(0, 1/in), B ~ N(0, LORA_B_STD²)), drawn in fp32 and stored in
    ``dtype``. With ``shared_a`` every client's A is the first r_k rows of one A of the largest
    rank, as FFA-LoRA clients have.
    """
    from peft import LoraConfig  # only the generator needs it

    generator = torch.Generator().manual_seed(seed)

    def random_a(rank: int, in_features: int) -> torch.Tensor:
        return torch.randn(rank, in_features, generator=generator) / in_features**0.5

    shared = {name: random_a(max(ranks), n) for name, (_, n) in shapes.items()} if shared_a else {}
    client_dirs = []
    for index, (rank, num_samples) in enumerate(zip(ranks, samples)):
        tensors = {}
        for name, (out_features, in_features) in shapes.items():
            lora_a = shared[name][:rank].clone() if shared_a else random_a(rank, in_features)
            tensors[f"{name}.lora_A.weight"] = lora_a.to(dtype)
            tensors[f"{name}.lora_B.weight"] = (torch.randn(out_features, rank, generator=generator) * LORA_B_STD).to(dtype)
        client_dir = directory / f"client_{index}"
        client_dir.mkdir(parents=True)
        save_file(tensors, client_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        del tensors
        LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=list(targets),
            task_type="CAUSAL_LM", base_model_name_or_path=BASE_MODEL_ID,
        ).save_pretrained(client_dir)
        (client_dir / CLIENT_INFO).write_text(json.dumps({"num_samples": num_samples}) + "\n")
        client_dirs.append(client_dir)
    return client_dirs


def _cached(directory: Path, manifest: dict, build) -> list[Path]:
    """Reuse ``directory`` if its manifest matches, else build it atomically (a killed run leaves no half cache)."""
    manifest_file = directory / CACHE_MANIFEST
    if not (manifest_file.is_file() and json.loads(manifest_file.read_text()) == manifest):
        print(f"writing {directory} ...", file=sys.stderr, flush=True)
        with atomic_directory(directory, overwrite=True) as staging:
            build(staging)
            (staging / CACHE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return sorted(directory.glob("client_*"), key=lambda path: int(path.name.split("_")[1]))


def llama_7b_client_set(cache_root: Path, targets_key: str, *, shared_a: bool, dtype: str = "float32") -> list[Path]:
    """The eight Llama-7B clients for a target set (independent or shared-A factors, stored in
    ``dtype``: float32 or bfloat16), cached."""
    targets = TARGET_SETS[targets_key]
    shapes = llama_7b_module_shapes(targets)
    manifest = {
        "format": CACHE_FORMAT, "base_model": BASE_MODEL_ID, "layers": LLAMA_7B_LAYERS, "targets": list(targets),
        "ranks": list(CLIENT_RANKS), "samples": list(DOLLY_CLIENT_SAMPLES), "shared_a": shared_a,
        "lora_b_std": LORA_B_STD, "seed": SEED, **({} if dtype == "float32" else {"dtype": dtype}),
    }
    suffix = "" if dtype == "float32" else f"_{dtype}"
    directory = cache_root / f"llama7b_{targets_key}_{'shared_a' if shared_a else 'independent'}{suffix}"
    return _cached(
        directory, manifest,
        lambda staging: write_client_set(
            staging, shapes, targets, ranks=CLIENT_RANKS, samples=DOLLY_CLIENT_SAMPLES, shared_a=shared_a, seed=SEED,
            dtype=getattr(torch, dtype),
        ),
    )


def module_subset(client_dirs: Sequence[Path], module_names: Sequence[str], directory: Path) -> list[Path]:
    """The same client adapters cut down to a few modules (configs and sample counts unchanged), cached."""
    manifest = {"format": CACHE_FORMAT, "source": [str(path) for path in client_dirs], "modules": list(module_names)}
    wanted = set(module_names)

    def build(staging: Path) -> None:
        for client_dir in client_dirs:
            subset_dir = staging / client_dir.name
            subset_dir.mkdir()
            with safe_open(client_dir / ADAPTER_WEIGHTS, framework="pt") as weights:
                tensors = {key: weights.get_tensor(key) for key in weights.keys() if key.split(".lora_")[0] in wanted}  # noqa: SIM118 (safe_open is not iterable)
            save_file(tensors, subset_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
            for name in (ADAPTER_CONFIG, CLIENT_INFO):
                shutil.copy2(client_dir / name, subset_dir / name)

    return _cached(directory, manifest, build)


def files_bytes(paths: Sequence[Path]) -> int:
    """Bytes on disk of every file under ``paths`` (the adapters as a server receives them)."""
    return sum(file.stat().st_size for path in paths for file in Path(path).rglob("*") if file.is_file())


# --- measurements, each run in a fresh process ----------------------------------------------------


def _warm_up(scratch: Path, method=None) -> None:
    """One tiny aggregation (or read), so lazy imports (peft's pattern matching) and first-call
    BLAS/LAPACK set-up happen before the baseline and stay out of the figures."""
    shapes = llama_7b_module_shapes(["q_proj"])
    tiny = {next(iter(shapes)): (16, 16)}
    client_dirs = write_client_set(scratch / "warm_up_clients", tiny, ["q_proj"], ranks=(4, 2), samples=(1, 1), shared_a=True, seed=SEED)
    if method is None:
        read_client_adapters(client_dirs)
    else:
        aggregate_adapters(client_dirs, method, scratch / "warm_up_global")
    gc.collect()


def measure_server_step(method_name: str, options: dict, client_dirs: list[Path], repeats: int, scratch_root: Path, threads: int) -> dict:
    """Wall time (each repeat) and peak memory (first repeat) of ``aggregate_adapters`` for one method."""
    torch.set_num_threads(threads)
    method = get_method(method_name, **options)
    with tempfile.TemporaryDirectory(dir=scratch_root) as scratch:  # same disk as the clients
        scratch = Path(scratch)
        _warm_up(scratch, method)
        baseline, was_reset = reset_peak_rss()
        seconds, cpu_seconds = [], []
        for repeat in range(repeats):
            out_dir = scratch / f"global_{repeat}"
            started, cpu_started = time.perf_counter(), time.process_time()
            step = aggregate_adapters(client_dirs, method, out_dir)
            seconds.append(time.perf_counter() - started)
            cpu_seconds.append(time.process_time() - cpu_started)
            if repeat == 0:
                peak = peak_rss() - baseline
                ranks = list(step.result.selected_ranks.values())
                output_bytes = files_bytes([out_dir])
            del step
            shutil.rmtree(out_dir)
            gc.collect()
    return {
        "seconds": seconds, "best_seconds": min(seconds), "cpu_seconds": cpu_seconds, "best_cpu_seconds": min(cpu_seconds),
        "peak_rss_increase_bytes": peak, "peak_was_reset": was_reset, "output_bytes": output_bytes,
        "modules": len(ranks), "total_rank": sum(ranks), "rank_min": min(ranks), "rank_max": max(ranks),
    }


def measure_io_floor(client_dirs: list[Path], repeats: int, scratch_root: Path, threads: int) -> dict:
    """Wall time and peak memory of ``read_client_adapters`` alone: no method can be faster."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(dir=scratch_root) as scratch:
        _warm_up(Path(scratch))
    baseline, was_reset = reset_peak_rss()
    seconds, cpu_seconds = [], []
    for repeat in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        adapters = read_client_adapters(client_dirs)
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
        if repeat == 0:
            peak = peak_rss() - baseline
        del adapters
        gc.collect()
    return {
        "seconds": seconds, "best_seconds": min(seconds), "cpu_seconds": cpu_seconds, "best_cpu_seconds": min(cpu_seconds),
        "peak_rss_increase_bytes": peak, "peak_was_reset": was_reset,
    }


# --- the benchmark --------------------------------------------------------------------------------


def flexlora_modules(shapes: dict[str, tuple[int, int]], per_shape: int) -> dict[tuple[int, int], list[str]]:
    """The first ``per_shape`` modules of every distinct (out, in) shape: the dense SVD's cost depends on the shape only."""
    chosen: dict[tuple[int, int], list[str]] = {}
    for name, shape in shapes.items():
        if len(chosen.setdefault(shape, [])) < per_shape:
            chosen[shape].append(name)
    return chosen


def flexlora_subsets(shapes, client_dirs, per_shape: int, cache_root: Path, targets_key: str) -> dict:
    """Per distinct shape, the client adapters cut down to the modules FlexLoRA's dense path is timed on."""
    return {
        shape: module_subset(client_dirs, names, cache_root / f"llama7b_{targets_key}_flexlora_{shape[0]}x{shape[1]}_{len(names)}")
        for shape, names in flexlora_modules(shapes, per_shape).items()
    }


def extrapolate_flexlora(shapes, subsets: dict, cache_root: Path, threads: int) -> dict:
    """Time the dense path on each cut-down client set end to end, scale to all modules of that shape.

    One repeat only: a minute per module dwarfs run-to-run noise.
    """
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes.values():
        counts[shape] = counts.get(shape, 0) + 1
    by_shape = []
    for shape, subset in subsets.items():
        print(f"flexlora: modules of shape {shape[0]}x{shape[1]} ...", file=sys.stderr, flush=True)
        measured = in_fresh_process(measure_server_step, "flexlora", {}, subset, 1, cache_root, threads)
        timed = measured["modules"]
        by_shape.append({
            "shape": list(shape), "modules_timed": timed, "modules_in_model": counts[shape],
            "seconds_timed": measured["best_seconds"], "cpu_seconds_timed": measured["best_cpu_seconds"],
            "seconds_per_module": measured["best_seconds"] / timed,
            "cpu_seconds_per_module": measured["best_cpu_seconds"] / timed,
            "peak_rss_increase_bytes": measured["peak_rss_increase_bytes"],
        })
    return {
        "extrapolated": True,
        "best_seconds": sum(entry["seconds_per_module"] * entry["modules_in_model"] for entry in by_shape),
        "best_cpu_seconds": sum(entry["cpu_seconds_per_module"] * entry["modules_in_model"] for entry in by_shape),
        "modules_timed": sum(entry["modules_timed"] for entry in by_shape),
        "peak_rss_increase_bytes": max(entry["peak_rss_increase_bytes"] for entry in by_shape),
        "by_shape": by_shape,
        "repeats": 1,
    }


def run_benchmark(targets_key: str, per_shape: int, repeats: int, cache_root: Path, threads: int) -> dict:
    machine = machine_facts(threads)
    cache_root.mkdir(parents=True, exist_ok=True)
    targets = TARGET_SETS[targets_key]
    shapes = llama_7b_module_shapes(targets)
    client_sets = {
        "independent": llama_7b_client_set(cache_root, targets_key, shared_a=False),
        "shared_a": llama_7b_client_set(cache_root, targets_key, shared_a=True),
    }
    client_bytes = {key: files_bytes(dirs) for key, dirs in client_sets.items()}
    # Every input is written before anything is timed, so a failure cannot waste a long run.
    subsets = flexlora_subsets(shapes, client_sets["independent"], per_shape, cache_root, targets_key) if per_shape > 0 else {}

    io_floor = {}
    for key, dirs in client_sets.items():
        print(f"I/O floor ({key} clients) ...", file=sys.stderr, flush=True)
        io_floor[key] = in_fresh_process(measure_io_floor, dirs, repeats, cache_root, threads)
    methods = {}
    for label, name, options, shared_a in FULL_METHODS:
        print(f"{label} ...", file=sys.stderr, flush=True)
        client_set = "shared_a" if shared_a else "independent"
        result = in_fresh_process(measure_server_step, name, options, client_sets[client_set], repeats, cache_root, threads)
        methods[label] = {**result, "method": name, "options": options, "client_set": client_set, "extrapolated": False}
    if subsets:
        methods["flexlora (dense)"] = {
            **extrapolate_flexlora(shapes, subsets, cache_root, threads),
            "method": "flexlora", "options": {}, "client_set": "independent",
        }

    florist, fedit = methods["florist τ=0.9"], methods["fedit"]
    ratios = {
        "florist_vs_fedit_time": florist["best_seconds"] / fedit["best_seconds"],
        "florist_vs_fedit_cpu_time": florist["best_cpu_seconds"] / fedit["best_cpu_seconds"],
        "florist_peak_over_client_bytes": florist["peak_rss_increase_bytes"] / client_bytes["independent"],
    }
    targets_met = {
        "florist_within_3x_fedit": ratios["florist_vs_fedit_time"] <= 3.0,
        "florist_peak_under_2x_clients": ratios["florist_peak_over_client_bytes"] < 2.0,
    }
    if "flexlora (dense)" in methods:
        flexlora = methods["flexlora (dense)"]
        ratios["flexlora_over_florist_time"] = flexlora["best_seconds"] / florist["best_seconds"]
        ratios["flexlora_over_florist_cpu_time"] = flexlora["best_cpu_seconds"] / florist["best_cpu_seconds"]
        targets_met["florist_100x_faster_than_flexlora"] = ratios["flexlora_over_florist_time"] >= 100.0
    return {
        "benchmark": "florist-hf/aggregation",
        "machine": {**machine, "load_average_at_end": os.getloadavg()},
        "setting": {
            "model_shapes": "Llama-7B", "layers": LLAMA_7B_LAYERS, "targets": list(targets), "modules": len(shapes),
            "client_ranks": list(CLIENT_RANKS), "client_samples": list(DOLLY_CLIENT_SAMPLES), "dtype": "float32",
            "repeats": repeats, "flexlora_modules_per_shape": per_shape,
        },
        "client_sets": {key: {"dirs": [str(d) for d in dirs], "bytes": client_bytes[key]} for key, dirs in client_sets.items()},
        "io_floor": io_floor,
        "methods": methods,
        "ratios": ratios,
        "targets_met": targets_met,
    }


def markdown_report(report: dict) -> str:
    setting, machine = report["setting"], report["machine"]
    client_mib = {key: value["bytes"] / MIB for key, value in report["client_sets"].items()}
    lines = [
        f"### Llama-7B {'+'.join(setting['targets'])}: {setting['modules']} modules, 8 clients, ranks {setting['client_ranks']}",
        "",
        (
            f"Machine: {machine['cpu_model']}, {machine['cores']} cores, {machine['memory_gib']} GiB, torch {machine['torch']} "
            f"({machine['torch_threads']} threads, {machine['blas']}), numpy {machine.get('numpy')} ({machine.get('numpy_blas')}), "
            f"{machine['date_utc']}; 1-min load average "
            f"{machine['load_average_at_start'][0]:.2f} at start, {machine['load_average_at_end'][0]:.2f} at end"
            + (
                " (above the core count: other jobs shared the cores)."
                if max(machine["load_average_at_start"][0], machine["load_average_at_end"][0]) > machine["cores"]
                else "."
            )
        ),
        (
            f"Client adapters on disk: {client_mib['independent']:.1f} MiB (FFA's shared-A set: {client_mib['shared_a']:.1f} MiB). "
            f"Times: best of {setting['repeats']} (CPU time: user+system of all threads); memory: peak RSS rise "
            "during the first step, in a fresh process."
        ),
        "",
        (
            "| server step | wall time (s) | CPU time (s) | × I/O floor (wall) | peak RSS rise (MiB) | peak / client adapters "
            "| global adapter (MiB) | global rank per module |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, floor in report["io_floor"].items():
        peak = floor["peak_rss_increase_bytes"] / MIB
        lines.append(
            f"| I/O floor: read_client_adapters ({key.replace('_', '-')} clients) | {floor['best_seconds']:.2f} | "
            f"{floor['best_cpu_seconds']:.2f} | 1.0 | {peak:,.0f} | {peak / client_mib[key]:.2f} | – | – |"
        )
    for label, result in report["methods"].items():
        floor = report["io_floor"][result["client_set"]]["best_seconds"]
        peak = result["peak_rss_increase_bytes"] / MIB
        if result["extrapolated"]:
            timed = ", ".join(
                f"{entry['seconds_per_module']:.1f} s/module × {entry['modules_in_model']} ({entry['shape'][0]}×{entry['shape'][1]})"
                for entry in result["by_shape"]
            )
            lines.append(
                f"| {label}: **extrapolated** from {result['modules_timed']} timed modules: {timed} | "
                f"{result['best_seconds']:,.0f} | {result['best_cpu_seconds']:,.0f} | {result['best_seconds'] / floor:,.0f} | "
                f"{peak:,.0f} (the cut-down run) | – | – | {max(setting['client_ranks'])} global, r_k per client |"
            )
            continue
        ranks = f"{result['rank_min']}" if result["rank_min"] == result["rank_max"] else f"{result['rank_min']}–{result['rank_max']}"
        lines.append(
            f"| {label} | {result['best_seconds']:.2f} | {result['best_cpu_seconds']:.2f} | {result['best_seconds'] / floor:.1f} | "
            f"{peak:,.0f} | {peak / client_mib[result['client_set']]:.2f} | {result['output_bytes'] / MIB:,.1f} | {ranks} |"
        )
    ratios, met = report["ratios"], report["targets_met"]
    lines += ["", "| target | measured (wall) | measured (CPU) | met (wall) |", "|---|---|---|---|"]
    if "flexlora_over_florist_time" in ratios:
        lines.append(
            f"| FLoRIST ≥ 100× faster than FlexLoRA's dense path (extrapolated) | {ratios['flexlora_over_florist_time']:,.0f}× | "
            f"{ratios['flexlora_over_florist_cpu_time']:,.0f}× | {'yes' if met['florist_100x_faster_than_flexlora'] else 'NO'} |"
        )
    lines.append(
        f"| FLoRIST within 3× of FedIT | {ratios['florist_vs_fedit_time']:.2f}× | {ratios['florist_vs_fedit_cpu_time']:.2f}× | "
        f"{'yes' if met['florist_within_3x_fedit'] else 'NO'} |"
    )
    lines.append(
        f"| FLoRIST peak memory < 2× client adapters | {ratios['florist_peak_over_client_bytes']:.2f}× | – | "
        f"{'yes' if met['florist_peak_under_2x_clients'] else 'NO'} |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", choices=sorted(TARGET_SETS), default="qv", help="qv: q_proj,v_proj; all: every linear layer")
    parser.add_argument("--flexlora-modules", type=int, default=2, help="FlexLoRA modules timed per distinct module shape (0: skip)")
    parser.add_argument("--repeats", type=int, default=3, help="timed server steps per method (best is reported)")
    parser.add_argument("--json", type=Path, help="also write the full results here")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's, one per core)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the client adapters are generated and reused")
    scaling = parser.add_argument_group("FLoRIST against the number of clients (benchmarks/aggregation_scaling.py)")
    scaling.add_argument("--clients", help="comma-separated client counts, e.g. 8,32,128,256: run the scaling benchmark instead")
    scaling.add_argument("--kinds", default="random,realistic", help="client updates: random (worst case), realistic")
    scaling.add_argument("--tolerances", default="0,1e-2", help="streaming tolerances to run beside stacked")
    scaling.add_argument("--layers", type=int, default=1, help="decoder layers timed (× 2 modules), scaled to 32")
    args = parser.parse_args()
    if args.repeats < 1 or args.flexlora_modules < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be ≥ 1, --flexlora-modules ≥ 0")
    if args.clients:
        from benchmarks.aggregation_scaling import markdown_report as scaling_markdown
        from benchmarks.aggregation_scaling import run_scaling

        report = run_scaling([int(k) for k in args.clients.split(",")], args.kinds.split(","),
                             [float(t) for t in args.tolerances.split(",")], args.layers, args.threads)
        print(scaling_markdown(report))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return

    report = run_benchmark(args.targets, args.flexlora_modules, args.repeats, args.cache.resolve(), args.threads)
    print(markdown_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
