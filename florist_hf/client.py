"""Federated clients: a stock ``transformers.Trainer`` plus ``FederatedCallback``, which owns the round boundary."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from florist_hf.adapters import CLIENT_INFO, read_adapter
from florist_hf.errors import FloristError
from florist_hf.io_utils import atomic_directory, write_json_atomic


@dataclass
class ClientRound:
    """What one client does in one round: where it starts from and where its adapter goes."""

    client_id: int
    round: int
    rank: int
    num_samples: int
    export_dir: Path
    #: Global updates to add into the frozen base first (FLoRIST, FLoRA: all earlier rounds).
    merge_adapters: Sequence[Path] = field(default_factory=list)
    #: Global factors to continue training from, sliced to this client's rank (FedIT, FFA, FlexLoRA).
    init_adapter: Path | None = None
    #: FFA-LoRA: A stays at the shared random init, only B trains.
    freeze_lora_a: bool = False


def lora_layers(model) -> dict:
    """The LoRA-wrapped linear layers of a PEFT model, by the names PEFT saves them under."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


@torch.no_grad()
def install_global_state(model, plan: ClientRound, adapter_name: str = "default") -> None:
    """Put the global model of this round into a freshly built PEFT model (SPEC §4).

    Merge-style methods add every earlier global update into the base weights and train a fresh
    LoRA; continue-style methods copy the global factors into the client's LoRA, taking the first
    r_k components and dividing B by the client's own scale so that s_k·B·A is the global update.
    """
    layers = lora_layers(model)
    for adapter_dir in plan.merge_adapters:
        for name, update in read_adapter(adapter_dir).modules.items():
            base_weight = _layer(layers, name, adapter_dir).get_base_layer().weight
            delta = update.scale * (update.lora_b.to(torch.float64) @ update.lora_a.to(torch.float64))
            base_weight += delta.to(base_weight.dtype)
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
            lora_a.copy_(update.lora_a[:rank].to(lora_a.dtype))
            lora_b.copy_((update.scale / scale * update.lora_b[:, :rank].to(torch.float64)).to(lora_b.dtype))
    if plan.freeze_lora_a:
        for layer in layers.values():
            layer.lora_A[adapter_name].weight.requires_grad_(False)


def _layer(layers: dict, name: str, source: Path):
    try:
        return layers[name]
    except KeyError:
        raise FloristError(f"{source}: module {name} is not adapted in the client model; target_modules must match") from None


def export_client_adapter(model, plan: ClientRound, metrics: dict) -> Path:
    """Save the client's PEFT adapter and its sample count, atomically."""
    with atomic_directory(plan.export_dir, overwrite=True) as staging:
        model.save_pretrained(staging)
        write_json_atomic(
            staging / CLIENT_INFO,
            {"client": plan.client_id, "round": plan.round, "rank": plan.rank, "num_samples": plan.num_samples, **metrics},
        )
    return plan.export_dir


class FederatedCallback(TrainerCallback):
    """Turns a Trainer run into one client round: global state in at train begin, adapter out at train end.

    Attach it to your own Trainer whose model is a PEFT LoRA model::

        trainer = Trainer(model=peft_model, args=args, train_dataset=shard,
                          callbacks=[FederatedCallback(ClientRound(client_id=0, round=1, rank=16,
                                                                   num_samples=len(shard),
                                                                   export_dir=Path("out/client_0")))])
        trainer.train()   # out/client_0 now holds the adapter + client.json for the server
    """

    def __init__(self, plan: ClientRound):
        self.plan = plan
        self.metrics: dict = {}
        self._started = 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        install_global_state(model, self.plan)
        self._started = time.perf_counter()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        train_loss = next((entry["train_loss"] for entry in reversed(state.log_history) if "train_loss" in entry), None)
        # The Trainer's logging_nan_inf_filter hides NaN losses behind the running mean, so the
        # trained factors themselves are checked too.
        factors_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)
        self.metrics = {
            "loss": train_loss,
            "last_logged_loss": losses[-1] if losses else None,
            "steps": state.global_step,
            "train_seconds": time.perf_counter() - self._started,
            "finite": factors_finite and train_loss is not None and math.isfinite(train_loss),
        }
        if state.is_world_process_zero:
            export_client_adapter(model, self.plan, self.metrics)


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


def client_seed(base_seed: int, client_id: int, round_index: int) -> int:
    """Distinct, reproducible seed per client and round."""
    return base_seed + 1000 * (round_index - 1) + client_id


def build_lora_model(model_path: str, *, rank: int, alpha: float, target_modules, dropout: float,
                     use_rslora: bool, dtype: str = "float32", seed: int = 0, revision=None, trust_remote_code=False):
    """The base model with a fresh PEFT LoRA at ``rank``; the LoRA init is seeded."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch_dtype, revision=revision, trust_remote_code=trust_remote_code
    )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=dropout,
        use_rslora=use_rslora,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    return get_peft_model(model, config)


#: TrainingArguments florist-hf sets unless the recipe does: no checkpoints inside a client round
#: (the round itself is the checkpoint), no external loggers unless asked, our own progress lines.
TRAINING_DEFAULTS = {
    "report_to": "none",
    "dataloader_pin_memory": torch.cuda.is_available(),
    "save_strategy": "no",
    "logging_steps": 1,
    "disable_tqdm": True,
    "remove_unused_columns": False,
    "learning_rate": 3e-4,
    "lr_scheduler_type": "linear",
}


def build_client_trainer(model, tokenizer, train_dataset, *, training: dict, work_dir: Path, seed: int, callbacks=()):
    """A stock Trainer for one client round; any TrainingArguments field comes from ``training``."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from florist_hf.data import make_collator

    try:
        args = TrainingArguments(output_dir=str(work_dir), **{**TRAINING_DEFAULTS, **training, "seed": seed, "data_seed": seed})
    except (TypeError, ValueError) as error:
        raise FloristError(f"training: {str(error).splitlines()[0]}; fix the recipe's training section") from None
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=make_collator(tokenizer),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def read_client_info(export_dir: Path) -> dict:
    return json.loads((Path(export_dir) / CLIENT_INFO).read_text())


def free_memory() -> None:
    """Release a finished client's model before the next one is built."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
