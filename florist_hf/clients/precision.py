"""The precision a client trains in where its recipe leaves it open (neither ``training.bf16`` nor
``training.fp16`` set): bf16 autocast on a CPU that computes bf16 natively (AMX or AVX512-BF16), fp32
on a CPU that does not, and on a GPU what it was before (fp32; GPU recipes set bf16 themselves); a
float64 base (``model.dtype: float64``) in fp64.

A SmolLM2-135M client step (batch 4 × 256, LoRA r 8 on q,v, AdamW) is 1.6–1.8× faster under bf16
autocast on such a CPU (benchmarks/README.md, "bf16 autocast on a CPU"); without the instructions the CPU emulates bf16
around fp32 arithmetic, which buys nothing, so clients stay in fp32. Autocast runs the matrix products in bf16 and keeps the weights, the LoRA factors, their
gradients and the optimizer in fp32, so the adapters a client exports are fp32 as before.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from florist_hf.errors import FloristError

#: The TrainingArguments fields that choose a precision: a recipe that sets either decides.
PRECISION_FIELDS = ("bf16", "fp16")

#: CPU features with bf16 matrix instructions, by the name /proc/cpuinfo gives them.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class ClientPrecision:
    """What a client trains in: the TrainingArguments fields florist-hf sets for it (beneath the
    recipe's own) and the console line that says which precision and why."""

    fields: dict = field(default_factory=dict)
    line: str = ""


#: Set to 0, this machine's CPU counts as one without native bf16 (its clients train in fp32 unless
#: the recipe says otherwise): a node operator's choice, and the test suite's (machine-independent
#: numbers). Unset, the CPU is asked.
NO_NATIVE_BF16_ENV = "FLORIST_HF_CPU_BF16"


def native_cpu_bf16() -> str | None:
    """The feature with which this machine's CPU computes bf16 natively (``amx_bf16`` or
    ``avx512_bf16``), or None. The one detection: everything else asks it."""
    import os

    setting = os.environ.get(NO_NATIVE_BF16_ENV, "")
    if setting not in ("", "0"):
        raise FloristError(f"{NO_NATIVE_BF16_ENV}={setting!r}: 0 makes clients on this CPU train in fp32; unset it "
                           "to let florist-hf detect native bf16")
    return None if setting == "0" else _hardware_bf16()


@functools.cache
def _hardware_bf16() -> str | None:
    import torch

    probes = getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if all(probe is not None for probe in probes):
        # torch's own checks (its cpuinfo, and for AMX whether the OS lets a process use the tiles).
        for flag, probe in zip(NATIVE_BF16_FLAGS, probes):
            if probe():
                return flag
        return None
    return _cpuinfo_bf16_flag(Path("/proc/cpuinfo"))


def _cpuinfo_bf16_flag(cpuinfo: Path) -> str | None:
    """The first of `NATIVE_BF16_FLAGS` among the CPU flags of a Linux ``/proc/cpuinfo`` (None elsewhere)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)


def _trains_on_cpu(training: dict) -> bool:
    """Whether a client's Trainer would put the model on the CPU: ``use_cpu``, or no accelerator."""
    import torch

    if training.get("use_cpu"):
        return True
    accelerator = getattr(torch, "accelerator", None)
    return not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available())


def client_precision(training: dict, *, dp_sgd: bool = False, quantized: bool = False,
                     base_dtype: str = "float32") -> ClientPrecision:
    """The precision of a client whose recipe sets ``training`` (its ``training:`` merged with its
    ``client_training:`` overrides, before any default); ``dp_sgd``: it trains with DP-SGD,
    ``quantized``: its base is loaded by bitsandbytes (QLoRA); ``base_dtype``: the recipe's model.dtype."""
    chosen = [key for key in PRECISION_FIELDS if key in training]
    if chosen:
        if training.get("fp16"):
            return ClientPrecision(line="fp16 mixed precision: set by training.fp16")
        if training.get("bf16"):
            where = " autocast on the CPU" if _trains_on_cpu(training) else " mixed precision"
            return ClientPrecision(line=f"bf16{where}: set by training.bf16")
        return ClientPrecision(line=f"fp32: set by training.{chosen[0]}: false")
    if base_dtype == "float64":
        # A float64 base is asked for its precision (numerical checks): autocast would round its products.
        return ClientPrecision(fields={"bf16": False}, line="fp64: model.dtype is float64 (no mixed precision)")
    if not _trains_on_cpu(training):
        return ClientPrecision(line="fp32 on the accelerator: training.bf16 or training.fp16 turns on mixed precision")
    if quantized:
        # bitsandbytes' layers compute in the quantization's compute dtype whatever autocast says.
        return ClientPrecision(fields={"bf16": False},
                               line="fp32 LoRA factors: a QLoRA base computes in model.quantization.compute_dtype")
    if dp_sgd:
        # DP-SGD's guarantee rests on every record's gradient norm being clipped to max_grad_norm;
        # Opacus computes those per-record gradients from the layers' activations, which autocast
        # would round to bf16 (about 3 significant digits).
        return ClientPrecision(fields={"bf16": False},
                               line="fp32: under DP-SGD Opacus would clip by norms rounded to bf16 (training.bf16: true overrides)")
    flag = native_cpu_bf16()
    if flag is None:
        return ClientPrecision(fields={"bf16": False},
                               line="fp32: this CPU has no native bf16 (AMX or AVX512-BF16)")
    return ClientPrecision(fields={"bf16": True, "use_cpu": True},
                           line=f"bf16 autocast: this CPU computes bf16 natively ({flag}); training.bf16: false trains in fp32")
