"""A tiny Llama with random weights and a byte-level tokenizer, built offline for demos and tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

#: Recipes name this instead of a Hub id to get a locally built tiny model.
TINY_LLAMA_ID = "builtin:tiny-llama"


def build_tiny_llama(
    out_dir: str | os.PathLike,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised Llama and a ByT5 byte tokenizer to ``out_dir`` (atomically).

    ByT5's tokenizer needs no vocabulary file, so nothing is downloaded. An existing directory
    with a config is reused as is, which makes repeated demo runs start instantly.
    """
    import torch
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
