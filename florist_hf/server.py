"""The server: one aggregation step (client adapters on disk -> global adapter on disk) and the round loop."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from florist_hf.adapters import (
    LoraAdapter,
    client_weights,
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
        ranks = list(self.result.selected_ranks.values())
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
            {"path": str(adapter.path), "num_samples": adapter.num_samples, "weight": weight, "rank": adapter.rank}
            for adapter, weight in zip(adapters, result.client_weights)
        ],
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
) -> ServerStep:
    """Read client adapters, aggregate them, and write the global PEFT adapter + sidecar atomically.

    Every input problem raises FloristError before anything is written to ``out_dir``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FloristError(f"{out_dir}: already exists; choose another --out or pass --force to replace it")
    adapters = read_client_adapters(client_dirs)
    raw_weights = client_weights(adapters, weights)
    try:
        result = method.aggregate([adapter.modules for adapter in adapters], raw_weights)
    except SharedAMismatch as error:
        raise FloristError(f"{adapters[error.client_index].path}: {error}") from None
    wire_dtype = dtype or widest_dtype(adapter.dtype for adapter in adapters)
    communication = round_communication(
        method,
        adapters[0].module_shapes,
        [_client_rank(adapter) for adapter in adapters],
        result.selected_ranks,
        bytes_per_param=torch.finfo(wire_dtype).bits // 8,
    )
    sidecar = build_sidecar(method, adapters, raw_weights, result, communication)
    template = adapters[0].config
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        global_factors = {name: (m.lora_b, m.lora_a) for name, m in result.modules.items()}
        save_adapter_files(staging, global_factors, config_template=template, dtype=wire_dtype, sidecar=sidecar)
        if any(m.client_factors is not None for m in result.modules.values()):
            for index, adapter in enumerate(adapters):
                client_factors = {name: m.client_factors[index] for name, m in result.modules.items()}
                save_adapter_files(
                    staging / CLIENT_ADAPTERS_DIR / f"client_{index}",
                    client_factors,
                    config_template=template,
                    dtype=wire_dtype,
                    client_info={"source": str(adapter.path)},
                )
    return ServerStep(out_dir, adapters, result, communication, sidecar)
