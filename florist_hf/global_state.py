"""The global model of a merge-style federation on disk and on a model: the compact cumulative
update (`aggregation.cumulative`) written as one state directory per round, and attached beside a
model's frozen linear layers as a forward hook; and a round's whole global model put into a client's
fresh PEFT model (`install_global_state`: the state attached, continued factors copied in).

A state directory holds ``global_state.safetensors`` (per module ``<name>.lora_A`` and
``<name>.lora_B``, or ``<name>.delta``; fp64) and ``global_state.json`` (the rounds it sums, the
digests of their global adapters, each module's form and rank). It replaces the T round adapters
that clients used to attach side by side: its size is bounded per module by min(low-rank, dense).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from florist_hf.aggregation.cumulative import HeldUpdate, accumulate, held_numel
from florist_hf.errors import FloristError
from florist_hf.io_utils import atomic_directory, write_json_atomic

STATE_FORMAT = "florist-hf/global-state"
STATE_WEIGHTS = "global_state.safetensors"
STATE_RECORD = "global_state.json"
#: Kept on disk (by the server and by each Flower node) in fp64: the exact sum, with the
#: orthonormal factor orthonormal to fp64 round-off, so that a later round's columns inside its
#: span are recognised as such.
STATE_DTYPE = torch.float64
#: Sent to nodes and held on a client's layers in fp32, as the round updates were before.
WIRE_DTYPE = torch.float32

#: Buffer names `attach_global_state` puts on a linear layer (low-rank factors or the dense
#: delta), and the attribute that keeps its hook's handle.
GLOBAL_A, GLOBAL_B, GLOBAL_DELTA, GLOBAL_HOOK = "florist_global_a", "florist_global_b", "florist_global_delta", "florist_global_hook"
#: Set on a layer while its held update is left out of the forward (`apply_global_state`).
GLOBAL_OFF = "florist_global_off"


@dataclass
class GlobalState:
    """The cumulative update Σ_t s_t·B_t·A_t of the rounds ``rounds``, per module (full PEFT names)."""

    modules: dict[str, HeldUpdate]
    rounds: list[int]
    #: Digest of each round's global adapter, by round (str keys, as JSON has them).
    inputs: dict[str, str] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(module.numel for module in self.modules.values())

    @property
    def wire_bytes(self) -> int:
        """Bytes of its tensors as sent (fp32)."""
        return self.numel * torch.finfo(WIRE_DTYPE).bits // 8


def fold(state: GlobalState | None, adapters: Sequence, rounds: Sequence[int], digests: Sequence[str] = ()) -> GlobalState:
    """``state`` plus the updates of ``adapters`` (`adapters.LoraAdapter`, one per round in
    ``rounds``), re-factorised exactly in one step per module (`aggregation.cumulative.accumulate`)."""
    names = list(adapters[0].modules) if adapters else list(state.modules)
    for adapter in adapters:
        if set(adapter.modules) != set(names) or (state is not None and set(state.modules) != set(names)):
            raise FloristError(f"{adapter.path}: its modules differ from the global state's; target_modules must match")
    modules = {}
    for name in names:
        held = state.modules[name] if state is not None else None
        updates = [adapter.modules[name] for adapter in adapters]
        if held is not None and updates and held.shape != updates[0].shape:
            raise FloristError(f"{adapters[0].path}: module {name} is {updates[0].shape}, the global state's {held.shape}")
        modules[name] = accumulate(held, updates).to(STATE_DTYPE)
    inputs = {**(state.inputs if state is not None else {}), **{str(t): d for t, d in zip(rounds, digests)}}
    return GlobalState(modules, sorted([*(state.rounds if state is not None else []), *rounds]), inputs)


def write_global_state(state: GlobalState, out_dir: str | os.PathLike) -> Path:
    """The state directory, written atomically (replacing what was there)."""
    tensors, record = state_tensors(state)
    with atomic_directory(out_dir, overwrite=True) as staging:
        save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, str(staging / STATE_WEIGHTS))
        write_json_atomic(staging / STATE_RECORD, record)
    return Path(out_dir)


def read_state_record(state_dir: str | os.PathLike) -> dict | None:
    """A state directory's record, or None where there is none (or it cannot be read)."""
    try:
        record = json.loads((Path(state_dir) / STATE_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("format") == STATE_FORMAT else None


def read_global_state(state_dir: str | os.PathLike) -> GlobalState:
    state_dir = Path(state_dir)
    record = read_state_record(state_dir)
    if record is None:
        raise FloristError(f"{state_dir}: not a florist-hf global state ({STATE_RECORD} missing or unreadable); "
                           "rerun the federation to rebuild it from the rounds' global adapters")
    try:
        tensors = load_file(str(state_dir / STATE_WEIGHTS))
    except (OSError, SafetensorError) as error:
        raise FloristError(f"{state_dir / STATE_WEIGHTS}: cannot be read ({error}); rerun the federation to rebuild it") from None
    return state_from_tensors(tensors, record, str(state_dir))


def state_from_tensors(tensors: Mapping[str, torch.Tensor], record: Mapping, source: str) -> GlobalState:
    """A state from its tensors and record (a directory's, or a Flower message's)."""
    modules = {}
    try:
        for name, entry in record["modules"].items():
            shape = tuple(entry["shape"])
            if entry["form"] == "dense":
                modules[name] = HeldUpdate(shape, dense=tensors[f"{name}.delta"])
            else:
                modules[name] = HeldUpdate(shape, lora_b=tensors[f"{name}.lora_B"], lora_a=tensors[f"{name}.lora_A"])
            held = modules[name]
            if (held.dense.shape if held.is_dense else (held.lora_b.shape[0], held.lora_a.shape[1])) != shape:
                raise ValueError(f"module {name}'s tensors are not {shape}")
    except (KeyError, TypeError, ValueError) as error:
        raise FloristError(f"{source}: the global state is inconsistent ({error}); rerun the federation to rebuild it") from None
    return GlobalState(modules, [int(t) for t in record.get("rounds", [])], dict(record.get("inputs", {})))


def state_tensors(state: GlobalState, dtype: torch.dtype = STATE_DTYPE) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, record) of a state, as `write_global_state` writes them (and a Flower message
    carries them, in ``WIRE_DTYPE``) and `state_from_tensors` reads them."""
    tensors, modules = {}, {}
    for name, module in state.modules.items():
        if module.is_dense:
            tensors[f"{name}.delta"] = module.dense.to(dtype)
        else:
            tensors[f"{name}.lora_A"] = module.lora_a.to(dtype)
            tensors[f"{name}.lora_B"] = module.lora_b.to(dtype)
        modules[name] = {"shape": list(module.shape), "form": "dense" if module.is_dense else "low_rank", "rank": module.rank}
    return tensors, {"format": STATE_FORMAT, "version": 1, "rounds": state.rounds, "inputs": state.inputs, "modules": modules}


# --- the state on a model ------------------------------------------------------------------------


def _add_global_update(module, inputs, output):
    # y = W x + ΔW x with ΔW the cumulative update: B_g (A_g x) while low-rank, D x once dense. The
    # update is held in fp32 and multiplied at the precision of the layer's own forward: in a
    # bf16/fp16 forward a half-precision product (fp32 accumulation) adds an error of the order of
    # the base product's own, relative to the far smaller ΔW x, and costs a half-precision GEMM
    # instead of an fp32 one (on a CPU with AMX, or on tensor cores, 5-10x less).
    if module.__dict__.get(GLOBAL_OFF, False):
        return output
    x = inputs[0]
    compute = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else WIRE_DTYPE
    delta = getattr(module, GLOBAL_DELTA, None)
    if delta is not None:
        update = torch.nn.functional.linear(x.to(compute), delta.to(compute))
    else:
        global_a, global_b = getattr(module, GLOBAL_A), getattr(module, GLOBAL_B)
        update = torch.nn.functional.linear(torch.nn.functional.linear(x.to(compute), global_a.to(compute)), global_b.to(compute))
    return output + update.to(output.dtype)


def _linear_layers(model) -> dict:
    """Every nn.Linear by its PEFT module name (``base_model.model.…``), a LoRA layer's base included."""
    from florist_hf.adapters import PEFT_PREFIX

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(part in name for part in (".lora_A.", ".lora_B.")):
            key = name.removesuffix(".base_layer")
            layers[key if key.startswith(PEFT_PREFIX) else PEFT_PREFIX + key] = module
    return layers


@torch.no_grad()
def attach_global_state(model, state: GlobalState | None) -> list:
    """Make ``model`` the base plus the cumulative update ``state``, exactly.

    The base weights are left as loaded; each adapted linear layer gets the module's held update
    as fp32 buffers (low-rank factors, or the dense delta) and a forward hook that adds it to the
    layer's output (SPEC §4 allows the sum as a frozen adapter beside the trainable one). Nothing
    is rounded into the base's dtype, so a bf16 or quantized base trains on base + Σ updates at its
    forward precision in every round. Works on a PEFT model (the LoRA layers' base layers) and on a
    plain model alike; returns the hook handles.
    """
    if state is None or not state.modules:
        return []
    layers = _linear_layers(model)
    handles = []
    for name, held in state.modules.items():
        if name not in layers:
            raise FloristError(f"global state: module {name} is not a linear layer of the model; target_modules must match")
        layer = layers[name]
        if hasattr(layer, GLOBAL_HOOK):
            raise FloristError(f"{name}: a global state is already attached; detach_global_state first")
        if (layer.out_features, layer.in_features) != tuple(held.shape):
            raise FloristError(f"global state: module {name} is {tuple(held.shape)}, the model's layer "
                               f"{(layer.out_features, layer.in_features)}; the state belongs to another base model")
        device = layer.weight.device if layer.weight.device.type != "meta" else torch.device("cpu")
        if held.is_dense:
            layer.register_buffer(GLOBAL_DELTA, held.dense.to(device=device, dtype=WIRE_DTYPE), persistent=False)
        else:
            layer.register_buffer(GLOBAL_A, held.lora_a.to(device=device, dtype=WIRE_DTYPE), persistent=False)
            layer.register_buffer(GLOBAL_B, held.lora_b.to(device=device, dtype=WIRE_DTYPE), persistent=False)
        handle = layer.register_forward_hook(_add_global_update)
        setattr(layer, GLOBAL_HOOK, handle)
        handles.append(handle)
    return handles


def held_layers(model) -> list:
    """The layers of ``model`` that hold a global update (`attach_global_state`)."""
    return [module for module in model.modules() if GLOBAL_HOOK in module.__dict__]


def apply_global_state(layers, applied: bool) -> None:
    """Whether the held update of ``layers`` (`held_layers`) is in their forward: left out, the model is its
    base alone (a DPO client's reference under ``reference_policy: base``)."""
    for layer in layers:
        layer.__dict__[GLOBAL_OFF] = not applied


def detach_global_state(model) -> None:
    """Undo `attach_global_state`: hooks and buffers removed, the layers as loaded."""
    for module in model.modules():
        module.__dict__.pop(GLOBAL_OFF, None)
        handle = module.__dict__.pop(GLOBAL_HOOK, None)
        if handle is not None:
            handle.remove()
            for buffer in (GLOBAL_A, GLOBAL_B, GLOBAL_DELTA):
                if hasattr(module, buffer):
                    delattr(module, buffer)


def held_delta(layer) -> torch.Tensor | None:
    """The dense fp64 update attached to ``layer`` (tests and diagnostics), or None."""
    if getattr(layer, GLOBAL_DELTA, None) is not None:
        return getattr(layer, GLOBAL_DELTA).double()
    if getattr(layer, GLOBAL_A, None) is not None:
        return getattr(layer, GLOBAL_B).double() @ getattr(layer, GLOBAL_A).double()
    return None


def record_wire_bytes(record: Mapping) -> int:
    """`GlobalState.wire_bytes` of a state from its record alone."""
    numel = sum(held_numel(tuple(entry["shape"]), entry["rank"], entry["form"] == "dense") for entry in record["modules"].values())
    return numel * torch.finfo(WIRE_DTYPE).bits // 8


def fold_state(state: GlobalState, other: GlobalState) -> GlobalState:
    """Two states of disjoint rounds summed (a Flower node's state and a catch-up), exactly."""
    from florist_hf.aggregation.cumulative import add_held

    if set(state.modules) != set(other.modules):
        raise FloristError("the catch-up update's modules differ from the global state's; target_modules must match")
    if set(state.rounds) & set(other.rounds):
        raise FloristError(f"the catch-up update repeats rounds {sorted(set(state.rounds) & set(other.rounds))} of the global state")
    modules = {name: add_held(held, other.modules[name]).to(STATE_DTYPE) for name, held in state.modules.items()}
    return GlobalState(modules, sorted(state.rounds + other.rounds), {**state.inputs, **other.inputs})


def state_of_adapters(adapter_dirs: Sequence[str | os.PathLike], rounds: Sequence[int] | None = None) -> GlobalState:
    """The global state of the round global adapters ``adapter_dirs`` (oldest first), folded one
    round at a time as the engine and a Flower node fold them."""
    from florist_hf.adapters import read_adapter

    state = None
    for index, adapter_dir in enumerate(adapter_dirs):
        state = fold(state, [read_adapter(adapter_dir)], [rounds[index] if rounds else index + 1])
    return state


# --- the global model of a round, put into a client's fresh PEFT model ------------------------------


def lora_layers(model) -> dict:
    """The LoRA-wrapped linear layers of a PEFT model, by the names PEFT saves them under."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


@torch.no_grad()
def install_global_state(model, plan, adapter_name: str = "default") -> None:
    """Put the global model of this round into a freshly built PEFT model (SPEC §4); ``plan`` is the
    client's `client.ClientRound`.

    Merge-style methods hold the cumulative update of every earlier round beside the frozen base
    (`global_state.attach_global_state`) and train a fresh LoRA; continue-style methods copy the global
    factors into the client's LoRA, taking the first r_k components and dividing B by the
    client's own scale so that s_k·B·A is the global update.

    Call it before the model is wrapped for training (``FederatedCallback`` does, at the end of the
    Trainer's ``__init__``): DeepSpeed copies the trainable factors into its own fp32 optimizer
    partitions when it wraps the model, and would overwrite later changes at the first step. Under
    ZeRO-3 the LoRA factors are gathered, changed on rank 0 and re-partitioned; every process must
    call this then (it is collective).
    """
    from florist_hf.adapters import read_adapter
    from florist_hf.distributed import gathered_parameters

    layers = lora_layers(model)
    if plan.global_state is not None:
        attach_global_state(model, read_global_state(plan.global_state))
    if plan.init_adapter is not None:
        for name, update in read_adapter(plan.init_adapter).modules.items():
            layer = _layer(layers, name, plan.init_adapter)
            rank, scale = layer.r[adapter_name], layer.scaling[adapter_name]
            if update.rank < rank:
                raise FloristError(
                    f"{plan.init_adapter}: module {name} has rank {update.rank}, below client {plan.client_id}'s rank {rank}"
                )
            lora_a = layer.lora_A[adapter_name].weight
            lora_b = layer.lora_B[adapter_name].weight
            with gathered_parameters([lora_a, lora_b], modifier_rank=0):
                lora_a.copy_(update.lora_a[:rank].to(device=lora_a.device, dtype=lora_a.dtype))
                global_b = update.scale / scale * update.lora_b[:, :rank].to(torch.float64)
                lora_b.copy_(global_b.to(device=lora_b.device, dtype=lora_b.dtype))
    if plan.freeze_lora_a:
        for layer in layers.values():
            layer.lora_A[adapter_name].weight.requires_grad_(False)


def _layer(layers: dict, name: str, source: Path):
    try:
        return layers[name]
    except KeyError:
        raise FloristError(f"{source}: module {name} is not adapted in the client model; target_modules must match") from None
