"""TRL's ``SFTTrainer`` client: data in TRL's formats (conversational ``messages``, prompt/completion as
texts or conversations) or our instruction presets made prompt/completion records (the paper's Alpaca
prompt, or the chat template's user turn, as the prompt), tokenized and masked by TRL
(``train_on_inputs: false`` is its ``completion_only_loss``), a record whose prompt fills the cutoff kept as
a masked row as the stock Trainer client keeps it (`sft_trainer_keeping_masked_rows`); ``training:`` takes
every SFTConfig field. On a CPU its fused LM head scores the trained positions alone, in cache-sized tiles
(`fused_head`)."""

from __future__ import annotations

import copy
import functools

from florist_hf.clients.fused_head import tune_fused_lm_head_for_cpu
from florist_hf.clients.kind import TrainerKind, quiet_datasets
from florist_hf.errors import FloristError


class SFT(TrainerKind):
    name = "sft"
    safe_keys = frozenset({"assistant_only_loss", "completion_only_loss", "dataset_text_field", "eos_token", "eval_packing",
                           "loss_type", "max_length", "packing", "packing_strategy", "pad_to_multiple_of", "pad_token",
                           "padding_free", "router_aux_loss_coef", "shuffle_dataset", "truncation_mode"})

    def trainer_class(self) -> type:
        tune_fused_lm_head_for_cpu()
        return sft_trainer_keeping_masked_rows()

    def config_class(self) -> type:
        from trl import SFTConfig

        return SFTConfig

    def defaults(self, data, training) -> dict:
        # SFTConfig's own defaults that differ from TrainingArguments' are put back (bf16 on where the
        # device has it, activation checkpointing on, no padding to a multiple), so that a recipe trains
        # as it does on the stock Trainer; the recipe's training section sets any of them.
        defaults = {"max_length": data.cutoff_len, "completion_only_loss": not data.train_on_inputs, "bf16": False,
                    "pad_to_multiple_of": 8}
        if not {"activation_checkpointing", "gradient_checkpointing"} & set(training):
            defaults["activation_checkpointing"] = False
        return defaults

    def dataset(self, records, tokenizer, recipe):
        import datasets

        from florist_hf.data import record_format

        data, found = recipe.data, record_format(records)
        if found == "preference":
            raise FloristError(f"{data.source}: preference records (chosen/rejected) train with TRL's DPOTrainer: "
                               "set client.trainer: dpo")
        if found == "instruction":
            rows = [prompt_completion(record, data.template) for record in records]
            conversational = data.template == "chat"
        else:
            rows = [{key: value for key, value in record.items() if key != "label"} for record in records]
            conversational = found == "messages" or isinstance(rows[0]["prompt"], list)
        if conversational and not getattr(tokenizer, "chat_template", None):
            raise FloristError(f"{data.source}: conversations are rendered by the tokenizer's chat template, and "
                               f"{tokenizer.name_or_path!r} has none; use an instruct base, or data.template: alpaca for "
                               "instruction records")
        if asks_assistant_only_loss(recipe):
            if found != "messages":
                raise FloristError(f"{data.source}: training.assistant_only_loss masks the turns of conversations "
                                   f"(data.format: messages); these records are {found}: use data.train_on_inputs: false "
                                   "to train on the completions alone")
            check_generation_markers(tokenizer)
        return datasets.Dataset.from_list(rows)

    def trainer_options(self, tokenizer, batching, one_row):
        if batching != "padding_free":
            return {}  # TRL's DataCollatorForLanguageModeling, padded to a multiple of 8 (defaults)
        from florist_hf.data import make_collator

        # Our packed rows, not SFTConfig(padding_free=True): TRL's puts the batch in one row (whose whole
        # square attention other than FlashAttention computes) and does not truncate records to max_length.
        return {"data_collator": make_collator(tokenizer, batching, one_row)}

    def building(self):
        return quiet_datasets()


@functools.cache
def sft_trainer_keeping_masked_rows() -> type:
    """TRL's ``SFTTrainer`` whose prepared dataset keeps every record: one whose prompt alone fills
    ``max_length`` stays a row of masked labels, as the stock Trainer client keeps it (`data.tokenize_records`,
    FLoRA's reference code), where TRL 1.16 drops it after truncating (``SFTTrainer._prepare_dataset``'s
    filter of rows with no label left). So both kinds train on the same rows in the same batches, one per
    record (the count a client is weighed by, and DP-SGD samples and accounts over: with rows dropped its
    round was refused), and all else (tokenization, chat template, completion mask, labels) is TRL's."""
    from trl import SFTTrainer

    class RowKeepingSFTTrainer(SFTTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, packing, *rest, **kwargs):
            if packing or args.max_length is None or args.truncation_mode not in ("keep_start", "keep_end"):
                return super()._prepare_dataset(dataset, processing_class, args, packing, *rest, **kwargs)
            # TRL's preparation untruncated (so unfiltered), then its own truncation without the filter.
            untruncated = copy.copy(args)
            untruncated.max_length = None
            prepared = super()._prepare_dataset(dataset, processing_class, untruncated, packing, *rest, **kwargs)
            window = slice(None, args.max_length) if args.truncation_mode == "keep_start" else slice(-args.max_length, None)
            return prepared.map(_truncate, fn_kwargs={"window": window}, num_proc=args.dataset_num_proc)

    return RowKeepingSFTTrainer


def _truncate(row: dict, window: slice) -> dict:
    return {"input_ids": row["input_ids"][window], "labels": row["labels"][window]}


def prompt_completion(record: dict, template: str) -> dict:
    """A canonical instruction record as TRL's prompt/completion record: the paper's Alpaca prompt and the
    output (``alpaca``), or the instruction (and input, after a blank line) as the user's turn and the output
    as the assistant's (``chat``), exactly the texts `data.tokenize_records` trains on."""
    from florist_hf.data import format_prompt

    if template == "chat":
        user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        return {"prompt": [{"role": "user", "content": user}], "completion": [{"role": "assistant", "content": record["output"]}]}
    return {"prompt": format_prompt(record["instruction"], record["input"]), "completion": record["output"]}


def asks_assistant_only_loss(recipe) -> bool:
    return any(section.get("assistant_only_loss") for section in (recipe.training, *recipe.client_training.values()))


def check_generation_markers(tokenizer) -> None:
    """One line where ``training.assistant_only_loss`` cannot mask the assistant's turns: a chat template
    without ``{% generation %}`` markers that TRL cannot patch."""
    from trl.chat_template_utils import get_training_chat_template

    if not getattr(tokenizer, "chat_template", None):
        raise FloristError(f"training.assistant_only_loss needs a chat template, and {tokenizer.name_or_path!r} has none; "
                           "use an instruct base or remove assistant_only_loss")
    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        raise FloristError(f"training.assistant_only_loss needs a chat template that marks the assistant's turns with "
                           f"{{% generation %}} … {{% endgeneration %}}, and {tokenizer.name_or_path!r}'s has none (nor one "
                           "TRL can patch); add the markers (SFTConfig chat_template_path) or remove assistant_only_loss") from None


KIND = SFT()
