"""A run's global adapter answering instructions beside its base model: greedy decoding through the
run's own prompt format (the Alpaca prompt or the tokenizer's chat template), for a person to judge."""

from __future__ import annotations

import json
import os
from pathlib import Path

from florist_hf.errors import FloristError


def run_answers(run_dir: str | os.PathLike, *, instructions: tuple[str, ...] | list[str] = (), heldout: int = 3,
                max_new_tokens: int = 96) -> list[dict]:
    """For each of ``instructions`` (default: the first ``heldout`` held-out test records of the
    run's own split), the base model's answer and base + global adapter's, greedily decoded.

    Returns one dict per prompt: instruction, input, reference (the record's answer, if any),
    base, adapter.
    """
    import torch
    from peft import PeftModel

    from florist_hf.data import prepare_client_data, prompt_ids
    from florist_hf.rundir import GLOBAL_ADAPTER, RECIPE_RECORD, RUN_SUMMARY
    from florist_hf.evaluation import check_adapter_matches_base
    from florist_hf.loading import load_causal_lm, load_tokenizer, prepare_base_model
    from florist_hf.recipe import Recipe

    run_dir = Path(run_dir)
    adapter_dir = run_dir / GLOBAL_ADAPTER
    if not (run_dir / RUN_SUMMARY).is_file() or not adapter_dir.is_dir():
        raise FloristError(f"{run_dir}: not a finished run directory (no {RUN_SUMMARY} and {GLOBAL_ADAPTER}/); "
                           "pass the output_dir of a completed `florist-hf run`")
    recipe = Recipe.from_record(json.loads((run_dir / RECIPE_RECORD).read_text()))
    # The run's own base, made again where it is gone (a GGUF base's cache cleared since the run).
    base_path = prepare_base_model(recipe, run_dir)
    if instructions:
        records = [{"instruction": text, "input": "", "output": None} for text in instructions]
    else:
        records = prepare_client_data(recipe)[1][:heldout]
        if not records:
            raise FloristError(f"{run_dir}: its recipe holds no records out (data.holdout_per_label is 0); pass --instruction")
    check_adapter_matches_base(adapter_dir, base_path)
    model_section = recipe.model
    tokenizer = load_tokenizer(base_path, revision=model_section.revision, trust_remote_code=model_section.trust_remote_code)
    model = load_causal_lm(base_path, dtype=model_section.dtype, revision=model_section.revision,
                           trust_remote_code=model_section.trust_remote_code, quantization=model_section.quantization,
                           attn_implementation=model_section.attn_implementation).eval()
    prompts = prompt_ids(records, tokenizer, template=recipe.data.template)

    def answers(lm) -> list[str]:
        texts = []
        for ids in prompts:
            with torch.no_grad():
                output = lm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            texts.append(tokenizer.decode(output[0, len(ids):], skip_special_tokens=True).strip())
        return texts

    base_answers = answers(model)
    adapter_answers = answers(PeftModel.from_pretrained(model, adapter_dir).eval())
    return [
        {"instruction": record["instruction"], "input": record.get("input", ""), "reference": record.get("output"),
         "base": base, "adapter": adapted}
        for record, base, adapted in zip(records, base_answers, adapter_answers)
    ]
