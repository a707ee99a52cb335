"""Builders the test files share (peft's testing_common.py is the model): the tiny model's shape,
a recipe on it, a silent console, and the dense update of a written adapter."""

import os
from pathlib import Path

import torch
import yaml

from florist_hf.adapters import read_adapter

#: The tiny Llama most tests train: one layer, GQA (2 query heads, 1 key-value head).
TINY_MODEL = {"num_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}


def write_recipe(directory, *, method="florist", threshold=0.9, ranks=(4, 2, 2), rounds=2, file_name="recipe.yaml",
                 **sections) -> Path:
    """A recipe on the tiny Llama and the builtin demo data, written to ``directory / file_name``;
    each keyword section is merged into the default one (a dict) or replaces it (anything else)."""
    directory = Path(directory)
    recipe = {
        "name": f"test-{method}",
        "model": {"name_or_path": "builtin:tiny-llama", "tiny": TINY_MODEL},
        "data": {"source": "builtin:demo", "partition": "iid", "max_samples_per_client": 16, "cutoff_len": 64},
        "lora": {"ranks": list(ranks)},
        "federation": {"method": method, "threshold": threshold, "rounds": rounds, "num_clients": len(ranks)},
        "training": {"max_steps": 2, "per_device_train_batch_size": 8, "learning_rate": 1e-2},
        "output_dir": str(directory / "run"),
    }
    for section, values in sections.items():
        recipe.setdefault(section, {})
        if isinstance(values, dict):
            recipe[section].update(values)
        else:
            recipe[section] = values
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / file_name
    path.write_text(yaml.safe_dump(recipe))
    return path


def quiet_console():
    from rich.console import Console

    return Console(file=open(os.devnull, "w"))


def delta_weights(adapter_dir) -> dict[str, torch.Tensor]:
    """Each module's dense update s·B·A of a written adapter, in fp64."""
    adapter = read_adapter(adapter_dir)
    return {name: m.scale * (m.lora_b.double() @ m.lora_a.double()) for name, m in adapter.modules.items()}


def relative_error(a, b):
    return float((a.double() - b.double()).norm() / max(float(b.double().norm()), 1e-30))


def record_client_base_layers(monkeypatch) -> list[type]:
    """The type of layer 0's q_proj base layer of every LoRA model the clients build from now on
    (a 4-bit ``Linear4bit`` where the recipe asks for QLoRA), appended as they are built."""
    from florist_hf.clients import run as client

    seen: list[type] = []
    build = client.build_lora_model

    def recording(*args, **kwargs):
        model = build(*args, **kwargs)
        seen.append(type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer))
        return model

    monkeypatch.setattr(client, "build_lora_model", recording)
    return seen


#: SmolLM2's ChatML turn markup, without generation markers.
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_base_copy(tiny_base, folder: Path) -> Path:
    """A copy of the tiny base at ``folder`` whose tokenizer carries the ChatML template."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(tiny_base, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder
