"""PEFT LoRA checkpoints <-> per-module factors: reads safetensors and LoraConfig, writes both."""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from florist_hf.aggregation import ClientModule
from florist_hf.errors import FloristError
from florist_hf.io_utils import write_json_atomic

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_PICKLE = "adapter_model.bin"
#: Written beside a client's adapter: its sample count (the default aggregation weight).
CLIENT_INFO = "client.json"
#: Written beside a global adapter: how it was made (method, τ, ranks, energy, traffic).
SIDECAR = "aggregation.json"
#: Under secure aggregation the server keeps, instead of a client's factors (which stay with the
#: client), their layout: each module's shape and rank, and the factors' dtype.
ADAPTER_LAYOUT = "adapter_layout.json"

#: PEFT names a factor ``<module>.lora_A.weight`` (adapter name stripped on save) or, in a raw
#: state dict, ``<module>.lora_A.<adapter>.weight``.
_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
#: Key prefix PEFT puts before the base model's own module names.
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraAdapter:
    """A LoRA adapter read from disk: its config and its factors per module (full PEFT names)."""

    path: Path
    config: dict
    modules: dict[str, ClientModule]
    num_samples: int | None
    dtype: torch.dtype

    @property
    def rank(self) -> int:
        """The adapter's largest module rank (its nominal client rank)."""
        return max(module.rank for module in self.modules.values())

    @property
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: module.shape for name, module in self.modules.items()}


def model_key(module_name: str) -> str:
    """The module's name inside the base model, as PEFT's rank/alpha patterns are matched."""
    return module_name[len(PEFT_PREFIX):] if module_name.startswith(PEFT_PREFIX) else module_name


def pattern_key(pattern_keys, module_key: str) -> str:
    """The first pattern that matches ``module_key`` as a whole dotted suffix, else ``module_key``.

    PEFT's matching rule (``peft.utils.other.get_pattern_key``), restated so that reading an
    adapter needs neither peft nor transformers; a test holds the two equal.
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_key):
            return key
    return module_key


def module_scale(config: Mapping, module_name: str) -> float:
    """PEFT's scaling for one module: alpha / r, or alpha / sqrt(r) with rsLoRA.

    Rank and alpha are looked up in ``rank_pattern`` and ``alpha_pattern`` independently, with
    PEFT's own matching rule, exactly as ``LoraModel`` does when it builds the layer.
    """
    key = model_key(module_name)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rank = rank_pattern.get(pattern_key(rank_pattern.keys(), key), config["r"])
    alpha = alpha_pattern.get(pattern_key(alpha_pattern.keys(), key), config["lora_alpha"])
    return peft_scale(alpha, rank, bool(config.get("use_rslora")))


def peft_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def factor_shapes(adapter_dir: str | os.PathLike) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{module: {"A": shape, "B": shape}}`` of an adapter's safetensors file, from its header alone
    (no tensor is read); module names as PEFT saves them. A missing or unreadable file is one line."""
    from safetensors import safe_open

    weights_file = Path(adapter_dir) / ADAPTER_WEIGHTS
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    try:
        with safe_open(weights_file, framework="pt") as handle:
            for key in handle.keys():
                match = _FACTOR_KEY.match(key)
                if match:
                    shapes.setdefault(match["module"], {})[match["factor"]] = tuple(handle.get_slice(key).get_shape())
    except (SafetensorError, OSError) as error:
        raise FloristError(f"{weights_file}: not a readable safetensors file ({error}); re-save the adapter") from None
    return shapes


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    safetensors_file = path / ADAPTER_WEIGHTS
    pickle_file = path / ADAPTER_WEIGHTS_PICKLE
    if safetensors_file.is_file():
        try:  # pread: each tensor in a buffer of its own (not views of one file map), freed on its own
            return load_file(safetensors_file, backend="pread")
        except (SafetensorError, OSError, ValueError) as error:
            raise FloristError(
                f"{safetensors_file}: not a readable safetensors file ({error}); re-export the client adapter"
            ) from None
    if pickle_file.is_file():
        try:  # never unpickle arbitrary objects from a client
            return torch.load(pickle_file, map_location="cpu", weights_only=True)
        except Exception as error:
            raise FloristError(
                f"{pickle_file}: cannot be loaded with weights_only=True ({type(error).__name__}); "
                "re-save the adapter with safetensors (save_pretrained's default)"
            ) from None
    raise FloristError(f"{path}: no {ADAPTER_WEIGHTS} found; point at a directory written by PEFT's save_pretrained")


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite: min and max propagate NaN and hold ±Inf. One reduction with no
    tensor-sized temporary: on bf16 factors ~25× faster than ``isfinite(t).all()``, which was most of
    reading a client (and of FedIT's whole server step)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _read_config(path: Path) -> dict:
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FloristError(f"{config_file}: missing; pass a directory written by PEFT's save_pretrained")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FloristError(f"{config_file}: corrupt JSON ({error}); re-export the client adapter") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA" or "r" not in config:
        raise FloristError(f"{config_file}: not a LoRA adapter config (peft_type LORA with r and lora_alpha expected)")
    if config.get("use_dora"):
        raise FloristError(f"{config_file}: DoRA adapters are not supported; train the clients with use_dora=False")
    return config


def read_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Read and check one PEFT LoRA adapter directory; every problem is a one-line FloristError."""
    path = Path(path)
    if not path.is_dir():
        raise FloristError(f"{path}: adapter directory not found; pass a directory written by PEFT's save_pretrained")
    config = _read_config(path)

    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _load_weights(path).items():
        match = _FACTOR_KEY.match(key)
        if match is None:
            raise FloristError(
                f"{path / ADAPTER_WEIGHTS}: tensor {key!r} is not a LoRA linear factor; only lora_A/lora_B of "
                "linear layers are aggregated (drop modules_to_save, embedding LoRA and bias training)"
            )
        factors.setdefault(match["module"], {})[match["factor"]] = tensor
    if not factors:
        raise FloristError(f"{path / ADAPTER_WEIGHTS}: holds no LoRA factors; re-export the client adapter")

    modules: dict[str, ClientModule] = {}
    dtypes = set()
    for name, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise FloristError(f"{path}: module {name} has no lora_{missing}; re-export the client adapter")
        lora_a, lora_b = pair["A"], pair["B"]
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.numel() == 0 or lora_b.numel() == 0:
            raise FloristError(
                f"{path}: module {name} has empty or non-matrix factors (A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}); "
                "under DeepSpeed ZeRO-3 gather the parameters before saving"
            )
        if lora_a.shape[0] != lora_b.shape[1]:
            raise FloristError(
                f"{path}: module {name} has lora_A rank {lora_a.shape[0]} but lora_B rank {lora_b.shape[1]}; re-export the client adapter"
            )
        for factor, tensor in (("lora_A", lora_a), ("lora_B", lora_b)):
            if not all_finite(tensor):
                raise FloristError(
                    f"{path}: module {name} {factor} contains NaN or Inf; drop this client or retrain it with a lower learning rate"
                )
        dtypes.add(lora_a.dtype)
        modules[name] = ClientModule(lora_a=lora_a, lora_b=lora_b, scale=module_scale(config, name))

    return LoraAdapter(path, config, modules, _read_num_samples(path), widest_dtype(dtypes))


def _read_num_samples(path: Path) -> int | None:
    info_file = path / CLIENT_INFO
    if not info_file.is_file():
        return None
    try:
        num_samples = json.loads(info_file.read_text())["num_samples"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise FloristError(f"{info_file}: corrupt or without num_samples; fix it or pass --weights") from None
    if not isinstance(num_samples, int) or num_samples <= 0:
        raise FloristError(f"{info_file}: num_samples must be a positive integer, got {num_samples!r}")
    return num_samples


def adapter_layout(adapter_dir: str | os.PathLike) -> dict:
    """What `read_adapter_layout` reads back: ``{"dtype": ..., "modules": {module: [m, r, n]}}``, from
    the safetensors header alone (the factors are not read)."""
    from safetensors import safe_open

    weights_file = Path(adapter_dir) / ADAPTER_WEIGHTS
    with safe_open(weights_file, framework="pt") as handle:
        dtypes = {_SAFETENSORS_DTYPES[handle.get_slice(key).get_dtype()] for key in handle.keys()}
    shapes = factor_shapes(adapter_dir)
    return {"dtype": str(widest_dtype(dtypes)).removeprefix("torch."),
            "modules": {name: [pair["B"][0], pair["A"][0], pair["A"][1]] for name, pair in sorted(shapes.items())}}


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def read_adapter_layout(path: str | os.PathLike) -> LoraAdapter:
    """A client adapter the server knows only by its layout (secure aggregation, `ADAPTER_LAYOUT`): its
    config, sample count, dtype and module shapes, the factors storage-free (`without_factors`)."""
    path = Path(path)
    config = _read_config(path)
    try:
        layout = json.loads((path / ADAPTER_LAYOUT).read_text())
        dtype = getattr(torch, layout["dtype"])
        modules = {name: ClientModule(torch.empty(r, n, device="meta"), torch.empty(m, r, device="meta"),
                                      module_scale(config, name))
                   for name, (m, r, n) in layout["modules"].items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise FloristError(f"{path / ADAPTER_LAYOUT}: missing or corrupt ({type(error).__name__}); the client's reply "
                           "did not describe its adapter — run the round again") from None
    if not isinstance(dtype, torch.dtype) or not modules:
        raise FloristError(f"{path / ADAPTER_LAYOUT}: no float dtype or no modules; run the round again")
    return LoraAdapter(path, config, modules, _read_num_samples(path), dtype)


def widest_dtype(dtypes) -> torch.dtype:
    """The most precise of some float dtypes (fp16 ranks above bf16: more mantissa bits)."""
    return max(dtypes, key=lambda dtype: (torch.finfo(dtype).bits, torch.finfo(dtype).eps < 2**-8))


def read_client_adapters(paths: Sequence[str | os.PathLike]) -> list[LoraAdapter]:
    """Read every client and check they adapt the same modules with the same shapes."""
    if not paths:
        raise FloristError("no client adapter directories given")
    adapters = [read_adapter(path) for path in paths]
    for adapter in adapters[1:]:
        check_same_modules(adapters[0], adapter)
    return adapters


def check_same_modules(reference: LoraAdapter, adapter: LoraAdapter) -> None:
    """A FloristError unless ``adapter`` adapts the same modules, with the same shapes, as ``reference``."""
    only_here = sorted(set(adapter.modules) - set(reference.modules))
    only_there = sorted(set(reference.modules) - set(adapter.modules))
    if only_here or only_there:
        module = (only_here or only_there)[0]
        where = adapter.path if only_here else reference.path
        raise FloristError(
            f"{adapter.path}: target modules differ from {reference.path} (module {module} only in {where}); "
            "train every client with the same target_modules"
        )
    for name, module in adapter.modules.items():
        if module.shape != reference.modules[name].shape:
            raise FloristError(
                f"{adapter.path}: module {name} has shape {module.shape} but {reference.path} has "
                f"{reference.modules[name].shape}; every client must fine-tune the same base model"
            )


def without_factors(adapter: LoraAdapter) -> LoraAdapter:
    """The adapter's record with its factors replaced by storage-free tensors of the same shapes
    (on the meta device): what a streaming server keeps of a client once it has been folded in."""
    modules = {
        name: ClientModule(module.lora_a.to("meta"), module.lora_b.to("meta"), module.scale)
        for name, module in adapter.modules.items()
    }
    return LoraAdapter(adapter.path, adapter.config, modules, adapter.num_samples, adapter.dtype)


def client_weights(adapters: Sequence[LoraAdapter], explicit: Sequence[float] | None = None) -> list[float]:
    """Explicit weights, else each client's recorded num_samples, else equal weights."""
    if explicit is not None:
        if len(explicit) != len(adapters):
            raise FloristError(
                f"--weights has {len(explicit)} values for {len(adapters)} client adapters; give one weight per client"
            )
        if any(not math.isfinite(w) or w <= 0 for w in explicit):
            raise FloristError(f"--weights must all be positive finite numbers, got {list(explicit)}")
        return [float(w) for w in explicit]
    recorded = [adapter.num_samples for adapter in adapters]
    if all(n is None for n in recorded):
        return [1.0] * len(adapters)
    if any(n is None for n in recorded):
        missing = next(a.path for a in adapters if a.num_samples is None)
        raise FloristError(
            f"{missing}: no {CLIENT_INFO} with num_samples while other clients have one; add it or pass --weights"
        )
    return [float(n) for n in recorded]


def _most_common(values: Sequence[int]) -> int:
    counts = Counter(values)
    return max(counts, key=lambda value: (counts[value], value))


def lora_config_for_ranks(template: Mapping, ranks: Mapping[str, int]) -> dict:
    """A LoraConfig dict whose per-module ranks are ``ranks`` and whose scaling is 1 everywhere.

    The factors written with it carry their scale already, so every module's alpha equals its
    rank. PEFT reads ``rank_pattern`` and ``alpha_pattern`` independently: any module whose rank
    differs from ``r`` gets both entries, or its scaling would silently change.
    """
    default_rank = _most_common(list(ranks.values()))
    rank_pattern = {model_key(name): rank for name, rank in ranks.items() if rank != default_rank}
    config = dict(template)
    config.update(
        r=default_rank,
        lora_alpha=default_rank,
        rank_pattern=rank_pattern,
        alpha_pattern=dict(rank_pattern),
        use_rslora=False,
        use_dora=False,
        modules_to_save=None,
        inference_mode=True,
    )
    return config


def save_adapter_files(
    directory: str | os.PathLike,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    config_template: Mapping,
    dtype: torch.dtype = torch.float32,
    sidecar: Mapping | None = None,
    client_info: Mapping | None = None,
) -> Path:
    """Write a PEFT adapter from effective factors ``{module: (B, A)}`` (scaling 1) into ``directory``.

    Not atomic by itself: call it on a staging directory (``io_utils.atomic_directory``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ranks = {name: lora_a.shape[0] for name, (_, lora_a) in factors.items()}
    tensors = {}
    for name, (lora_b, lora_a) in factors.items():
        tensors[f"{name}.lora_A.weight"] = lora_a.to(dtype).contiguous()
        tensors[f"{name}.lora_B.weight"] = lora_b.to(dtype).contiguous()
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    write_json_atomic(directory / ADAPTER_CONFIG, lora_config_for_ranks(config_template, ranks))
    if sidecar is not None:
        write_json_atomic(directory / SIDECAR, dict(sidecar))
    if client_info is not None:
        write_json_atomic(directory / CLIENT_INFO, dict(client_info))
    return directory
