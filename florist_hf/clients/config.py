"""One client's training settings: the one merge of florist-hf's defaults, the trainer's, the recipe's
``training:`` and ``client_training:`` and the round's learning rate, and the arguments object built from it."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from florist_hf.clients.arguments import build_training_arguments, training_settings
from florist_hf.clients.precision import ClientPrecision, client_precision
from florist_hf.clients.registry import trainer_kind
from florist_hf.errors import FloristError

def client_training(recipe, client: int, round_index: int) -> dict:
    """The training arguments of client ``client`` in round ``round_index``, every layer merged once:
    florist-hf's defaults, the client's trainer's (`registry.trainer_kind`), its precision where the
    recipe leaves it open (`precision.client_precision`: bf16 autocast on a CPU that computes bf16
    natively), the recipe's ``training`` section and the client's ``client_training`` overrides
    (`arguments.training_settings`: with the checkpointing that ``save_steps`` alone implies), then the
    round's learning rate (``federation.round_lr_schedule``)."""
    kind = trainer_kind(recipe.client.trainer)
    recipe_set = _recipe_set(recipe, client)
    training = training_settings(recipe_set, {**kind.defaults(recipe.data, recipe_set), **precision_of(recipe, client).fields})
    if recipe.federation.round_lr_schedule == "cosine":
        training["learning_rate"] = cosine_round_learning_rate(
            float(training["learning_rate"]), recipe.federation.round_lr_min, round_index, recipe.federation.rounds
        )
    return training


def _recipe_set(recipe, client: int) -> dict:
    """What the recipe itself sets for client ``client``: ``training:`` under its ``client_training:``."""
    return {**recipe.training, **recipe.client_training.get(client, {})}


def precision_of(recipe, client: int) -> ClientPrecision:
    """The precision client ``client`` trains in on this machine, and the line that says why."""
    return client_precision(_recipe_set(recipe, client), dp_sgd=recipe.privacy is not None,
                            quantized=recipe.model.quantization is not None, base_dtype=recipe.model.dtype)


def precision_lines(recipe) -> list[str]:
    """One console line per precision the clients train in on this machine (one, unless
    ``client_training:`` sets it apart for some): "clients train in ...: why"."""
    clients: dict[str, list[int]] = {}
    for client in range(recipe.federation.num_clients):
        clients.setdefault(precision_of(recipe, client).line, []).append(client)
    if len(clients) == 1:
        return [f"clients train in {next(iter(clients))}"]
    return [f"clients {', '.join(map(str, ids))} train in {line}" for line, ids in clients.items()]


def cosine_round_learning_rate(peak: float, minimum: float, round_index: int, rounds: int) -> float:
    """Cosine annealing over server rounds: ``peak`` in round 1, ``minimum`` in round ``rounds``.

    FlowerTune anneals with cos(π·t/T), so its first round already starts below the peak; here
    round 1 trains at the recipe's own rate.
    """
    if rounds <= 1:
        return peak
    progress = (round_index - 1) / (rounds - 1)
    return minimum + 0.5 * (peak - minimum) * (1 + math.cos(math.pi * progress))


def training_default(key: str):
    """A TrainingArguments field's default, as the Trainer takes it where the recipe and florist-hf are
    silent (SFTConfig keeps these: the steps, epochs and batch size)."""
    import dataclasses

    from transformers import TrainingArguments

    return next(field.default for field in dataclasses.fields(TrainingArguments) if field.name == key)


def check_training_backends(training: dict) -> None:
    """One line for a TrainingArguments speed option whose package or device is missing."""
    import importlib.util

    if training.get("use_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
        raise FloristError("training.use_liger_kernel needs the liger-kernel package: pip install liger-kernel "
                           "(its kernels run on a CUDA GPU), or remove the setting")
    if training.get("torch_compile") and torch.cuda.is_available() and importlib.util.find_spec("triton") is None:
        raise FloristError("training.torch_compile on a GPU needs triton (it comes with PyTorch's CUDA builds): "
                           "pip install triton, or remove the setting")


def training_arguments(config_class, training: dict, work_dir: Path, seed: int):
    """``config_class`` (TrainingArguments or a subclass such as TRL's SFTConfig) built from a merged
    ``training`` (`client_training`), in ``work_dir``, seeded (`arguments.build_training_arguments`:
    its checks, and one line for a refused value)."""
    check_training_backends(training)
    return build_training_arguments(training, work_dir=work_dir, seed=seed, config_class=config_class)
