"""The held-out loss: each held-out record's mean loss on its response tokens, under the global
model a federation holds after a round (the base, its global state and its global adapter)."""

from __future__ import annotations

from pathlib import Path


def load_global_model(base_path: str, *, state: Path | None = None, adapter: Path | None = None, dtype: str = "float32",
                      revision: str | None = None, trust_remote_code: bool = False, base_cache=None, quantization=None,
                      attn_implementation: str | None = None):
    """The global model a federation holds after a round (`engine.Federation.global_model`): the
    base plus the global state ``state`` exactly as the clients hold it
    (`global_state.attach_global_state`), and the global adapter ``adapter`` on top, where given.
    With ``base_cache`` it is built on the cached base; release that afterwards."""
    from peft import PeftModel

    from florist_hf.loading import load_base
    from florist_hf.global_state import attach_global_state, read_global_state

    model = load_base(base_path, base_cache=base_cache, dtype=dtype, revision=revision,
                      trust_remote_code=trust_remote_code, quantization=quantization, attn_implementation=attn_implementation)
    if state is not None:
        attach_global_state(model, read_global_state(state))
    return PeftModel.from_pretrained(model, adapter) if adapter is not None else model


def heldout_loss(model, tokenizer, records, recipe, work_dir: Path) -> float | None:
    """The mean over held-out records of each record's mean loss on its response tokens (the
    Trainer's own evaluation loop; None when no record has a response token within the cutoff).

    The prompt is masked whatever ``train_on_inputs`` says: the Alpaca template is the same in
    every record, and its tokens would dominate a mean over whole sequences. One record per batch,
    so that the value depends neither on the batch size nor on how many processes share the work
    (the Trainer averages per-batch means, and batches differ in their number of response tokens).
    """
    import torch
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from florist_hf.data import IGNORE_INDEX, make_collator, tokenize_records

    dataset = tokenize_records(records, tokenizer, cutoff_len=recipe.data.cutoff_len, train_on_inputs=False,
                               template=recipe.data.template)
    # A record whose response the cutoff removed has no token to score (its loss would be 0/0).
    dataset = dataset.select([index for index, labels in enumerate(dataset["labels"]) if any(label != IGNORE_INDEX for label in labels)])
    if len(dataset) == 0:
        return None
    # One record per batch, unpadded: a single record's positions run 0..n-1, which every
    # attention implementation reads (no packed records to keep apart), and no pad is computed.
    collate = make_collator(tokenizer, "padding_free")
    if getattr(model, "hf_quantizer", None) is not None:
        # The Trainer refuses a quantized model without a trainable adapter (a QLoRA base with the
        # global updates held beside it): the same mean of per-record losses, in this process.
        device = next(model.parameters()).device
        with torch.no_grad():
            losses = [float(model(**{key: value.to(device) for key, value in collate([row]).items()}).loss) for row in dataset]
        return sum(losses) / len(losses)
    args = TrainingArguments(
        output_dir=str(work_dir), per_device_eval_batch_size=1, report_to="none", disable_tqdm=True,
        remove_unused_columns=False, dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=args, eval_dataset=dataset, data_collator=collate, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    return float(trainer.evaluate()["eval_loss"])


def global_heldout_loss(recipe, base_path: str, tokenizer, test_records, work_dir: Path, *, state: Path | None = None,
                        adapter: Path | None = None, base_cache=None) -> float | None:
    """`heldout_loss` of the global model `load_global_model` builds; with ``base_cache`` built
    on the cached base, which is put back as loaded afterwards."""
    from florist_hf.loading import free_memory

    model = load_global_model(
        base_path, state=state, adapter=adapter, dtype=recipe.model.dtype, revision=recipe.model.revision,
        trust_remote_code=recipe.model.trust_remote_code, base_cache=base_cache,
        quantization=recipe.model.quantization,  # the model the clients train on
        attn_implementation=recipe.model.attn_implementation,
    )
    try:
        return heldout_loss(model, tokenizer, test_records, recipe, work_dir)
    finally:
        if base_cache is not None:
            base_cache.release(model if model is not base_cache.model else None)
        del model
        free_memory()
