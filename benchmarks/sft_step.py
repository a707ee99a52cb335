"""Where an SFT client step's time goes against a Trainer client's: the CPU time of one loss and backward on
identical batches, in one process, one torch thread, the kinds alternated batch by batch.

    python -m benchmarks.sft_step [--repeats 3] [--batches 3] [--data PATH] [--json OUT]

The setting of `benchmarks.trainer_lead` (SmolLM2-135M-Instruct from its GGUF file, LoRA r 8 on q_proj and
v_proj, batch 4, cutoff 256, the Alpaca prompt with the answers alone trained on, records of the paper's
Dolly split), each client built by `clients.run.build_client_trainer` with the precision the client takes
here (bf16 autocast on a CPU with native bf16). The batches are the SFT client's first ones (its collator's
``input_ids``, ``attention_mask`` and ``labels``), given to every kind alike:

- ``trainer``: the stock Trainer client (the model's full logits and its cross-entropy);
- ``sft_trl``: the SFT client with TRL's fused LM head as TRL runs it on a CPU (every position scored,
  32,768-word tiles);
- ``sft``: the SFT client as florist-hf runs it (`clients.fused_head`: the labelled positions alone,
  `CPU_VOCAB_TILE`-wide tiles).

Besides the whole loss and backward (``step``), the LM head and loss alone (``head``: forward and backward
from the batch's final hidden states) in the three forms. CPU seconds (``time.process_time``), medians over
``--repeats``; the machine's load average at the start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from benchmarks.measure import machine_record
from benchmarks.trainer_lead import DATA, recipe

KINDS = ("trainer", "sft_trl", "sft")


def client_trainers(data: Path, work: Path) -> dict:
    """The Trainer client's and the SFT client's trainers of client 0, round 1, on fresh LoRA models."""
    from florist_hf.clients.config import client_training
    from florist_hf.clients.run import build_client_trainer, build_lora_model, prepare_shard
    from florist_hf.data import load_records
    from florist_hf.loading import load_tokenizer, resolve_base
    from florist_hf.recipe import load_recipe

    trainers = {}
    for kind in ("trainer", "sft"):
        path = work / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(recipe(data, work / f"run-{kind}", kind)))
        loaded = load_recipe(path)
        base = resolve_base(loaded.model.name_or_path, loaded.model.gguf_file)
        tokenizer = load_tokenizer(base)
        records = load_records(loaded.data.source)[: loaded.data.max_samples_per_client]
        model = build_lora_model(base, rank=8, alpha=8, target_modules=loaded.lora.target_modules, dropout=0.0,
                                 use_rslora=False, seed=0)
        trainers[kind] = build_client_trainer(model, tokenizer, prepare_shard(loaded, tokenizer, records),
                                              training=client_training(loaded, 0, 1), work_dir=work / kind, seed=0,
                                              trainer=kind)
    return trainers


class FusedHead:
    """Switches TRL's fused head between florist-hf's CPU tuning and TRL's own CPU path."""

    def __init__(self):
        from trl.trainer import utils as trl_utils

        from florist_hf.clients.fused_head import tune_fused_lm_head_for_cpu

        if not tune_fused_lm_head_for_cpu():
            raise SystemExit("the installed TRL's fused LM head is not the one clients/fused_head.py tunes")
        self.module = trl_utils
        self.tuned = trl_utils._use_triton, trl_utils._ChunkedLogProbFunction
        self.trls = self.tuned[0].trl_answer, self.tuned[1].function

    def use(self, tuned: bool) -> None:
        self.module._use_triton, self.module._ChunkedLogProbFunction = self.tuned if tuned else self.trls


def step_seconds(trainer, batch) -> tuple[float, float]:
    """CPU seconds of one loss and backward as the Trainer takes them (autocast included), and the loss."""
    trainer.model.train()
    started = time.process_time()
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    seconds = time.process_time() - started
    trainer.model.zero_grad(set_to_none=True)
    return seconds, float(loss.detach())


def head_seconds(trainer, hidden, labels, fused: bool) -> float:
    """CPU seconds of the LM head and the summed loss alone, forward and backward, from ``hidden``."""
    import torch
    import torch.nn.functional as F

    from trl.trainer import utils as trl_utils

    base = trainer.model.get_base_model()
    weight = base.get_output_embeddings().weight
    hidden = hidden.detach().requires_grad_(True)
    started = time.process_time()
    with trainer.compute_loss_context_manager():
        shifted, targets = hidden[:, :-1], labels[:, 1:]
        if fused:  # what add_fused_lm_head's forward does from the final hidden states
            mask = targets != -100
            if trl_utils._use_triton(hidden.device):
                rows, row_targets = shifted[mask], targets[mask]
            else:
                rows, row_targets = shifted.reshape(-1, shifted.size(-1)), targets.clamp(min=0).reshape(-1)
            log_probs = trl_utils._ChunkedLogProbFunction.apply(
                rows, weight, None, row_targets, 1.0, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                ("log_probs", "entropy", "is_top1"))[0]
            loss = -log_probs.sum()
        else:  # the model's own head and its causal-LM loss (logits upcast to fp32)
            logits = F.linear(shifted, weight).float()
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                                   reduction="sum")
    loss.backward()
    return time.process_time() - started


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: the paper's Dolly split is not here; give --data a Dolly-schema JSON file")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        trainers = client_trainers(args.data, Path(scratch))
        head = FusedHead()
        loader = iter(trainers["sft"].get_train_dataloader())
        batches = [{key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
                   for batch in (next(loader) for _ in range(args.batches))]
        hidden = []
        with torch.no_grad(), trainers["sft"].compute_loss_context_manager():
            for batch in batches:
                backbone = trainers["sft"].model.get_base_model().model
                hidden.append(backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                              .last_hidden_state.float())
        started, load_before = datetime.now(timezone.utc), os.getloadavg()
        seconds = {(part, kind, index): [] for part in ("step", "head") for kind in KINDS for index in range(len(batches))}
        losses = {}
        for _ in range(args.repeats):
            for index, batch in enumerate(batches):
                for kind in KINDS:
                    head.use(kind == "sft")
                    trainer = trainers["trainer" if kind == "trainer" else "sft"]
                    step, loss = step_seconds(trainer, batch)
                    seconds[("step", kind, index)].append(step)
                    losses[(kind, index)] = loss
                    seconds[("head", kind, index)].append(head_seconds(trainer, hidden[index], batch["labels"],
                                                                       fused=kind != "trainer"))
        head.use(True)
        ended = datetime.now(timezone.utc)
    rows = []
    for index, batch in enumerate(batches):
        labels = batch["labels"]
        rows.append({"batch": index, "shape": list(labels.shape), "labelled": int((labels[:, 1:] != -100).sum()),
                     **{f"{part}_{kind}_cpu_s": round(statistics.median(seconds[(part, kind, index)]), 3)
                        for part in ("step", "head") for kind in KINDS},
                     **{f"loss_{kind}": round(losses[(kind, index)], 6) for kind in KINDS}})
        print(json.dumps(rows[-1]), flush=True)
    totals = {f"{part}_{kind}_cpu_s": round(sum(row[f"{part}_{kind}_cpu_s"] for row in rows), 3)
              for part in ("step", "head") for kind in KINDS}
    print(json.dumps({"total": totals}))
    record = machine_record()
    result = {"machine": record["machine"], "cpu_count": record["cpu_count"], "torch_threads": 1,
              "utc_start": started.strftime("%Y-%m-%d %H:%M"), "utc_end": ended.strftime("%H:%M"),
              "load_average_start": [round(value, 2) for value in load_before],
              "load_average_end": [round(value, 2) for value in os.getloadavg()],
              "repeats": args.repeats, "batches": rows, "total": totals}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
