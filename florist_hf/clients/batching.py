"""The batch layout a client trains with: padding-free where the base's attention keeps packed records
apart, padded where it cannot (or under DP-SGD)."""

from __future__ import annotations

import functools


#: Attention implementations that keep the records of a padding-free row apart from its
#: ``position_ids`` alone (transformers 5 builds the block-diagonal mask from them for sdpa, eager
#: and flex; FlashAttention reads the sequence boundaries from them).
PACKED_ATTENTION = frozenset({"sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"})


_FALLBACKS_SAID: set[tuple] = set()


def _base_and_attention(model) -> tuple:
    """The base model under a PEFT wrapper, and the attention implementation its config names."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base, getattr(base.config, "_attn_implementation", None)


@functools.cache
def _builds_mask_with_transformers(module_name: str) -> bool:
    """Whether a modeling module calls transformers' ``create_causal_mask`` (read once per module)."""
    import inspect
    import sys

    module = sys.modules.get(module_name)
    try:
        return "create_causal_mask(" in (inspect.getsource(module) if module is not None else "")
    except (OSError, TypeError):
        return False


def padding_free_unsupported(model) -> str | None:
    """Why ``model`` cannot train on padding-free batches, or None when it can."""
    base, implementation = _base_and_attention(model)
    if implementation not in PACKED_ATTENTION:
        return f"its attention implementation {implementation!r} does not read packed positions"
    if not implementation.startswith("flash_attention") and not _builds_mask_with_transformers(type(base).__module__):
        # Architectures of transformers' own mask builder keep packed records apart; others may not.
        return f"{type(base).__name__} builds its attention mask without transformers' create_causal_mask"
    return None


def client_batching(requested: str, model, console=None, training: dict | None = None, *, dp_sgd: bool = False) -> str:
    """The batch layout a client trains with: ``requested``, or padded (said once per model kind)
    where padding-free batches would let records attend to each other, or under DP-SGD."""
    if requested != "padding_free":
        return requested
    # Opacus' per-sample gradients are per row, and a padding-free row holds several records.
    reason = "DP-SGD clips every record's gradient apart" if dp_sgd else padding_free_unsupported(model)
    if reason is None and (training or {}).get("use_cache"):
        # With a KV cache transformers reads the positions as a continuation, not as packed records.
        reason = "training.use_cache is set"
    if reason is None:
        return "padding_free"
    said = (type(model).__name__, reason)
    if console is not None and said not in _FALLBACKS_SAID:
        _FALLBACKS_SAID.add(said)
        console.print(f"  data.batching: padding_free is not possible here ({reason}); batches are padded")
    return "padded"


def packs_one_row(model) -> bool:
    """Whether a padding-free batch is one row: under FlashAttention, whose variable-length kernels
    skip what records do not share; other attention computes a row's whole square, so its rows are
    kept no longer than the batch's longest record (`data.PackedRowsCollator`)."""
    return (_base_and_attention(model)[1] or "").startswith("flash_attention")
