"""PEFT adapters on the Flower wire.

An adapter travels as an ``ArrayRecord`` whose keys are the tensor names of its
``adapter_model.safetensors`` (PEFT's own names, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``) plus a ``ConfigRecord`` that
holds its ``adapter_config.json`` verbatim and each tensor's torch dtype. Writing the two back out
gives a directory that ``read_adapter`` reads exactly as the original: same tensors, same
config, hence the same per-module scaling.

numpy has no bfloat16, so bfloat16 tensors travel as float32 (exact) and are cast back on arrival.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from safetensors.torch import load_file, save_file

from florist_hf.adapters import ADAPTER_CONFIG, ADAPTER_LAYOUT, ADAPTER_WEIGHTS, CLIENT_INFO, adapter_layout
from florist_hf.errors import FloristError
from florist_hf.io_utils import atomic_directory, write_json_atomic

#: ConfigRecord keys of an adapter on the wire.
ADAPTER_CONFIG_KEY = "adapter-config"
TENSOR_DTYPES_KEY = "tensor-dtypes"
#: ConfigRecord key of an adapter's layout (secure aggregation: the factors stay with the client).
LAYOUT_KEY = "adapter-layout"

_WIRE_SUBSTITUTES = {torch.bfloat16: torch.float32}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensors_to_records(tensors: dict[str, torch.Tensor], adapter_config: str | dict) -> tuple[ArrayRecord, ConfigRecord]:
    """``{PEFT name: tensor}`` and an adapter config -> (ArrayRecord, ConfigRecord)."""
    arrays = ArrayRecord()
    dtypes = {}
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu()
        dtypes[name] = _dtype_name(tensor.dtype)
        wire = tensor.to(_WIRE_SUBSTITUTES.get(tensor.dtype, tensor.dtype)).contiguous()
        arrays[name] = Array(wire.numpy())
    config_text = adapter_config if isinstance(adapter_config, str) else json.dumps(adapter_config, indent=2)
    return arrays, ConfigRecord({ADAPTER_CONFIG_KEY: config_text, TENSOR_DTYPES_KEY: json.dumps(dtypes)})


def adapter_to_records(adapter_dir: str | os.PathLike) -> tuple[ArrayRecord, ConfigRecord]:
    """A PEFT adapter directory (safetensors + adapter_config.json) -> (ArrayRecord, ConfigRecord)."""
    adapter_dir = Path(adapter_dir)
    weights, config = adapter_dir / ADAPTER_WEIGHTS, adapter_dir / ADAPTER_CONFIG
    if not weights.is_file() or not config.is_file():
        raise FloristError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG}; not a PEFT adapter directory")
    return tensors_to_records(load_file(weights), config.read_text())


def records_to_tensors(arrays: ArrayRecord, config: ConfigRecord, *, source: str = "message") -> dict[str, torch.Tensor]:
    """The inverse of ``tensors_to_records``: ``{PEFT name: tensor}`` in each tensor's own dtype."""
    try:
        dtypes = json.loads(str(config.get(TENSOR_DTYPES_KEY, "{}")))
    except json.JSONDecodeError:
        raise FloristError(f"{source}: {TENSOR_DTYPES_KEY} is not JSON") from None
    tensors = {}
    for name, array in arrays.items():
        tensor = torch.from_numpy(array.numpy().copy())
        dtype_name = dtypes.get(name)
        if dtype_name is not None:
            dtype = getattr(torch, dtype_name, None)
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise FloristError(f"{source}: tensor {name!r} has unsupported dtype {dtype_name!r}")
            tensor = tensor.to(dtype)
        tensors[name] = tensor
    if not tensors:
        raise FloristError(f"{source}: the adapter record holds no tensors")
    return tensors


def adapter_config_text(config: ConfigRecord, *, source: str = "message") -> str:
    text = config.get(ADAPTER_CONFIG_KEY)
    if not isinstance(text, str):
        raise FloristError(f"{source}: no {ADAPTER_CONFIG_KEY} in the adapter's ConfigRecord")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        raise FloristError(f"{source}: {ADAPTER_CONFIG_KEY} is not JSON") from None
    if not isinstance(parsed, dict):
        raise FloristError(f"{source}: {ADAPTER_CONFIG_KEY} is not a JSON object")
    return text


def write_adapter_records(
    out_dir: str | os.PathLike,
    arrays: ArrayRecord,
    config: ConfigRecord,
    *,
    client_info: dict | None = None,
    overwrite: bool = True,
    source: str = "message",
) -> Path:
    """Write an adapter received as records into ``out_dir`` (atomically) as a PEFT adapter directory."""
    tensors = records_to_tensors(arrays, config, source=source)
    config_text = adapter_config_text(config, source=source)
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        save_file(tensors, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(config_text)
        if client_info is not None:
            write_json_atomic(staging / CLIENT_INFO, client_info)
    return Path(out_dir)


def layout_to_config(adapter_dir: str | os.PathLike) -> ConfigRecord:
    """What a client says of its adapter under secure aggregation: its config and its layout
    (`adapters.adapter_layout`), not its factors."""
    adapter_dir = Path(adapter_dir)
    return ConfigRecord({ADAPTER_CONFIG_KEY: (adapter_dir / ADAPTER_CONFIG).read_text(),
                         LAYOUT_KEY: json.dumps(adapter_layout(adapter_dir))})


def write_layout_records(out_dir: str | os.PathLike, config: ConfigRecord, *, client_info: dict,
                         source: str = "message") -> Path:
    """The server's record of a client whose factors it never receives (`layout_to_config`), written
    atomically; `adapters.read_adapter_layout` reads it."""
    config_text = adapter_config_text(config, source=source)
    layout = config.get(LAYOUT_KEY)
    if not isinstance(layout, str):
        raise FloristError(f"{source}: no {LAYOUT_KEY} (a client under secure aggregation describes its adapter)")
    with atomic_directory(out_dir, overwrite=True) as staging:
        (staging / ADAPTER_CONFIG).write_text(config_text)
        (staging / ADAPTER_LAYOUT).write_text(layout)
        write_json_atomic(staging / CLIENT_INFO, client_info)
    return Path(out_dir)


#: ConfigRecord key of a global state on the wire: its `global_state.json` record.
STATE_RECORD_KEY = "global-state"


def state_to_records(state) -> tuple[ArrayRecord, ConfigRecord]:
    """A `global_state.GlobalState` -> (ArrayRecord of its fp32 tensors, ConfigRecord of its record)."""
    from florist_hf.global_state import WIRE_DTYPE, state_tensors

    tensors, record = state_tensors(state, WIRE_DTYPE)
    arrays = ArrayRecord()
    for name in sorted(tensors):
        arrays[name] = Array(tensors[name].detach().cpu().contiguous().numpy())
    return arrays, ConfigRecord({STATE_RECORD_KEY: json.dumps(record)})


def records_to_state(arrays: ArrayRecord, config: ConfigRecord, *, source: str = "message"):
    """The inverse of `state_to_records`."""
    from florist_hf.global_state import state_from_tensors

    try:
        record = json.loads(str(config[STATE_RECORD_KEY]))
    except (KeyError, json.JSONDecodeError):
        raise FloristError(f"{source}: no readable {STATE_RECORD_KEY} record beside the global state's tensors") from None
    tensors = {name: torch.from_numpy(array.numpy().copy()) for name, array in arrays.items()}
    return state_from_tensors(tensors, record, source)
