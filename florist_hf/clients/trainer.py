"""The stock ``transformers.Trainer`` client: records tokenized by `data.tokenize_records` (the paper's
Alpaca prompt or the chat template, prompt tokens masked unless ``train_on_inputs``), batches by
`data.make_collator`."""

from __future__ import annotations

from florist_hf.clients.kind import TrainerKind
from florist_hf.errors import FloristError


class PlainTrainer(TrainerKind):
    name = "trainer"

    def trainer_class(self) -> type:
        from transformers import Trainer

        return Trainer

    def config_class(self) -> type:
        from transformers import TrainingArguments

        return TrainingArguments

    def dataset(self, records, tokenizer, recipe):
        from florist_hf.data import TRL_FORMAT_TRAINERS, record_format, tokenize_records

        found = record_format(records)
        if found != "instruction":
            trainer = TRL_FORMAT_TRAINERS[found]
            raise FloristError(f"{recipe.data.source}: {found} records train with TRL's {trainer.upper()}Trainer: "
                               f"set client.trainer: {trainer}")
        data = recipe.data
        return tokenize_records(records, tokenizer, cutoff_len=data.cutoff_len, train_on_inputs=data.train_on_inputs,
                                template=data.template)

    def trainer_options(self, tokenizer, batching, one_row):
        from florist_hf.data import make_collator

        return {"data_collator": make_collator(tokenizer, batching, one_row)}


KIND = PlainTrainer()
