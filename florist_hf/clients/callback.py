"""The round boundary of one client: `FederatedCallback` installs the global state when the Trainer is
built and exports the client's PEFT adapter (with its sample count and metrics) when it ends."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from florist_hf.adapters import ADAPTER_WEIGHTS, CLIENT_INFO, all_finite, factor_shapes
from florist_hf.distributed import gathered_state_dict
from florist_hf.errors import FloristError
from florist_hf.global_state import install_global_state, lora_layers
from florist_hf.io_utils import atomic_directory, write_json_atomic


@dataclass
class ClientRound:
    """What one client does in one round: where it starts from and where its adapter goes."""

    client_id: int
    round: int
    rank: int
    num_samples: int
    export_dir: Path
    #: The global state the client trains on top of, held beside the frozen base (FLoRIST, FLoRA:
    #: the cumulative update of every earlier round, a `global_state` directory).
    global_state: Path | None = None
    #: Global factors to continue training from, sliced to this client's rank (FedIT, FFA, FlexLoRA, FedSVD).
    init_adapter: Path | None = None
    #: FFA-LoRA, FedSVD: A stays as the server sent it (FFA: the shared random init), only B trains.
    freeze_lora_a: bool = False


def is_lora_factor(name: str, param=None) -> bool:
    """A LoRA linear factor, by its parameter name (``...lora_A.<adapter>.weight``)."""
    return ".lora_A." in name or ".lora_B." in name


def export_client_adapter(model, plan: ClientRound, metrics: dict, *, state_dict: dict | None = None,
                          is_main_process: bool = True, adapter_name: str = "default") -> Path:
    """Save the client's PEFT adapter and its sample count, atomically.

    Under DeepSpeed ZeRO-3 every process must call this: the LoRA factors are gathered from their
    partitions together (or passed in as ``state_dict``, already gathered), and only the main
    process writes. What was written is read back and checked against the shapes the layers
    expect, so an export of ungathered partitions (``torch.Size([0])``) never reaches the server.
    """
    if state_dict is None:
        state_dict = gathered_state_dict(model, is_lora_factor)
    if is_main_process:
        with atomic_directory(plan.export_dir, overwrite=True) as staging:
            # The client's adapter alone (a DPO client holds its reference beside it as a second adapter).
            model.save_pretrained(staging, state_dict=state_dict, selected_adapters=[adapter_name])
            check_exported_factors(staging, model, adapter_name)
            write_json_atomic(
                staging / CLIENT_INFO,
                {"client": plan.client_id, "round": plan.round, "rank": plan.rank, "num_samples": plan.num_samples, **metrics},
            )
    return plan.export_dir


def check_exported_factors(adapter_dir: Path, model, adapter_name: str = "default") -> None:
    """Refuse an exported adapter whose LoRA tensors are empty or not the shape their layer expects.

    lora_A must be (r, in_features) and lora_B (out_features, r), for every adapted layer.
    DeepSpeed ZeRO-3 leaves an empty placeholder (``torch.Size([0])``) in each partitioned
    parameter, and a save that does not gather first writes those placeholders.
    """
    weights_file = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise FloristError(f"{weights_file}: not written by save_pretrained; the client adapter export failed")
    shapes = factor_shapes(adapter_dir)
    saved = {f"{name}.lora_{factor}.weight": torch.Size(shape) for name, module in shapes.items() for factor, shape in module.items()}
    for name, layer in lora_layers(model).items():
        rank = layer.r[adapter_name]
        expected = {"lora_A": (rank, layer.in_features), "lora_B": (layer.out_features, rank)}
        for factor, shape in expected.items():
            key = f"{name}.{factor}.weight"
            if key not in saved:
                raise FloristError(
                    f"{adapter_dir}: module {name} has no {factor} in the exported adapter; the client adapter export failed"
                )
            got = saved[key]
            if got.numel() == 0:
                raise FloristError(
                    f"{adapter_dir}: module {name} saved an empty {factor} tensor ({got}): under DeepSpeed ZeRO-3 gather "
                    "the parameters before saving (deepspeed.zero.GatheredParameters, or export_client_adapter on every process)"
                )
            if tuple(got) != shape:
                raise FloristError(
                    f"{adapter_dir}: module {name} saved {factor} with shape {tuple(got)}, expected {shape} "
                    f"({'rank × in_features' if factor == 'lora_A' else 'out_features × rank'}); under DeepSpeed ZeRO-3 "
                    "gather the parameters before saving"
                )


class FederatedCallback(TrainerCallback):
    """Turns a Trainer run into one client round: global state in when the Trainer is built, adapter out at train end.

    Attach it to your own Trainer whose model is a PEFT LoRA model::

        trainer = Trainer(model=peft_model, args=args, train_dataset=shard,
                          callbacks=[FederatedCallback(ClientRound(client_id=0, round=1, rank=16,
                                                                   num_samples=len(shard),
                                                                   export_dir=Path("out/client_0")))])
        trainer.train()   # out/client_0 now holds the adapter + client.json for the server
    """

    def __init__(self, plan: ClientRound, info: dict | None = None):
        self.plan = plan
        #: Recorded with the adapter beside its metrics (a DP-SGD client's privacy spent).
        self.info = dict(info or {})
        self.metrics: dict = {}
        self._started = 0.0
        self._resumed_at = 0
        self._installed = False

    def on_init_end(self, args, state, control, model=None, **kwargs):
        # Before the Trainer wraps the model (DeepSpeed, DDP) and builds its optimizer: DeepSpeed
        # keeps its own fp32 copy of the trainable factors from then on.
        install_global_state(model, self.plan)
        self._installed = True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self._installed:  # attached with trainer.add_callback after the Trainer was built
            if getattr(args, "deepspeed_plugin", None) is not None and (self.plan.init_adapter or self.plan.freeze_lora_a):
                raise FloristError(
                    f"client {self.plan.client_id}: under DeepSpeed pass FederatedCallback to the Trainer's constructor "
                    "(callbacks=[...]); added later it cannot set the trainable LoRA factors DeepSpeed has already copied"
                )
            install_global_state(model, self.plan)
            self._installed = True
        self._started = time.perf_counter()
        self._resumed_at = state.global_step  # > 0 when the Trainer resumed from a checkpoint

    def on_train_end(self, args, state, control, model=None, **kwargs):
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        train_loss = next((entry["train_loss"] for entry in reversed(state.log_history) if "train_loss" in entry), None)
        if self._resumed_at and train_loss is not None:
            train_loss = round_mean_loss(state.log_history, self._resumed_at, state.global_step, train_loss)
        # Every process gathers (ZeRO-3 partitions are collective); the main one writes.
        trained = {name for name, param in model.named_parameters() if param.requires_grad}
        gathered = gathered_state_dict(model, lambda name, param: name in trained or is_lora_factor(name))
        # The Trainer's logging_nan_inf_filter hides NaN losses behind the running mean, so the
        # trained factors themselves are checked too.
        factors_finite = all(all_finite(gathered[name]) for name in trained)
        self.metrics = {
            "loss": train_loss,
            "last_logged_loss": losses[-1] if losses else None,
            "steps": state.global_step,
            "train_seconds": time.perf_counter() - self._started,
            "finite": factors_finite and train_loss is not None and math.isfinite(train_loss),
            **self.info,
        }
        lora_state = {name: tensor for name, tensor in gathered.items() if is_lora_factor(name)}
        export_client_adapter(model, self.plan, self.metrics, state_dict=lora_state, is_main_process=state.is_world_process_zero)


def round_mean_loss(log_history: Sequence[dict], resumed_at: int, last_step: int, session_loss: float) -> float:
    """The mean training loss of a client round resumed from a checkpoint at step ``resumed_at``.

    The Trainer's ``train_loss`` averages only the steps of the session that ended it
    (``session_loss``); the steps before the checkpoint are in the restored log history, one
    logged mean per logging window.
    """
    total, steps, previous = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry and entry.get("step", 0) <= resumed_at:
            total += entry["loss"] * (entry["step"] - previous)
            steps, previous = steps + entry["step"] - previous, entry["step"]
    total += session_loss * (last_step - resumed_at)
    counted = steps + last_step - resumed_at
    return total / counted if counted else session_loss  # resumed at the last step with nothing logged before


class ConsoleProgressCallback(TrainerCallback):
    """One line per logging step: round, client, step and loss."""

    def __init__(self, console, prefix: str):
        self.console = console
        self.prefix = prefix

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            self.console.print(
                f"  {self.prefix} step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}", highlight=False
            )


def read_client_info(export_dir: Path) -> dict:
    return json.loads((Path(export_dir) / CLIENT_INFO).read_text())
