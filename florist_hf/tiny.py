"""Llamas with random weights built offline: the demo's tiny model, and stand-ins with the
architecture of a paper base (at full size for benchmarks, scaled down for tests)."""

from __future__ import annotations

import os
from pathlib import Path

from florist_hf.io_utils import atomic_directory

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
    with atomic_directory(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return out_dir


#: The config.json values of the paper's three bases: what a stand-in keeps (GQA, tied
#: embeddings, rope, vocabulary, special token ids). rope_scaling is the key those configs use.
PAPER_BASES: dict[str, dict] = {
    "TinyLlama/TinyLlama_v1.1": dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    "meta-llama/Llama-3.2-1B": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192},
    ),
    "huggyllama/llama-7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
}

#: Special-token strings of each base's tokenizer, by token id name.
_SPECIAL_TOKENS = {
    "meta-llama/Llama-3.2-1B": {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>"},
}
_LLAMA_SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>"}


def scaled_down_config(config_values: dict, *, num_layers: int = 2, head_dim: int = 16, min_heads: int = 4) -> dict:
    """The same architecture with few layers and a small width: the query/key-value head ratio,
    the MLP-to-hidden ratio, tied embeddings, rope, vocabulary and special ids are kept."""
    heads, kv_heads = config_values["num_attention_heads"], config_values["num_key_value_heads"]
    group = heads // kv_heads
    new_heads = max(group, min_heads)
    new_heads -= new_heads % group
    hidden = new_heads * head_dim
    ratio = config_values["intermediate_size"] / config_values["hidden_size"]
    scaled = dict(
        config_values, num_hidden_layers=num_layers, hidden_size=hidden, num_attention_heads=new_heads,
        num_key_value_heads=new_heads // group, intermediate_size=int(round(hidden * ratio / 8)) * 8,
    )
    if "head_dim" in config_values:
        scaled["head_dim"] = head_dim
    return scaled


def llama_style_tokenizer(config_values: dict, base_name: str | None = None):
    """A byte-level BPE tokenizer that, like the Llama tokenizers, prepends BOS and has no pad
    token, with the base's special-token strings at the base's ids; bytes take the lowest free ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    names = _SPECIAL_TOKENS.get(base_name, _LLAMA_SPECIAL_TOKENS)
    special = {names[kind]: config_values[f"{kind}_token_id"] for kind in ("bos", "eos")}
    if "unk" in names:
        special[names["unk"]] = 0
    free_ids = (index for index in range(config_values["vocab_size"]) if index not in special.values())
    vocab = {char: next(free_ids) for char in sorted(pre_tokenizers.ByteLevel.alphabet())}
    vocab.update(special)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(special))
    bos = names["bos"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, special[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=names["eos"], unk_token=names.get("unk"),
    )


def build_random_llama(out_dir: str | os.PathLike, config_values: dict, *, base_name: str | None = None,
                       dtype: str = "float32", seed: int = 0) -> Path:
    """Write a randomly initialised ``LlamaForCausalLM`` with ``config_values`` and a Llama-style
    tokenizer (`llama_style_tokenizer`) to ``out_dir``, atomically; an existing one is reused."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    config = LlamaConfig(**config_values)
    torch.manual_seed(seed)
    # Built directly in ``dtype``: a 7B model built in fp32 first would need 27 GB.
    model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, dtype))
    with atomic_directory(out_dir) as staging:
        model.save_pretrained(staging)
        llama_style_tokenizer(config_values, base_name).save_pretrained(staging)
    return out_dir
