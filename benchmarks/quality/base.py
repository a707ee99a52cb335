"""The base model: a BPE tokenizer and a small Llama pre-trained centrally on Dolly categories the
fine-tuning never uses, saved as an ordinary Hugging Face model directory and cached.

The cache key is a hash of every setting that changes the model, so a changed setting pre-trains
again and an unchanged one is reused (the benchmark never pre-trains twice).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.quality import config
from benchmarks.quality.data import pretrain_records
from florist_hf.data import format_prompt

PAD, EOS = "<pad>", "</s>"


def cache_key(vocab_size: int, model: dict, pretrain: dict) -> str:
    payload = {"vocab": vocab_size, "model": model, "pretrain": pretrain, "categories": config.PRETRAIN_CATEGORIES, "v": 1}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def record_text(record: dict) -> str:
    """What the model reads: the Alpaca prompt and response (as in fine-tuning, SPEC §6)."""
    return format_prompt(record["instruction"], record["input"]) + record["output"]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained offline with `tokenizers`, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD, model_max_length=1_000_000)


def _packed_blocks(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """All texts, each followed by EOS, concatenated and cut into blocks of ``seq_len`` tokens."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = [token for text_ids in ids for token in (*text_ids, tokenizer.eos_token_id)]
    count = len(stream) // seq_len
    return torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)


@torch.no_grad()
def _mean_loss(model, blocks: torch.Tensor, batch_size: int) -> float:
    model.eval()
    losses = [float(model(input_ids=batch, labels=batch).loss) for batch in blocks.split(batch_size)]
    model.train()
    return sum(losses) / len(losses)


def pretrain(out_dir: Path, *, vocab_size: int, model_settings: dict, settings: dict, log=print) -> dict:
    """Train the tokenizer and the model; write both to ``out_dir`` with a ``pretrain.json`` log."""
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    records = pretrain_records()
    rng = random.Random(settings["seed"])
    rng.shuffle(records)
    validation, train = records[: settings["validation_records"]], records[settings["validation_records"]:]
    if settings.get("max_records"):  # the smoke test pre-trains on a few records only
        train = train[: settings["max_records"]]
    train_texts = [record_text(r) for r in train]
    tokenizer = train_tokenizer(train_texts, vocab_size)
    tokenizer_seconds = time.perf_counter() - started
    seq_len, batch_size = settings["seq_len"], settings["batch_size"]
    blocks = _packed_blocks(train_texts, tokenizer, seq_len)
    validation_blocks = _packed_blocks([record_text(r) for r in validation], tokenizer, seq_len)
    log(
        f"pre-training data: {len(train)} records of {', '.join(config.PRETRAIN_CATEGORIES)} "
        f"-> {blocks.numel():,} tokens; validation {len(validation)} records; tokenizer {tokenizer_seconds:.1f} s"
    )

    torch.manual_seed(settings["seed"])
    model_config = LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, **model_settings,
    )
    model = LlamaForCausalLM(model_config)
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"], weight_decay=settings["weight_decay"], betas=(0.9, 0.95))
    steps, warmup = settings["steps"], settings["warmup_steps"]

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return settings["min_lr_ratio"] + (1 - settings["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(settings["seed"])
    order = torch.randperm(len(blocks), generator=generator)
    initial_validation = _mean_loss(model, validation_blocks, batch_size)
    log(f"model: Llama {model_settings['num_hidden_layers']}x{model_settings['hidden_size']}, {num_params / 1e6:.2f}M parameters; "
        f"validation loss at init {initial_validation:.3f}")
    curve = []
    model.train()
    position = 0
    for step in range(steps):
        if position + batch_size > len(order):
            order, position = torch.randperm(len(blocks), generator=generator), 0
        batch = blocks[order[position: position + batch_size]]
        position += batch_size
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps - 1:
            curve.append({"step": step + 1, "train_loss": loss.item()})
            log(f"  pre-train step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)")
    final_validation = _mean_loss(model, validation_blocks, batch_size)
    seconds = time.perf_counter() - started
    log(f"pre-training done in {seconds:.0f} s: validation loss {initial_validation:.3f} -> {final_validation:.3f}")

    summary = {
        "parameters": num_params, "vocab_size": len(tokenizer), "model": model_settings, "settings": settings,
        "categories": list(config.PRETRAIN_CATEGORIES), "train_records": len(train), "train_tokens": blocks.numel(),
        "tokens_seen": steps * batch_size * seq_len, "epochs": steps * batch_size / len(blocks),
        "validation_loss_init": initial_validation, "validation_loss_final": final_validation,
        "curve": curve, "seconds": seconds, "tokenizer_seconds": tokenizer_seconds,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "pretrain.json").write_text(json.dumps(summary, indent=1))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def ensure_base(cache: Path = config.CACHE, *, vocab_size: int = config.VOCAB_SIZE, model_settings: dict | None = None,
                settings: dict | None = None, log=print) -> tuple[Path, dict]:
    """The cached base model directory (pre-trained here on first use) and its pre-training log."""
    model_settings = dict(config.MODEL if model_settings is None else model_settings)
    settings = dict(config.PRETRAIN if settings is None else settings)
    out_dir = cache / f"base-{cache_key(vocab_size, model_settings, settings)}"
    if (out_dir / "pretrain.json").exists():
        summary = json.loads((out_dir / "pretrain.json").read_text())
        log(f"base model: cached at {out_dir} (validation loss {summary['validation_loss_init']:.3f} -> "
            f"{summary['validation_loss_final']:.3f}, pre-trained in {summary['seconds']:.0f} s)")
        summary["cached"] = True
        return out_dir, summary
    log(f"base model: pre-training into {out_dir}")
    summary = pretrain(out_dir, vocab_size=vocab_size, model_settings=model_settings, settings=settings, log=log)
    summary["cached"] = False
    return out_dir, summary
