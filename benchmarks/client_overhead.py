"""Federation overhead of one client round: the same Trainer with and without FederatedCallback.

    python -m benchmarks.client_overhead [--repeats 3] [--steps 40]

Both runs build the same model, data and TrainingArguments; the federated one also holds the
previous round's global update beside the base when the Trainer is built and exports the PEFT adapter at
train end (what a FLoRIST client does every round). Reports tokens/s of Trainer construction +
``trainer.train()`` wall time, median over repeats, run alternately so machine noise hits both.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoTokenizer
from transformers.utils import logging as transformers_logging

from florist_hf.aggregation import get_method
from florist_hf.clients.callback import ClientRound, FederatedCallback
from florist_hf.clients.run import build_client_trainer, build_lora_model
from florist_hf.data import demo_records, tokenize_records
from florist_hf.global_state import state_of_adapters, write_global_state
from florist_hf.server import aggregate_adapters
from florist_hf.tiny import build_tiny_llama

TRAINING = {"per_device_train_batch_size": 8, "learning_rate": 3e-3, "logging_steps": 10}


def timed_round(base: Path, tokenizer, dataset, work: Path, *, steps: int, plan: ClientRound | None) -> float:
    model = build_lora_model(str(base), rank=8, alpha=16, target_modules=["q_proj", "v_proj"], dropout=0.05, use_rslora=False, seed=0)
    callbacks = [FederatedCallback(plan)] if plan is not None else []
    # The callback installs the global state when the Trainer is built, so construction is timed too.
    started = time.perf_counter()
    trainer = build_client_trainer(
        model, tokenizer, dataset, training={**TRAINING, "max_steps": steps}, work_dir=work, seed=0, callbacks=callbacks
    )
    trainer.train()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    transformers_logging.set_verbosity_error()
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        base = build_tiny_llama(scratch / "base", num_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4)
        tokenizer = AutoTokenizer.from_pretrained(base)
        dataset = tokenize_records(demo_records(), tokenizer, cutoff_len=128)
        tokens_per_step = TRAINING["per_device_train_batch_size"] * statistics.mean(len(ids) for ids in dataset["input_ids"])

        # A previous round's global update for the federated client to train on top of.
        warmup = ClientRound(client_id=0, round=1, rank=8, num_samples=len(dataset), export_dir=scratch / "r1_client")
        timed_round(base, tokenizer, dataset, scratch / "work", steps=5, plan=warmup)
        aggregate_adapters([warmup.export_dir], get_method("florist", threshold=0.9), scratch / "r1_global")
        state_dir = write_global_state(state_of_adapters([scratch / "r1_global"]), scratch / "r1_state")

        plain, federated = [], []
        for repeat in range(args.repeats):
            plain.append(timed_round(base, tokenizer, dataset, scratch / "work", steps=args.steps, plan=None))
            plan = ClientRound(
                client_id=0, round=2, rank=8, num_samples=len(dataset), export_dir=scratch / f"r2_client_{repeat}",
                global_state=state_dir,
            )
            federated.append(timed_round(base, tokenizer, dataset, scratch / "work", steps=args.steps, plan=plan))

    tokens = tokens_per_step * args.steps
    plain_rate, federated_rate = tokens / statistics.median(plain), tokens / statistics.median(federated)
    overhead = (plain_rate - federated_rate) / plain_rate * 100
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"model: tiny Llama 4x256, LoRA r=8 on q,v; {args.steps} steps x {tokens_per_step:.0f} tokens; median of {args.repeats}")
    print("| client round | wall time (s) | tokens/s |")
    print("|---|---|---|")
    print(f"| Trainer alone | {statistics.median(plain):.2f} | {plain_rate:,.0f} |")
    print(f"| Trainer + FederatedCallback (merge 1 global, export adapter) | {statistics.median(federated):.2f} | {federated_rate:,.0f} |")
    print(f"overhead: {overhead:.1f}% (target < 5%)")


if __name__ == "__main__":
    main()
