"""Several processes, one federation: who writes, when to wait, and ZeRO-3 partitioned parameters.

Under ``accelerate launch`` (or ``torchrun``/``deepspeed``) every process runs the whole
federation. Each client round is trained by all of them together (the Trainer shards the data and,
with DeepSpeed, the model); the main process alone aggregates and writes the run directory, and
the others wait for it at a barrier before they read what it wrote. Data sharding across clients
and every seed are computed identically in every process, so no decision needs broadcasting.

In a single process (``florist-hf run``) every helper here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``); 1 for a plain ``python`` run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


#: How long the other processes wait at a barrier while the main one aggregates, writes and (with
#: ``evaluation.every_round``) runs lm-eval alone; the backends' defaults (10 to 30 min) are too short.
BARRIER_TIMEOUT = timedelta(hours=6)


def init_processes() -> None:
    """Join the launcher's process group before the first barrier (the Trainer would only do it later).

    accelerate's ``PartialState`` reads the launcher's environment and picks the backend, DeepSpeed
    included (``ACCELERATE_USE_DEEPSPEED``); the Trainers built later reuse this process group.
    Without a GPU accelerate picks no backend at all, so gloo is named (on CPU the recipe's
    ``training.ddp_backend`` must say gloo as well, or each Trainer sees one process).
    """
    if launched_processes() > 1 and not _dist_ready():
        from accelerate import PartialState

        PartialState(backend=None if torch.cuda.is_available() else "gloo", timeout=BARRIER_TIMEOUT)


# The queries below read torch.distributed directly rather than accelerate's PartialState: a
# PartialState built in a single process would fix accelerate's shared state (its device) before
# the clients' Trainers choose it from their own TrainingArguments (use_cpu, per-client overrides).


def world_size() -> int:
    return torch.distributed.get_world_size() if _dist_ready() else 1


def is_main_process() -> bool:
    """The process that writes the run directory, aggregates and pushes (global rank 0)."""
    if _dist_ready():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_everyone() -> None:
    """A barrier across all processes; nothing in a single process."""
    if _dist_ready() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def launched_with_deepspeed() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config (it tells the processes so)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


@contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block first (e.g. builds a file); the others run it after it finished."""
    if not is_main_process():
        wait_for_everyone()
    yield
    if is_main_process():
        wait_for_everyone()


# --- ZeRO-3 partitioned parameters ---------------------------------------------------------------


def is_partitioned(param: torch.nn.Parameter) -> bool:
    """A DeepSpeed ZeRO-3 parameter: its ``data`` is an empty placeholder between gathers."""
    return hasattr(param, "ds_id")


def gathered_parameters(params: Iterable[torch.nn.Parameter], modifier_rank: int | None = None):
    """``deepspeed.zero.GatheredParameters`` over the partitioned ones among ``params``; a no-op otherwise.

    Every process must enter it (it is a collective). With ``modifier_rank=0`` what rank 0 writes
    into the gathered parameters is broadcast and re-partitioned on exit; with ``None`` changes are
    discarded (read-only gather).
    """
    partitioned = [param for param in params if is_partitioned(param)]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


def gathered_state_dict(model: torch.nn.Module, select: Callable[[str, torch.nn.Parameter], bool]) -> dict[str, torch.Tensor]:
    """Full CPU copies of the selected parameters, gathered from their ZeRO-3 partitions if need be.

    Collective under ZeRO-3: every process must call it with the same model and selection.
    """
    chosen = [(name, param) for name, param in model.named_parameters() if select(name, param)]
    with gathered_parameters([param for _, param in chosen], modifier_rank=None):
        return {name: param.detach().to("cpu", copy=True) for name, param in chosen}


@contextmanager
def without_deepspeed() -> Iterator[None]:
    """Build and run a Trainer as plain data parallelism (every process holds the whole model).

    Used for the held-out loss of a global model: the Trainer's DeepSpeed inference path accepts
    only ZeRO-3, and the global model is built from full weights anyway. Also drops transformers'
    ZeRO-3 marker so ``from_pretrained`` loads whole weights instead of partitioning them.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved_env = os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    saved_ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if saved_env is not None:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = saved_env
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved_ref


#: What launchers set to make a process one of many; hidden by ``single_process``.
_LAUNCHER_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ACCELERATE_USE_DEEPSPEED")


@contextmanager
def single_process() -> Iterator[None]:
    """Run a block on the main process alone as if it had been started by plain ``python``.

    For work only the main process does while the others have moved on or wait (lm-eval over the
    published adapter): libraries that build their own ``Accelerator`` then see one process and
    never enter a collective that the other processes would not join.
    """
    from accelerate.state import AcceleratorState
    from transformers.integrations import deepspeed as hf_deepspeed

    saved_env = {key: os.environ.pop(key) for key in _LAUNCHER_ENV if key in os.environ}
    saved_ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield
    finally:
        os.environ.update(saved_env)
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved_ref
        AcceleratorState._reset_state(reset_partial_state=True)


@contextmanager
def client_model_loading(training: dict) -> Iterator[None]:
    """Load every client's model the same way: partitioned at load time under ZeRO-3, else whole.

    With ``accelerate launch`` and a ZeRO-3 config whose ``zero3_init_flag`` is on
    (recipes/accelerate/zero3.yaml), ``from_pretrained`` partitions the weights while it loads them
    (``deepspeed.zero.Init``), so no process ever holds the whole base model. Otherwise the weights
    load whole and DeepSpeed partitions them when the Trainer wraps the model. transformers decides
    by a module-level marker that each Trainer's arguments set and that outlives the Trainer, so
    left alone the first client would load whole and the later ones partitioned; this sets or clears
    it explicitly for the block and clears it afterwards.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    plugin = None
    if launched_with_deepspeed() and not training.get("deepspeed"):
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin()  # from the launcher's environment, as TrainingArguments builds it
        if plugin.zero3_init_flag:
            # What TrainingArguments will resolve the config's "auto" precision to.
            precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
            precision = "fp16" if training.get("fp16") else "bf16" if training.get("bf16") else precision
            plugin.set_mixed_precision(precision)
            plugin.set_deepspeed_weakref()
        else:
            plugin = None
    if plugin is None:
        hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()
        del plugin
