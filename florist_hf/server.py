"""The server step: client adapters on disk -> global adapter on disk (plus its sidecar), and the
global model of several rounds as one adapter on the original base."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from florist_hf.adapters import (
    SIDECAR,
    LoraAdapter,
    client_weights,
    read_adapter,
    read_client_adapters,
    save_adapter_files,
    widest_dtype,
)
from florist_hf.aggregation import (
    AggregationMethod,
    AggregationResult,
    CommunicationReport,
    SharedAMismatch,
    energy,
    round_communication,
    sum_of_updates,
)
from florist_hf.errors import FloristError
from florist_hf.io_utils import atomic_directory

SIDECAR_FORMAT = "florist-hf/aggregation"
#: FlexLoRA writes each client's own truncation here, inside the global adapter directory.
CLIENT_ADAPTERS_DIR = "clients"


@dataclass
class ServerStep:
    """What one aggregation produced, for printing, the round log and the next round's clients."""

    out_dir: Path
    adapters: list[LoraAdapter]
    result: AggregationResult
    communication: CommunicationReport
    sidecar: dict

    @property
    def rank_summary(self) -> dict:
        return rank_summary(self.result.selected_ranks.values())


def rank_summary(ranks) -> dict:
    """Min, median, max and total of the per-module selected ranks."""
    ranks = list(ranks)
    return {"min": min(ranks), "median": statistics.median(ranks), "max": max(ranks), "total": sum(ranks)}


def _client_rank(adapter: LoraAdapter) -> int | dict[str, int]:
    ranks = {name: module.rank for name, module in adapter.modules.items()}
    return next(iter(ranks.values())) if len(set(ranks.values())) == 1 else ranks


def build_sidecar(
    method: AggregationMethod,
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float],
    result: AggregationResult,
    communication: CommunicationReport,
    client_names: Sequence[str] | None = None,
    server_seconds: float | None = None,
) -> dict:
    """The JSON record written beside a global adapter: how it was made and what it cost."""
    modules = {}
    for name, module in result.modules.items():
        sigma = module.singular_values
        modules[name] = {
            "shape": list(adapters[0].modules[name].shape),
            "selected_rank": module.selected_rank,
            "singular_values": None if sigma is None else [float(s) for s in sigma],
            "energy_kept": None if sigma is None else float(energy(sigma)[min(module.selected_rank, sigma.numel()) - 1]),
        }
    return {
        "format": SIDECAR_FORMAT,
        "version": 1,
        "method": method.name,
        "threshold": method.options().get("threshold"),
        "options": method.options(),
        "clients": [
            {"name": name, "path": str(adapter.path), "num_samples": adapter.num_samples, "weight": weight, "rank": adapter.rank}
            for adapter, weight, name in zip(adapters, result.client_weights, client_names or [None] * len(adapters))
        ],
        "server_seconds": server_seconds,  # reading the client adapters and aggregating them (not writing)
        "raw_weights": list(weights),
        "modules": modules,
        "total_rank": sum(result.selected_ranks.values()),
        "communication": communication.to_dict(),
    }


def aggregate_adapters(
    client_dirs: Sequence[str | os.PathLike],
    method: AggregationMethod,
    out_dir: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    client_names: Sequence[str] | None = None,
) -> ServerStep:
    """Read client adapters, aggregate them, and write the global PEFT adapter + sidecar atomically.

    Every input problem raises FloristError before anything is written to ``out_dir``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FloristError(f"{out_dir}: already exists; choose another --out or pass --force to replace it")
    started = time.perf_counter()
    adapters = read_client_adapters(client_dirs)
    raw_weights = client_weights(adapters, weights)
    wire_dtype = dtype or widest_dtype(adapter.dtype for adapter in adapters)
    try:
        # Results in the wire dtype module by module: fp64 copies of every module would double the peak.
        result = method.aggregate([adapter.modules for adapter in adapters], raw_weights, result_dtype=wire_dtype)
    except SharedAMismatch as error:
        raise FloristError(f"{adapters[error.client_index].path}: {error}") from None
    communication = round_communication(
        method,
        adapters[0].module_shapes,
        [_client_rank(adapter) for adapter in adapters],
        result.selected_ranks,
        bytes_per_param=torch.finfo(wire_dtype).bits // 8,
    )
    names = list(client_names) if client_names else [f"client_{index}" for index in range(len(adapters))]
    sidecar = build_sidecar(method, adapters, raw_weights, result, communication, names, time.perf_counter() - started)
    template = adapters[0].config
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        global_factors = {name: (m.lora_b, m.lora_a) for name, m in result.modules.items()}
        save_adapter_files(staging, global_factors, config_template=template, dtype=wire_dtype, sidecar=sidecar)
        if any(m.client_factors is not None for m in result.modules.values()):
            for index, (adapter, client_name) in enumerate(zip(adapters, names)):
                client_factors = {name: m.client_factors[index] for name, m in result.modules.items()}
                save_adapter_files(
                    staging / CLIENT_ADAPTERS_DIR / client_name,
                    client_factors,
                    config_template=template,
                    dtype=wire_dtype,
                    client_info={"source": str(adapter.path)},
                )
    return ServerStep(out_dir, adapters, result, communication, sidecar)



def write_published_adapter(global_dirs: Sequence[Path], rounds: Sequence[int], method: AggregationMethod, out_dir: Path) -> Path:
    """One PEFT adapter on the ORIGINAL base holding the global model whose round adapters are
    ``global_dirs`` (rounds ``rounds``, oldest first), written atomically (SPEC §4).

    Merge-style methods sum the round updates and re-factorise the sum with the stacked
    decomposition at τ = 1 (exact); continue-style methods publish the last round's global.
    """
    last_global = Path(global_dirs[-1])
    last_sidecar = json.loads((last_global / SIDECAR).read_text())
    with atomic_directory(out_dir, overwrite=True) as staging:
        if not method.merges_into_base:
            shutil.copytree(last_global, staging, dirs_exist_ok=True)
            shutil.rmtree(staging / CLIENT_ADAPTERS_DIR, ignore_errors=True)
            return out_dir
        rounds_read = [read_adapter(global_dir) for global_dir in global_dirs]
        summed = {name: sum_of_updates([r.modules[name] for r in rounds_read]) for name in rounds_read[0].modules}
        sidecar = {
            **last_sidecar,
            "published": "sum of the round updates, re-factorised at threshold 1",
            "rounds": list(rounds),
            "modules": {
                name: {
                    "shape": list(rounds_read[0].modules[name].shape),
                    "selected_rank": module.selected_rank,
                    "singular_values": [float(s) for s in module.singular_values],
                    "energy_kept": 1.0,
                }
                for name, module in summed.items()
            },
            "total_rank": sum(module.selected_rank for module in summed.values()),
        }
        save_adapter_files(
            staging,
            {name: (module.lora_b, module.lora_a) for name, module in summed.items()},
            config_template=rounds_read[0].config,
            dtype=rounds_read[0].dtype,
            sidecar=sidecar,
        )
    return out_dir
