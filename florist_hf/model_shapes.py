"""Target-module shapes of a model from its config alone: built on the meta device, no weights."""

from __future__ import annotations

from pathlib import Path

from florist_hf.adapters import PEFT_PREFIX
from florist_hf.errors import FloristError


def target_module_shapes(config_source: str, targets: list[str]) -> dict[str, tuple[int, int]]:
    """Map PEFT module names (``base_model.model.…``) of the adapted linear layers to (out, in)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = Path(config_source)
    if source.suffix == ".json" and not source.is_file():
        raise FloristError(f"{source}: config file not found; pass a config.json or a model directory")
    try:
        config = AutoConfig.from_pretrained(str(source) if source.exists() else config_source)
    except (OSError, ValueError) as error:
        raise FloristError(f"{config_source}: cannot read a model config ({str(error).splitlines()[0]}); pass a config.json or a model directory") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {
        PEFT_PREFIX + name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }
    if not shapes:
        raise FloristError(f"{config_source}: no linear layer named {', '.join(targets)}; check --targets")
    return shapes
