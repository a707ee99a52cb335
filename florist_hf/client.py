"""Federated clients: a stock ``transformers.Trainer`` plus ``FederatedCallback``, which owns the round boundary."""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from florist_hf.adapters import ADAPTER_WEIGHTS, CLIENT_INFO, factor_shapes
from florist_hf.distributed import gathered_state_dict
from florist_hf.errors import FloristError
from florist_hf.io_utils import atomic_directory, write_json_atomic
from florist_hf.global_state import install_global_state, lora_layers
from florist_hf.loading import BaseModelCache, free_memory, load_base
from florist_hf.training_args import TRAINING_DEFAULTS, build_training_arguments


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
            model.save_pretrained(staging, state_dict=state_dict)
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
        factors_finite = all(bool(torch.isfinite(gathered[name]).all()) for name in trained)
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


def client_seed(base_seed: int, client_id: int, round_index: int) -> int:
    """Distinct, reproducible seed per client and round. Below 1,000 clients the original scheme
    (so that earlier runs reproduce); from client 1,000 on, one that cannot meet it or itself."""
    if client_id < 1000:
        return base_seed + 1000 * (round_index - 1) + client_id
    return base_seed + 10**12 + round_index * 10**7 + client_id


def build_lora_model(model_path: str, *, rank: int, alpha: float, target_modules, dropout: float,
                     use_rslora: bool, dtype: str = "float32", seed: int = 0, revision=None, trust_remote_code=False,
                     base_cache: BaseModelCache | None = None, quantization=None, attn_implementation=None):
    """The base model with a fresh PEFT LoRA at ``rank``; the LoRA init is seeded. With
    ``base_cache`` the base comes from it (loaded once); release it after the client. With
    ``quantization`` the base is loaded in 4 or 8 bit and prepared for QLoRA training."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = load_base(model_path, base_cache=base_cache, dtype=dtype, revision=revision,
                      trust_remote_code=trust_remote_code, quantization=quantization, attn_implementation=attn_implementation)
    if quantization is not None:
        # Norms and other float weights in fp32, base frozen; the Trainer does gradient checkpointing if asked.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
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


def write_initial_adapter(recipe, base_path: str, out_dir: Path) -> Path:
    """Round 0's global adapter for continue-style methods, written atomically: one shared LoRA
    init at the largest client rank. Every client slices it to its own rank, so FedIT averages
    factors that started equal and FFA-LoRA's frozen A is the same on every client (SPEC §3)."""
    max_rank = max(recipe.client_rank(k) for k in range(recipe.federation.num_clients))
    model = build_lora_model(
        base_path, rank=max_rank, alpha=max_rank, target_modules=recipe.lora.target_modules,
        dropout=0.0, use_rslora=False, dtype=recipe.model.dtype, seed=recipe.federation.seed,
        revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code,
    )
    with atomic_directory(out_dir, overwrite=True) as staging:
        model.save_pretrained(staging)
    return out_dir


#: Attention implementations that keep the records of a padding-free row apart from its
#: ``position_ids`` alone (transformers 5 builds the block-diagonal mask from them for sdpa, eager
#: and flex; FlashAttention reads the sequence boundaries from them).
PACKED_ATTENTION = frozenset({"sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"})
_FALLBACKS_SAID: set[tuple] = set()


def _base_and_attention(model) -> tuple:
    """The base model under a PEFT wrapper, and the attention implementation its config names."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base, getattr(base.config, "_attn_implementation", None)


@functools.cache
def _builds_mask_with_transformers(module_name: str) -> bool:
    """Whether a modeling module calls transformers' ``create_causal_mask`` (read once per module)."""
    import inspect
    import sys

    module = sys.modules.get(module_name)
    try:
        return "create_causal_mask(" in (inspect.getsource(module) if module is not None else "")
    except (OSError, TypeError):
        return False


def padding_free_unsupported(model) -> str | None:
    """Why ``model`` cannot train on padding-free batches, or None when it can."""
    base, implementation = _base_and_attention(model)
    if implementation not in PACKED_ATTENTION:
        return f"its attention implementation {implementation!r} does not read packed positions"
    if not implementation.startswith("flash_attention") and not _builds_mask_with_transformers(type(base).__module__):
        # Architectures of transformers' own mask builder keep packed records apart; others may not.
        return f"{type(base).__name__} builds its attention mask without transformers' create_causal_mask"
    return None


def client_batching(requested: str, model, console=None, training: dict | None = None, *, dp_sgd: bool = False) -> str:
    """The batch layout a client trains with: ``requested``, or padded (said once per model kind)
    where padding-free batches would let records attend to each other, or under DP-SGD."""
    if requested != "padding_free":
        return requested
    # Opacus' per-sample gradients are per row, and a padding-free row holds several records.
    reason = "DP-SGD clips every record's gradient apart" if dp_sgd else padding_free_unsupported(model)
    if reason is None and (training or {}).get("use_cache"):
        # With a KV cache transformers reads the positions as a continuation, not as packed records.
        reason = "training.use_cache is set"
    if reason is None:
        return "padding_free"
    said = (type(model).__name__, reason)
    if console is not None and said not in _FALLBACKS_SAID:
        _FALLBACKS_SAID.add(said)
        console.print(f"  data.batching: padding_free is not possible here ({reason}); batches are padded")
    return "padded"


def packs_one_row(model) -> bool:
    """Whether a padding-free batch is one row: under FlashAttention, whose variable-length kernels
    skip what records do not share; other attention computes a row's whole square, so its rows are
    kept no longer than the batch's longest record (`data.PackedRowsCollator`)."""
    return (_base_and_attention(model)[1] or "").startswith("flash_attention")


def check_training_backends(training: dict) -> None:
    """One line for a TrainingArguments speed option whose package or device is missing."""
    import importlib.util

    if training.get("use_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
        raise FloristError("training.use_liger_kernel needs the liger-kernel package: pip install liger-kernel "
                           "(its kernels run on a CUDA GPU), or remove the setting")
    if training.get("torch_compile") and torch.cuda.is_available() and importlib.util.find_spec("triton") is None:
        raise FloristError("training.torch_compile on a GPU needs triton (it comes with PyTorch's CUDA builds): "
                           "pip install triton, or remove the setting")


def build_client_trainer(model, tokenizer, train_dataset, *, training: dict, work_dir: Path, seed: int, callbacks=(),
                         batching: str = "padded", one_row: bool = False, privacy=None, noise_seed: int | None = None):
    """A stock Trainer for one client round; any TrainingArguments field comes from ``training``;
    ``batching`` and ``one_row`` are the batch layout (`data.make_collator`). With ``privacy``
    (`privacy.ClientPrivacy`) the Trainer is `privacy.DPSGDTrainer`, its sampling and noise drawn
    from ``noise_seed``."""
    from transformers import PrinterCallback, Trainer

    from florist_hf.data import make_collator

    check_training_backends(training)
    trainer_class, dp_options = Trainer, {}
    if privacy is not None:
        from florist_hf.privacy import DPSGDTrainer

        trainer_class, dp_options = DPSGDTrainer, {"privacy": privacy, "seed": noise_seed}
    args = build_training_arguments(training, work_dir=work_dir, seed=seed, dp_sgd=privacy is not None)
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=make_collator(tokenizer, batching, one_row),
        processing_class=tokenizer,
        callbacks=list(callbacks),
        **dp_options,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def read_client_info(export_dir: Path) -> dict:
    return json.loads((Path(export_dir) / CLIENT_INFO).read_text())


def freeze_long_lived_objects() -> None:
    """Move every object alive now (after a collection) out of the garbage collector's sight.

    Called once a process has imported its libraries and before it builds any model: torch,
    transformers, datasets and the rest hold millions of long-lived objects, and every full
    collection (ours after each client, the Trainer's at the start of each ``train``) would walk
    them all, about 0.3 s each in a test process. Frozen objects are still freed by reference
    counting; only cycles among them would stay, and they are the libraries' own module state.
    """
    import gc

    gc.collect()
    gc.freeze()


def last_complete_checkpoint(work_dir: Path) -> Path | None:
    """The newest ``checkpoint-<step>`` in a client's work dir that the Trainer finished writing.

    The Trainer writes ``trainer_state.json`` last, after the adapter, optimizer, scheduler and
    RNG states, so a checkpoint cut by a kill has none (or an unreadable one) and is skipped; that
    is why this is not transformers' ``get_last_checkpoint``, which takes the highest step as it is.
    """
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return None
    checkpoints = [path for path in work_dir.glob("checkpoint-*") if path.name.removeprefix("checkpoint-").isdigit()]
    for checkpoint in sorted(checkpoints, key=lambda path: int(path.name.removeprefix("checkpoint-")), reverse=True):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        return checkpoint
    return None


def tokenize_shard(recipe, tokenizer, records):
    """A client's training records as the Trainer's dataset. The same in every round, so the
    drivers tokenize each shard once per process (a few seconds per round for a large shard)."""
    from florist_hf.data import tokenize_records

    return tokenize_records(records, tokenizer, cutoff_len=recipe.data.cutoff_len, train_on_inputs=recipe.data.train_on_inputs,
                            template=recipe.data.template)


def run_client_round(recipe, plan: ClientRound, base_path: str, tokenizer, dataset, work_dir: Path, console,
                     base_cache: BaseModelCache | None = None, *, is_main_process: bool = True, callbacks=(),
                     secret_dir: Path | None = None) -> dict:
    """Train one client for one round (a stock Trainer + FederatedCallback) on ``dataset`` (see
    `tokenize_shard`) and export its adapter to ``plan.export_dir``.

    ``work_dir`` is this client's own: with ``training.save_steps`` the Trainer checkpoints the
    round there, and a rerun after a stop resumes from the newest complete checkpoint
    (``resume_from_checkpoint``: LoRA factors, optimizer, scheduler, RNG and data position), so it
    ends where an uninterrupted round ends. The work dir is removed once the adapter is exported.
    With ``base_cache`` the base is loaded once for all clients and put back as loaded afterwards.
    Under ``privacy`` the client trains with DP-SGD, its noise drawn from the secret kept in
    ``secret_dir`` (the run directory, or a Flower node's work directory).
    """
    import shutil

    from florist_hf.privacy import client_privacy, derived_seed, secret_seed

    privacy = client_privacy(recipe, plan.client_id, plan.round, len(dataset))
    noise_seed = None
    if privacy is not None:
        if secret_dir is None:
            raise FloristError("a DP-SGD client needs the directory of its secret noise seed (secret_dir)")
        noise_seed = derived_seed(secret_seed(secret_dir), "dp-sgd", plan.client_id, plan.round)
    seed = client_seed(recipe.training.get("seed", recipe.federation.seed), plan.client_id, plan.round)
    model = build_lora_model(
        base_path, rank=plan.rank, alpha=recipe.client_alpha(plan.client_id), target_modules=recipe.lora.target_modules,
        dropout=recipe.lora.dropout, use_rslora=recipe.lora.use_rslora, dtype=recipe.model.dtype, seed=seed,
        revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code, base_cache=base_cache,
        quantization=recipe.model.quantization, attn_implementation=recipe.model.attn_implementation,
    )
    federated = FederatedCallback(plan, info=privacy.record() if privacy is not None else None)
    training = recipe.client_training_arguments(plan.client_id, plan.round, TRAINING_DEFAULTS["learning_rate"])
    trainer = build_client_trainer(
        model, tokenizer, dataset, training=training, work_dir=work_dir, seed=seed,
        callbacks=[federated, ConsoleProgressCallback(console, f"round {plan.round} client {plan.client_id}"), *callbacks],
        batching=client_batching(recipe.data.batching, model, console, training, dp_sgd=privacy is not None),
        one_row=packs_one_row(model), privacy=privacy, noise_seed=noise_seed,
    )
    checkpoint = last_complete_checkpoint(work_dir)
    if checkpoint is not None:
        console.print(f"  client {plan.client_id}: resuming from {checkpoint.name}")
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    finally:
        if base_cache is not None:
            base_cache.release(model)
    metrics = dict(federated.metrics)
    del trainer, model, federated
    free_memory()
    if is_main_process:
        shutil.rmtree(work_dir, ignore_errors=True)  # the adapter is exported; its checkpoints are done with
    return metrics


def reuses_base_model(recipe) -> bool:
    """Whether a run keeps one base model for all its clients: in a single process without
    DeepSpeed or torch.compile (there the Trainer's engine owns or rewraps the model)."""
    from florist_hf import distributed

    training = [recipe.training, *recipe.client_training.values()]
    return (
        distributed.world_size() == 1
        and not distributed.launched_with_deepspeed()
        and not any(section.get("deepspeed") or section.get("torch_compile") for section in training)
    )
