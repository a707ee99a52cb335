"""Serving variants of a global adapter: one uniform rank (for engines that ignore PEFT's
per-module patterns), or the update merged into a full model directory (for engines without LoRA).

FLoRIST adapters keep a different rank per module, recorded in ``rank_pattern`` with a matching
``alpha_pattern``. PEFT reads both; vLLM, SGLang, LoRAX/TGI, llama.cpp and exllamav2 read neither
(they apply one ``lora_alpha / r``, or the global alpha over each module's own rank, or assert on
the shapes). The ``uniform`` export zero-pads every module to one rank R with its scale folded
into B, so ``r = lora_alpha = R`` and any engine computes exactly the same update.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from florist_hf.adapters import ADAPTER_CONFIG, SIDECAR, read_adapter, save_adapter_files
from florist_hf.errors import FloristError
from florist_hf.io_utils import atomic_directory, write_json_atomic

#: vLLM's largest --max-lora-rank; above it an engine needs a truncation the user asks for.
MAX_SERVING_RANK = 512
EXPORT_RECORD = "export.json"


@dataclass
class UniformExport:
    """What `export_uniform` wrote: the rank every module has, and per module the energy kept
    (1.0 unless ``max_rank`` truncated it)."""

    out_dir: Path
    rank: int
    energy_kept: dict[str, float]

    @property
    def truncated(self) -> dict[str, float]:
        return {name: kept for name, kept in self.energy_kept.items() if kept < 1.0}


def resolve_adapter(source: str | os.PathLike) -> Path:
    """A run directory's published adapter, or an adapter directory (`rundir.published_adapter`)."""
    from florist_hf.rundir import published_adapter

    return published_adapter(source)


def export_uniform(source: str | os.PathLike, out_dir: str | os.PathLike, *, round_to: int = 1,
                   max_rank: int | None = None, overwrite: bool = False) -> UniformExport:
    """Write ``source``'s adapter with every module at one rank R and scaling 1: the same update.

    R is the largest module rank rounded up to a multiple of ``round_to``. Above
    `MAX_SERVING_RANK` (or above ``max_rank`` when given) the modules that exceed it are truncated
    to their best rank-``max_rank`` approximation (lossy: `UniformExport.energy_kept` says how much
    of each module's update is kept); without ``max_rank`` that is an error.
    """
    from florist_hf.aggregation.linalg import energy, product_svd, truncate

    adapter = read_adapter(resolve_adapter(source))
    if round_to < 1:
        raise FloristError(f"--round-to {round_to}: must be ≥ 1")
    largest = max(module.rank for module in adapter.modules.values())
    limit = max_rank if max_rank is not None else MAX_SERVING_RANK
    if max_rank is not None and max_rank < 1:
        raise FloristError(f"--max-rank {max_rank}: must be ≥ 1")
    if largest > limit and max_rank is None:
        name = max(adapter.modules, key=lambda key: adapter.modules[key].rank)
        raise FloristError(
            f"{adapter.path}: module {name} has rank {largest}, above {MAX_SERVING_RANK} (vLLM's largest "
            "--max-lora-rank); pass --max-rank N to truncate such modules to their best rank-N approximation (lossy)"
        )
    kept_rank = min(largest, limit)
    rank = math.ceil(kept_rank / round_to) * round_to
    if max_rank is not None and rank > max_rank:  # rounding up must not pass the engine's limit
        rank = (max_rank // round_to) * round_to
        if rank == 0:
            raise FloristError(f"--max-rank {max_rank} is below --round-to {round_to}; no rank satisfies both")
        kept_rank = min(kept_rank, rank)
    factors, energy_kept = {}, {}
    for name, module in adapter.modules.items():
        lora_b = module.scale * module.lora_b.to(torch.float64)
        lora_a = module.lora_a.to(torch.float64)
        kept = 1.0
        if module.rank > kept_rank:
            u, sigma, vh = product_svd(lora_b, lora_a)
            lora_b, lora_a = truncate(u, sigma, vh, kept_rank)
            kept = float(energy(sigma)[kept_rank - 1])
        pad = rank - lora_a.shape[0]
        factors[name] = (
            torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], pad)], dim=1),
            torch.cat([lora_a, lora_a.new_zeros(pad, lora_a.shape[1])], dim=0),
        )
        energy_kept[name] = kept
    config = {key: value for key, value in adapter.config.items() if key not in ("rank_pattern", "alpha_pattern")}
    out_dir = Path(out_dir)
    record = {
        "format": "florist-hf/export", "variant": "uniform", "source": str(adapter.path), "rank": rank,
        "largest_source_rank": largest, "round_to": round_to, "max_rank": max_rank,
        "truncated_modules": {name: kept for name, kept in energy_kept.items() if kept < 1.0},
    }
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as staging:
            save_adapter_files(staging, factors, config_template=config, dtype=adapter.dtype)
            if (adapter.path / SIDECAR).is_file():
                shutil.copyfile(adapter.path / SIDECAR, staging / SIDECAR)
            write_json_atomic(staging / EXPORT_RECORD, record)
    except FileExistsError:
        raise FloristError(f"{out_dir}: already exists; choose another --out or pass --force to replace it") from None
    return UniformExport(out_dir, rank, energy_kept)


def export_merged(source: str | os.PathLike, out_dir: str | os.PathLike, *, base_model: str | None = None,
                  revision: str | None = None, trust_remote_code: bool = False, overwrite: bool = False) -> Path:
    """A full model directory (sharded safetensors, config, tokenizer, generation config) with the
    adapter's update merged in: merged in fp32, saved in the base's own dtype."""
    from peft import PeftModel

    from florist_hf.loading import load_causal_lm, load_model_config, load_tokenizer, torch_dtype

    adapter_dir = resolve_adapter(source)
    base = base_model or json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise FloristError(f"{adapter_dir}: the adapter names no base model; pass --base-model PATH_OR_ID")
    config = load_model_config(base, revision=revision, trust_remote_code=trust_remote_code)
    saved_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    saved_dtype = torch_dtype(saved_dtype) if isinstance(saved_dtype, str) else saved_dtype
    tokenizer = load_tokenizer(base, revision=revision, trust_remote_code=trust_remote_code)
    model = load_causal_lm(base, dtype="float32", revision=revision, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged = merged.to(saved_dtype)
    out_dir = Path(out_dir)
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as staging:
            merged.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            write_json_atomic(staging / EXPORT_RECORD, {
                "format": "florist-hf/export", "variant": "merged", "source": str(adapter_dir), "base_model": base,
                "dtype": str(saved_dtype).removeprefix("torch."),
            })
    except FileExistsError:
        raise FloristError(f"{out_dir}: already exists; choose another --out or pass --force to replace it") from None
    return out_dir
