"""What a registered client trainer provides: its Trainer and arguments classes, its defaults, the
dataset it trains on and the Trainer's own keyword arguments (its collator)."""

from __future__ import annotations

import contextlib
from typing import Any


class TrainerKind:
    """One way a client trains (``client.trainer: NAME`` in a recipe). A subclass in its own file
    under ``florist_hf/clients/`` plus one line in `registry.TRAINERS` adds a trainer; the round
    (`run.run_client_round`), the federated callback, DP-SGD (`dp_sgd.with_dp_sgd`) and the batch
    layout are the same for every kind."""

    #: The name a recipe gives it.
    name: str = ""
    #: Its own arguments (beyond TrainingArguments') that change only what and how it optimises: a Flower
    #: server may set them on a node without the operator's say-so (`flower.policy`). Nothing that reaches the
    #: network, reads files, runs remote code or lays out the node's hardware.
    safe_keys: frozenset[str] = frozenset()

    def trainer_class(self) -> type:
        """The ``transformers.Trainer`` subclass (imported when first asked)."""
        raise NotImplementedError

    def config_class(self) -> type:
        """Its arguments class: ``TrainingArguments`` or a subclass; a recipe's ``training:`` takes its fields."""
        raise NotImplementedError

    def defaults(self, data, training: dict) -> dict:
        """Arguments this trainer sets unless the recipe does (``training``: what the recipe sets for the
        client), from the recipe's ``data`` section."""
        return {}

    def refusal(self, recipe) -> str | None:
        """Why this trainer cannot take ``recipe`` (a setting it cannot train with), in one line; None when it can.
        The recipe asks when it loads."""
        return None

    def dataset(self, records: list[dict], tokenizer, recipe) -> Any:
        """A client's records as this Trainer's ``train_dataset``: built once per shard and process (the first
        before anything trains), so that what this trainer cannot take is refused here in one line."""
        raise NotImplementedError

    def trainer_options(self, tokenizer, batching: str, one_row: bool) -> dict:
        """The Trainer's keyword arguments beyond the model, arguments, dataset, tokenizer and callbacks."""
        return {}

    def building(self):
        """A context the Trainer is built in (TRL prepares its dataset there)."""
        return contextlib.nullcontext()

    def config_fields(self) -> set[str]:
        import dataclasses

        return {field.name for field in dataclasses.fields(self.config_class())}


@contextlib.contextmanager
def quiet_datasets():
    """While a TRL Trainer is built: it tokenizes the shard with `datasets.map`, whose progress bars are not
    ours to print."""
    from datasets.utils import logging as datasets_logging

    shown = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            datasets_logging.enable_progress_bar()
