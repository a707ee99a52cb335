"""The one builder of a client's arguments (``TrainingArguments``, or its trainer's subclass such as
TRL's ``SFTConfig``) from a recipe's training settings: its checks, florist-hf's defaults, and one line
naming the key for a bad value.

The recipe calls it when it loads (`check_training`), so that a bad value (``learning_rate: fast``)
stops the run before a run directory exists; the client calls it again for each round with its own
working directory, seed and learning rate (`build_training_arguments`). Both build from the settings
`training_settings` makes: florist-hf's defaults and the ``save_steps`` rule are applied there alone.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from pathlib import Path
from typing import Any

from florist_hf.errors import FloristError, SettingError

#: TrainingArguments florist-hf sets unless the recipe does: no checkpoints inside a client round
#: unless ``save_steps`` asks for them (the round itself is the checkpoint), no external loggers
#: unless asked, our own progress lines.
TRAINING_DEFAULTS = {
    "report_to": "none",
    "save_strategy": "no",
    "logging_steps": 1,
    "disable_tqdm": True,
    "remove_unused_columns": False,
    "learning_rate": 3e-4,
    "lr_scheduler_type": "linear",
}

#: Fields florist-hf sets per client: each client round gets its own working directory.
OWNED_FIELDS = frozenset({"output_dir"})


def _arguments_class(config_class):
    from transformers import TrainingArguments

    return config_class or TrainingArguments


@functools.cache
def _field_types(config_class=None) -> dict[str, Any]:
    config_class = _arguments_class(config_class)
    hints = typing.get_type_hints(config_class)
    return {field.name: hints[field.name] for field in dataclasses.fields(config_class) if field.init}


#: Ranges TrainingArguments leaves to the optimizer (AdamW) and the data loader, which would refuse
#: a value outside them only once the first client trains.
RANGES = {
    "learning_rate": {"ge": 0},
    "weight_decay": {"ge": 0},
    "adam_beta1": {"ge": 0, "lt": 1},
    "adam_beta2": {"ge": 0, "lt": 1},
    "adam_epsilon": {"ge": 0},
    "per_device_train_batch_size": {"ge": 1},
    "gradient_accumulation_steps": {"ge": 1},
}


@functools.cache
def _type_adapter(key: str, config_class=None):
    from typing import Annotated

    from pydantic import Field, TypeAdapter

    kind = _field_types(config_class)[key]
    return TypeAdapter(Annotated[kind, Field(**RANGES[key])] if key in RANGES else kind)


def _checked_values(training: dict, where: str, config_class=None) -> dict:
    """``training`` with every key known and every value of its field's type; a number written as
    a string (YAML 1.1 reads ``5e-3`` as one) becomes that number."""
    from pydantic import ValidationError

    checked = {}
    for key, value in training.items():
        setting = f"{where}.{key}"
        if key not in _field_types(config_class):
            name = _arguments_class(config_class).__name__
            owner = _trainer_with_field(key, config_class)
            if owner is not None:
                trainer, owner_name = owner
                raise SettingError(setting, f"not {_article(name)} {name} field (it is {_article(owner_name)} {owner_name} field: "
                                            f"set client.trainer: {trainer})")
            raise SettingError(setting, f"not a {name} field; check its spelling "
                                        "(https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments)")
        if key in OWNED_FIELDS:
            raise SettingError(setting, "set by florist-hf per client; remove it")
        if key == "report_to" and value not in (None, "none", [], ["none"]):
            # Per-client trackers would start a run per client and round, each at step 0.
            raise SettingError(setting, "a federation-level setting: use tracking.report_to (one tracker run per federation)")
        try:
            value_as_typed = _type_adapter(key, config_class).validate_python(value)
        except ValidationError as error:
            reason = error.errors()[0]["msg"]
            raise SettingError(setting, f"got {value!r}; {reason[:1].lower()}{reason[1:]}") from None
        # A string enum (lr_scheduler_type: cosine) stays as written; a number in a string becomes the number.
        checked[key] = value_as_typed if isinstance(value, str) and not isinstance(value_as_typed, str) else value
    return checked


def _article(name: str) -> str:
    return "an" if name[0] in "AEFHILMNORSX" else "a"  # an SFTConfig, a DPOConfig, a TrainingArguments


def _trainer_with_field(key: str, config_class=None) -> tuple[str, str] | None:
    """The registered trainer (its name, its arguments class's name) whose arguments have the field ``key`` that
    ``config_class`` lacks: the hint of a field set for another trainer."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return None
    from florist_hf.clients.registry import TRAINERS

    for name, kind in TRAINERS.items():
        other = kind.config_class()
        if other is not _arguments_class(config_class) and key in _field_types(other):
            return name, other.__name__
    return None


@functools.cache
def _machine_free_arguments(config_class=None):
    """Arguments whose device is never set up (accelerate's state is left alone), for checking a
    recipe on any machine: the recipe may be for a GPU that this machine lacks."""
    import torch

    class MachineFreeTrainingArguments(_arguments_class(config_class)):
        @functools.cached_property
        def _setup_devices(self):
            return torch.device("cpu")

    return MachineFreeTrainingArguments


def training_settings(recipe_set: dict, trainer_defaults: dict | None = None) -> dict:
    """A client's settings from what the recipe sets (``recipe_set``: a ``training`` section, merged with a
    client's ``client_training`` overrides): florist-hf's defaults (`TRAINING_DEFAULTS`), then its trainer's
    (``trainer_defaults``), then ``recipe_set``, and the checkpointing that ``save_steps`` alone implies.
    The one place these are applied: the client's round (`config.client_training`) and the recipe's check
    (`check_training`) both call it, and `build_training_arguments` takes its result as it is."""
    settings = {**TRAINING_DEFAULTS, **(trainer_defaults or {}), **recipe_set}
    if "save_steps" in recipe_set and "save_strategy" not in recipe_set:
        # save_steps alone means "checkpoint the client round every N steps" (for resuming it);
        # only the newest checkpoint is needed for that.
        settings["save_strategy"] = "steps"
        settings.setdefault("save_total_limit", 1)
    return settings


def build_training_arguments(training: dict, *, work_dir: str | Path, seed: int, where: str = "training",
                             on_this_machine: bool = True, config_class=None):
    """The TrainingArguments (or ``config_class``) of one client round from ``training``, a client's
    settings as `training_settings` makes them (defaults applied), with its ``seed`` and ``work_dir``.

    ``on_this_machine`` False checks the values alone: what the machine lacks (a GPU for bf16, tf32,
    DeepSpeed) is checked where the client trains. A bad value is a FloristError naming ``where`` and
    the key.
    """
    import torch

    training = _checked_values(training, where, config_class)
    fields = {"dataloader_pin_memory": torch.cuda.is_available(), **training, "seed": seed, "data_seed": seed}
    kind = _arguments_class(config_class)
    if not on_this_machine:
        kind = _machine_free_arguments(config_class)
        fields = {key: value for key, value in fields.items() if key not in ("tf32", "deepspeed")}
        fields["use_cpu"] = True
    try:
        return kind(output_dir=str(work_dir), **fields)
    except (TypeError, ValueError, KeyError, OSError, NotImplementedError) as error:  # a config file it names, too
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "bf16" in reason or "fp16" in reason:  # a GPU recipe on a machine without one
            precision = "bf16" if "bf16" in reason else "fp16"
            raise FloristError(
                f"{where}: {reason}; on a machine without a GPU, --set training.use_cpu=true keeps {precision} "
                f"(CPU autocast) or --set training.{precision}=false trains in fp32"
            ) from None
        raise FloristError(f"{where}: {reason}; fix the recipe's {where.split('.')[0]} section") from None


def check_training(training: dict, *, where: str = "training", config_class=None,
                   trainer_defaults: dict | None = None) -> dict:
    """``training`` checked as a client would build it (``config_class``: its trainer's arguments class,
    TrainingArguments by default; ``trainer_defaults``: that trainer's own, `TrainerKind.defaults`), on
    any machine; returns it with numbers written as strings made numbers. A bad value raises
    `SettingError` (a ValueError) naming the key."""
    checked = _checked_values(training, where, config_class)
    try:
        build_training_arguments(training_settings(checked, trainer_defaults), work_dir="florist-hf-check", seed=0,
                                 where=where, on_this_machine=False, config_class=config_class)
    except FloristError as error:
        raise SettingError(where, str(error).removeprefix(f"{where}: ")) from None
    return checked
