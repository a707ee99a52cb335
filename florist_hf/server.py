"""The server step: client adapters on disk -> global adapter on disk (plus its sidecar), and the
global model of several rounds as one adapter on the original base."""

from __future__ import annotations

import json
import math
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
    check_same_modules,
    client_weights,
    read_adapter,
    read_client_adapters,
    save_adapter_files,
    widest_dtype,
    without_factors,
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
#: FedEx-LoRA: beside the round's global adapter, its residual part alone (what joins the base).
RESIDUAL_DIR = "residual"


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
        kept = None if sigma is None else float(energy(sigma)[min(module.selected_rank, sigma.numel()) - 1])
        if kept is not None and module.approximation is not None:  # of the whole update, what streaming dropped included
            kept /= 1.0 + module.approximation["discarded_energy"]
        modules[name] = {
            "shape": list(adapters[0].modules[name].shape),
            "selected_rank": module.selected_rank,
            "singular_values": None if sigma is None else [float(s) for s in sigma],
            "energy_kept": kept,
        }
        if module.approximation is not None:
            modules[name]["streaming"] = module.approximation
        if module.continued_rank is not None:
            modules[name]["continued_rank"] = module.continued_rank
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
    if method.streaming:
        if weights is not None and len(weights) != len(client_dirs):
            client_weights([None] * len(client_dirs), weights)  # the one-line error for a count mismatch
        streamed = StreamingServerRound(method)
        for index, client_dir in enumerate(client_dirs):
            streamed.add(client_dir, None if weights is None else weights[index])
        return streamed.write(out_dir, dtype=dtype, overwrite=overwrite, client_names=client_names)
    started = time.perf_counter()
    adapters = read_client_adapters(client_dirs)
    raw_weights = client_weights(adapters, weights)
    wire_dtype = dtype or widest_dtype(adapter.dtype for adapter in adapters)
    try:
        # Results in the wire dtype module by module: fp64 copies of every module would double the peak.
        result = method.aggregate([adapter.modules for adapter in adapters], raw_weights, result_dtype=wire_dtype)
    except SharedAMismatch as error:
        raise FloristError(f"{adapters[error.client_index].path}: {error}") from None
    return _write_server_step(method, adapters, raw_weights, result, out_dir, wire_dtype, overwrite, client_names,
                              time.perf_counter() - started)


def _write_server_step(method, adapters, raw_weights, result, out_dir, wire_dtype, overwrite, client_names,
                       server_seconds) -> ServerStep:
    """The global adapter (and FlexLoRA's per-client ones) plus the sidecar, written atomically."""
    communication = round_communication(
        method,
        adapters[0].module_shapes,
        [_client_rank(adapter) for adapter in adapters],
        result.selected_ranks,
        bytes_per_param=torch.finfo(wire_dtype).bits // 8,
    )
    names = list(client_names) if client_names else [f"client_{index}" for index in range(len(adapters))]
    sidecar = build_sidecar(method, adapters, raw_weights, result, communication, names, server_seconds)
    template = adapters[0].config
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        global_factors = {name: (m.lora_b, m.lora_a) for name, m in result.modules.items()}
        save_adapter_files(staging, global_factors, config_template=template, dtype=wire_dtype, sidecar=sidecar)
        if any(m.continued_rank is not None for m in result.modules.values()):
            residual = {name: (m.lora_b[:, m.continued_rank:], m.lora_a[m.continued_rank:]) for name, m in result.modules.items()}
            save_adapter_files(staging / RESIDUAL_DIR, residual, config_template=template, dtype=wire_dtype)
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


class StreamingServerRound:
    """Client adapter directories folded into a streaming aggregation one at a time, as they arrive:
    the server holds the running factors and one client, never every client's stack.

    ``add`` reads and checks one client (every problem a one-line FloristError, before anything is
    written) and folds it in; ``write`` selects the ranks on the final spectrum and writes the global
    adapter and sidecar atomically, exactly as ``aggregate_adapters`` does.
    """

    def __init__(self, method: AggregationMethod):
        self.method = method
        self.round = method.stream()
        self.adapters: list[LoraAdapter] = []  # folded clients, factors dropped
        self.given_weights: list[float | None] = []
        self.seconds = 0.0  # reading and folding, not waiting for clients

    def add(self, client_dir: str | os.PathLike, weight: float | None = None) -> None:
        """Fold one client in, weighted by ``weight`` (default: its recorded num_samples)."""
        started = time.perf_counter()
        adapter = read_adapter(client_dir)
        if self.adapters:
            check_same_modules(self.adapters[0], adapter)
        if weight is not None and not (math.isfinite(weight) and weight > 0):
            raise FloristError(f"{adapter.path}: weight {weight} is not a positive finite number")
        used = weight if weight is not None else (adapter.num_samples or 1.0)
        self.round.add(adapter.modules, float(used))
        self.adapters.append(without_factors(adapter))
        self.given_weights.append(weight)
        self.seconds += time.perf_counter() - started

    def write(self, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None, overwrite: bool = False,
              client_names: Sequence[str] | None = None) -> ServerStep:
        if not self.adapters:
            raise FloristError("no client adapters were folded in; nothing to aggregate")
        started = time.perf_counter()
        if len({weight is None for weight in self.given_weights}) > 1:
            raise FloristError(f"{self.adapters[0].path}: give every client a weight or none of them")
        given = None if self.given_weights[0] is None else self.given_weights
        # Validates the sample counts (all recorded, or none) as the stacked path does.
        raw_weights = client_weights(self.adapters, given)
        wire_dtype = dtype or widest_dtype(adapter.dtype for adapter in self.adapters)
        result = self.round.result(wire_dtype)
        seconds = self.seconds + time.perf_counter() - started
        return _write_server_step(self.method, self.adapters, raw_weights, result, Path(out_dir), wire_dtype,
                                  overwrite, client_names, seconds)


#: A module's cumulative update counts as no longer low-rank above this share of min(m, n): its
#: adapter is then close to a dense delta, and a merged export serves it better.
LOW_RANK_SHARE = 0.25


def write_published_adapter(last_global: Path, state, method: AggregationMethod, out_dir: Path, *,
                            threshold: float | None = None) -> Path:
    """One PEFT adapter on the ORIGINAL base holding the global model after the round whose
    global adapter is ``last_global``, written atomically (SPEC §4).

    Merge-style methods (and FedEx-LoRA) publish ``state`` (`global_state.GlobalState`, the whole
    update of every round) as its exact SVD at its numerical rank, or, with ``threshold`` (τ), at
    the smallest rank per module whose energy reaches τ (the energy kept is recorded per module).
    Continue-style methods (``state`` None) publish the last round's global adapter.
    """
    from florist_hf.aggregation.cumulative import published_factors

    last_global = Path(last_global)
    last_sidecar = json.loads((last_global / SIDECAR).read_text())
    with atomic_directory(out_dir, overwrite=True) as staging:
        if state is None:
            shutil.copytree(last_global, staging, dirs_exist_ok=True)
            shutil.rmtree(staging / CLIENT_ADAPTERS_DIR, ignore_errors=True)
            shutil.rmtree(staging / RESIDUAL_DIR, ignore_errors=True)
            return out_dir
        last = read_adapter(last_global)
        published = {name: published_factors(held, 1.0 if threshold is None else threshold) for name, held in state.modules.items()}
        high_rank = sorted(name for name, module in published.items()
                           if module.exact_rank > LOW_RANK_SHARE * min(state.modules[name].shape))
        sidecar = {
            **last_sidecar,
            "published": "the cumulative update of every round, " + (
                "exact (its SVD at its numerical rank)" if threshold is None else f"its SVD kept at energy threshold {threshold:g}"),
            "publish_threshold": threshold,
            "rounds": list(state.rounds),
            "modules": {
                name: {
                    "shape": list(state.modules[name].shape),
                    "selected_rank": module.rank,
                    "exact_rank": module.exact_rank,
                    "singular_values": [float(s) for s in module.singular_values],
                    "energy_kept": module.energy_kept,
                }
                for name, module in published.items()
            },
            "total_rank": sum(module.rank for module in published.values()),
            # Modules whose exact update is no longer low-rank: `florist-hf export --format merged` serves them.
            "high_rank_modules": high_rank,
        }
        save_adapter_files(
            staging,
            {name: (module.lora_b, module.lora_a) for name, module in published.items()},
            config_template=last.config,
            dtype=last.dtype,
            sidecar=sidecar,
        )
    return out_dir
