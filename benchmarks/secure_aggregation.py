"""Secure against plain FLoRIST: the server's work, one client's work, and the bytes each client sends.

    python -m benchmarks.secure_aggregation [--shape llama7b|smollm2] [--layers 2] [--dtype bf16|fp32]
        [--threads 1] [--repeats 2] [--json OUT]
    python -m benchmarks.secure_aggregation --run RUN_DIR [--round 1]   # a run's real client adapters (+ held-out loss)
    python -m benchmarks.secure_aggregation --run RUN_DIR --central-dp 0,1e-4,1e-3 [--clip 8]   # central DP's cost there

Eight clients with the paper's heterogeneous ranks [64, 32, 16, 16, 8, 8, 4, 4] (factors in
``--dtype``, bf16 by default as trained adapters are stored; B scaled like a trained update, the
Dolly sample counts as weights) on the q_proj and v_proj of ``--layers`` layers: Llama-7B
(4096×4096 both) or SmolLM2-135M (576×576 and 192×576, GQA). Timed, best of ``--repeats`` (plain
and secure alternating), in memory (no adapter files; the plain side is `Florist.aggregate`), in
wall and CPU seconds (CPU time is what to compare on a machine other jobs share):
- plain: FLoRIST τ = 0.9 on the stacked factors, its kept factors computed for the clients' dtype
  as `server.aggregate_adapters` asks (``result_dtype``: fp32 products for bf16 adapters);
- secure, server: `server_step.secure_result` itself, less the clients' calls: what `SecAggServer`
  does in both sums (collect keys, route shares, add each masked input as it arrives, rebuild the
  self masks and take them off, decode) plus Q = orth(Y) and FLoRIST on Q·Z, each module's on
  worker threads as its sum is unmasked when ``--threads`` > 1; on one thread also split into
  SecAgg+'s own work (everything but the next two) and the linear algebra (Q, FLoRIST);
- secure, one client: its two sketches, fixed-point encoding and masking (one AES-128 keystream per
  other client plus its own), key agreement, Shamir sharing and encryption, per client on average.
Each client computes its arrays when it masks them (one client's arrays held at a time, as in
`florist-hf run`), so all 32 layers fit in memory. Bytes up per client: every message it sends
(masked 8-byte words, keys, shares) against the plain round's (m+n)·r_k factors in ``--dtype``;
the secure downlink adds Q ((m+1)·p fp64 per module: its reflectors and their scalars). The JSON
goes to stdout, a one-line summary (UTC time, load, wall and CPU of both sides) to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from benchmarks.measure import machine_record
from florist_hf.adapters import LoraAdapter, without_factors
from florist_hf.aggregation import ClientModule, get_method
from florist_hf.rundir import RECIPE_RECORD, RunPaths
from florist_hf.secure.communication import BASIS_BYTES_PER_PARAM, basis_params
from florist_hf.secure.local import SecureSum
from florist_hf.secure.protocol import SecAggClient, SecAggServer, run_stages
from florist_hf.secure.server_step import SecureRound, secure_result
from florist_hf.secure.settings import SecAggSettings

RANKS = [64, 32, 16, 16, 8, 8, 4, 4]
DOLLY_SAMPLES = [1579, 685, 3775, 607, 1149, 2192, 4000, 711]  # weights; only their ratios matter
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SHAPES = {"llama7b": {"q_proj": (4096, 4096), "v_proj": (4096, 4096)},
          "smollm2": {"q_proj": (576, 576), "v_proj": (192, 576)}}


def make_clients(shape: str, layers: int, dtype: torch.dtype = torch.bfloat16) -> list[dict[str, ClientModule]]:
    """The clients' factors as a server reads them: stored in ``dtype`` (bf16, as trained adapters are)."""
    generator = torch.Generator().manual_seed(0)
    clients = []
    for rank in RANKS:
        modules = {}
        for layer in range(layers):
            for target, (m, n) in SHAPES[shape].items():
                lora_a = torch.randn(rank, n, generator=generator) / n**0.5
                lora_b = 0.01 * torch.randn(m, rank, generator=generator)
                modules[f"base_model.model.model.layers.{layer}.self_attn.{target}"] = ClientModule(
                    lora_a.to(dtype), lora_b.to(dtype), 2.0)
        clients.append(modules)
    return clients


class Clock:
    """Wall and CPU seconds per side; a side timed inside another's call (a client masking while the
    server pulls its input) counts for the inner side only."""

    def __init__(self):
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []

    def __call__(self, side: str, function, *args):
        frame = [side, time.perf_counter(), time.process_time(), 0.0, 0.0]  # side, wall0, cpu0, inner wall, inner cpu
        self._stack.append(frame)
        try:
            return function(*args)
        finally:
            self._stack.pop()
            wall, cpu = time.perf_counter() - frame[1], time.process_time() - frame[2]
            self.wall[side] += wall - frame[3]
            self.cpu[side] += cpu - frame[4]
            if self._stack:
                self._stack[-1][3] += wall
                self._stack[-1][4] += cpu


def secure_round(clients, weights, threshold: float):
    """Both sums through the protocol and the server's whole in-memory step (`secure_result`: the
    stages, unmasking, Q = orth(Y), FLoRIST on Q·Z, each module's work on worker threads as its
    arrays are unmasked), timing each side: returns (Clock, bytes up per client, Q's bytes).

    Each client computes its arrays when it masks them and the server adds each masked input as it
    arrives, as in `florist-hf run`, so that one client's arrays are held at a time."""
    clock = Clock()
    adapters = [LoraAdapter(Path(f"client_{k}"), {}, modules, None, next(iter(modules.values())).lora_a.dtype)
                for k, modules in enumerate(clients)]

    def run_sum(task, settings, traffic, jobs=None):
        server = SecAggServer(range(len(clients)), settings)
        parties = {k: SecAggClient(k, partial(task.compute, k, clients[k])) for k in range(len(clients))}

        def exchange(stage, requests):
            for k, request in requests.items():
                message = clock("client", parties[k].respond, stage, request)
                traffic(message)
                yield message
                del message  # added by the server: not held while the next client computes

        if jobs is not None and jobs.then is not None and jobs.add_threads == 1:
            # One thread: each array's work runs inline, inside the server's clock, so it can be timed apart.
            jobs = replace(jobs, then=partial(clock, "server linear algebra", jobs.then))
        return SecureSum(run_stages(server, exchange, jobs), server.survivors)

    method = get_method("florist", threshold=threshold)
    built = clock("server", secure_result, [without_factors(a) for a in adapters], run_sum, method,
                  SecureRound(SecAggSettings(), seed=1), weights)
    basis_bytes = basis_params(method, built.plans) * BASIS_BYTES_PER_PARAM
    return clock, built.traffic.up, basis_bytes


def real_clients(run_dir: str, round_index: int, out_dir: str, threshold: float, with_heldout: bool = True) -> dict:
    """A run's kept client adapters aggregated plain and secure (whole server steps, files to files):
    the ranks FLoRIST selects, the secure global's error against the plain one, both times, each
    client's secure work (both sums, in memory) beside its training time in the run, the bytes each
    client sends and receives, and (round 1) the held-out loss of each global on the run's base."""
    import shutil

    from florist_hf.adapters import read_adapter
    from florist_hf.secure.server_step import secure_aggregate_adapters
    from florist_hf.server import aggregate_adapters

    dirs = RunPaths(Path(run_dir)).client_dirs(round_index)
    method = get_method("florist", threshold=threshold)
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    plain = aggregate_adapters(dirs, method, out / "plain")
    secure = secure_aggregate_adapters(dirs, method, out / "secure", SecureRound(SecAggSettings(), seed=round_index))

    def updates(directory):
        adapter = read_adapter(directory)
        return {name: m.scale * (m.lora_b.double() @ m.lora_a.double()) for name, m in adapter.modules.items()}

    ours, theirs = updates(out / "secure"), updates(out / "plain")
    heldout = (heldout_losses(run_dir, out) if with_heldout and (Path(run_dir) / RECIPE_RECORD).exists() and round_index == 1
               else None)
    errors = [float((ours[n] - theirs[n]).norm() / theirs[n].norm()) for n in theirs]
    fresh = [read_adapter(d) for d in dirs]  # read anew: the plain server step released the factors it read
    exact = method.aggregate([a.modules for a in fresh], [a.num_samples for a in fresh])
    fp64_errors = [float((secure.result.modules[n].delta_weight - m.delta_weight).norm() / m.delta_weight.norm())
                   for n, m in exact.modules.items()]
    ranks_plain, ranks_secure = plain.result.selected_ranks, secure.result.selected_ranks
    comm = secure.sidecar["communication"]
    # Each client's side of both sums on its real adapter (sketches, encoding, masking, keys and
    # shares), against its training in the run (client.json; wall seconds, as the run recorded them).
    clock, _, _ = secure_round([a.modules for a in fresh], plain.result.client_weights, threshold)
    train_seconds = [json.loads((d / "client.json").read_text()).get("train_seconds") for d in dirs]
    return {
        **machine_record(), "run": str(run_dir), "round": round_index, "clients": len(dirs), "modules": len(theirs),
        "same_ranks": ranks_plain == ranks_secure, "total_rank_plain": sum(ranks_plain.values()),
        "total_rank_secure": sum(ranks_secure.values()),
        "modules_with_other_rank": sorted(n for n in ranks_plain if ranks_plain[n] != ranks_secure[n]),
        "max_relative_error_fp64": max(fp64_errors), "max_relative_error_written": max(errors),
        "heldout_loss": heldout,
        "plain_server_seconds": plain.sidecar["server_seconds"],
        "secure_seconds_all_clients_and_server": secure.sidecar["server_seconds"],
        "uplink_bytes_total": {"secure": comm["uplink_bytes_total"], "plain": comm["plain"]["uplink_bytes_total"]},
        "downlink_bytes_total": {"secure": comm["downlink_bytes_total"], "plain": comm["plain"]["downlink_bytes_total"]},
        "uplink_bytes": {"secure": comm["uplink_bytes"], "plain": comm["plain"]["uplink_bytes"]},
        "downlink_bytes": {"secure": comm["downlink_bytes"], "plain": comm["plain"]["downlink_bytes"]},
        "client_train_seconds": train_seconds,
        "secure_client_s": clock.wall["client"] / len(dirs), "secure_client_cpu_s": clock.cpu["client"] / len(dirs),
        "secure_server_s": clock.wall["server"] + clock.wall["server linear algebra"],
        "secure_server_cpu_s": clock.cpu["server"] + clock.cpu["server linear algebra"],
    }


def central_dp_sweep(run_dir: str, round_index: int, out_dir: str, threshold: float, sigmas: list[float], clip: float,
                     with_heldout: bool = True) -> dict:
    """A run's kept client adapters aggregated by secure FLoRIST under central DP at each noise multiplier
    (clip ``clip``, the denominator the round's clients, uniform weights, the participation-free sketch
    width), against plain FLoRIST of the same bounded, uniformly weighted updates: each global's total
    rank, the modules whose update is zero (nothing above the noise), its update's relative error over
    all modules, and (round 1) its held-out loss."""
    import shutil

    from florist_hf.adapters import read_adapter
    from florist_hf.aggregation.bounding import bound_client
    from florist_hf.aggregation.sketch import participation_free_columns
    from florist_hf.privacy import epsilon
    from florist_hf.secure.server_step import secure_aggregate_adapters
    from florist_hf.server import UpdateBounding

    dirs = RunPaths(Path(run_dir)).client_dirs(round_index)
    method, out = get_method("florist", threshold=threshold), Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    fresh = [read_adapter(d) for d in dirs]
    bounded = [bound_client(a.modules, clip)[0] for a in fresh]
    clean = method.aggregate(bounded, [1.0] * len(dirs))
    columns = participation_free_columns([next(iter(a.modules.values())).rank for a in fresh], len(dirs))
    rows = []
    for sigma in sigmas:
        central = UpdateBounding(clip=clip, noise_multiplier=sigma, denominator=len(dirs), noise_seed=20261206)
        step = secure_aggregate_adapters(dirs, method, out / f"sigma_{sigma:g}", SecureRound(
            SecAggSettings(), seed=round_index, clip=clip, central_dp=central, sketch_columns=columns))
        modules = step.result.modules
        error = sum(float((modules[n].delta_weight - m.delta_weight).square().sum()) for n, m in clean.modules.items())
        rows.append({"noise_multiplier": sigma, "noise_std": step.sidecar["bounding"]["central_dp"]["noise_std"],
                     "epsilon_one_round": epsilon(sigma, 1.0, 1, 1e-3, "rdp") if sigma > 0 else None,
                     "total_rank": sum(step.result.selected_ranks.values()),
                     "zero_modules": sum(float(m.lora_b.abs().max()) == 0.0 for m in modules.values()),
                     "relative_error": (error / sum(float(m.delta_weight.square().sum()) for m in clean.modules.values())) ** 0.5})
    names = [f"sigma_{sigma:g}" for sigma in sigmas]
    heldout = (heldout_losses(run_dir, out, names) if with_heldout and (Path(run_dir) / RECIPE_RECORD).exists()
               and round_index == 1 else None)
    for row, name in zip(rows, names):
        row["heldout_loss"] = None if heldout is None else heldout[name]
    return {**machine_record(), "run": str(run_dir), "round": round_index, "clients": len(dirs), "clip": clip,
            "client_update_norms": [bound_client(a.modules, None)[1].norm for a in fresh],
            "clean_total_rank": sum(clean.selected_ranks.values()), "delta": 1e-3, "rows": rows}


def heldout_losses(run_dir, out, names=("plain", "secure")) -> dict:
    """The run's held-out loss (its recipe's test records, response tokens) of the base with each
    round-1 global adapter on top, by directory name under ``out`` (a merge-style round 1 holds no earlier state)."""
    from florist_hf.data import prepare_client_data
    from florist_hf.heldout import global_heldout_loss
    from florist_hf.loading import load_tokenizer, prepare_base_model
    from florist_hf.recipe import Recipe

    recipe = Recipe.from_record(json.loads((Path(run_dir) / RECIPE_RECORD).read_text()))
    base = prepare_base_model(recipe, Path(run_dir))
    _, test_records = prepare_client_data(recipe)
    tokenizer = load_tokenizer(base, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    return {name: global_heldout_loss(recipe, base, tokenizer, test_records, Path(out) / "heldout_work",
                                      adapter=Path(out) / name) for name in names} | {"records": len(test_records)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama7b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="the client factors' dtype")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--run", help="a run directory whose kept client adapters to aggregate plain and secure")
    parser.add_argument("--round", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--no-heldout", action="store_true", help="--run: skip the held-out losses of both globals")
    parser.add_argument("--out", default="benchmarks/_cache/secure_real")
    parser.add_argument("--central-dp", help="--run: noise multipliers (comma-separated) of secure FLoRIST under central DP")
    parser.add_argument("--clip", type=float, default=8.0, help="--central-dp: clip_update_norm")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.run:
        result = (central_dp_sweep(args.run, args.round, args.out, args.threshold,
                                   [float(x) for x in args.central_dp.split(",")], args.clip, not args.no_heldout)
                  if args.central_dp else real_clients(args.run, args.round, args.out, args.threshold, not args.no_heldout))
        print(json.dumps(result, indent=1))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(result, handle, indent=1)
        return result
    clients = make_clients(args.shape, args.layers, DTYPES[args.dtype])
    weights = [w / sum(DOLLY_SAMPLES) for w in DOLLY_SAMPLES]
    method = get_method("florist", threshold=0.9)
    plain_wall, plain_cpu, runs = [], [], []
    # Alternating: plain FLoRIST's time depends on the allocator's state (fresh pages or reused ones, up to
    # ~1.5× here), which each secure round changes; the best of each then compares like with like.
    for _ in range(args.repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        method.aggregate(clients, weights, result_dtype=DTYPES[args.dtype])
        plain_wall.append(time.perf_counter() - started)
        plain_cpu.append(time.process_time() - started_cpu)
        runs.append(secure_round(clients, weights, 0.9))
    # The server's linear algebra (Q = orth(Y), FLoRIST on Q·Z) is timed apart on one thread only (`secure_round`).
    totals = [r[0].wall["server"] + r[0].wall["server linear algebra"] for r in runs]
    best = runs[totals.index(min(totals))][0]
    server_wall = best.wall["server"] + best.wall["server linear algebra"]
    server_cpu = best.cpu["server"] + best.cpu["server linear algebra"]
    split = args.threads == 1
    client_wall = min(r[0].wall["client"] for r in runs) / len(clients)
    client_cpu = min(r[0].cpu["client"] for r in runs) / len(clients)
    up, basis_bytes = runs[0][1], runs[0][2]
    bytes_per_value = torch.finfo(DTYPES[args.dtype]).bits // 8
    plain_up = [sum((m.shape[0] + m.shape[1]) * m.rank * bytes_per_value for m in c.values()) for c in clients]
    result = {
        **machine_record(), "shape": args.shape, "modules": len(clients[0]), "threads": args.threads,
        "dtype": args.dtype, "repeats": args.repeats,
        "plain_florist_s": min(plain_wall), "plain_florist_cpu_s": min(plain_cpu),
        "secure_server_s": server_wall, "secure_server_cpu_s": server_cpu,
        # Of the best run's server step, on one thread: SecAgg+'s own work (stages, adding the masked inputs,
        # Shamir, removing the masks, decoding) and the linear algebra on the sums.
        "secure_server_protocol_s": best.wall["server"] if split else None,
        "secure_server_linear_algebra_s": best.wall["server linear algebra"] if split else None,
        "secure_client_s": client_wall, "secure_client_cpu_s": client_cpu,
        "server_ratio": server_wall / min(plain_wall), "server_ratio_cpu": server_cpu / min(plain_cpu),
        "uplink_bytes_secure": up, "uplink_bytes_plain": plain_up, "basis_downlink_bytes": basis_bytes,
    }
    print(json.dumps(result, indent=1))
    print(f"{result['date']} load {result['load_average'][0]:.2f}, {args.threads} thread(s), {result['modules']} modules: "
          f"plain FLoRIST {result['plain_florist_s']:.3f} s wall / {result['plain_florist_cpu_s']:.3f} s CPU; secure "
          f"server {server_wall:.3f} s wall / {server_cpu:.3f} s CPU: {result['server_ratio']:.2f}× plain wall, "
          f"{result['server_ratio_cpu']:.2f}× CPU"
          + (f" (protocol {best.wall['server']:.3f} s, linear algebra {best.wall['server linear algebra']:.3f} s)"
             if split else ""), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    return result


if __name__ == "__main__":
    main()
