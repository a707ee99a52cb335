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
    FACTOR_SUMS,
    AggregationMethod,
    AggregationResult,
    CommunicationReport,
    SharedAMismatch,
    energy,
    round_communication,
)
from florist_hf.aggregation.bounding import (
    ClientBound,
    averaged_ranks_refusal,
    bound_client,
    factor_products,
    gaussian_noise_like,
    outlier_report,
    outliers,
    update_norm,
)
from florist_hf.errors import FloristError
from florist_hf.io_utils import atomic_directory

SIDECAR_FORMAT = "florist-hf/aggregation"
#: FlexLoRA writes each client's own truncation here, inside the global adapter directory.
CLIENT_ADAPTERS_DIR = "clients"
#: FedEx-LoRA: beside the round's global adapter, its residual part alone (what joins the base).
RESIDUAL_DIR = "residual"


@dataclass
class UpdateBounding:
    """How the server bounds (and, for client-level DP, noises) the clients' updates of one round."""

    #: Each client's update scaled to this Frobenius norm over its whole adapter (None: not bounded).
    clip: float | None = None
    #: The global adapter the clients continued (continue-style methods: their update is the change
    #: of their factors since it); None for fresh LoRAs, whose update is s·B·A.
    reference: Path | None = None
    #: Central DP (fedit, ffa): noise σ·clip/denominator on the average of the bounded updates, each
    #: client weighted 1/denominator (the clients sampled per round), drawn from ``noise_seed``.
    noise_multiplier: float | None = None
    denominator: int | None = None
    noise_seed: int | None = None
    #: Recorded in the sidecar as it is (the accountant's ε so far, δ, q).
    accounting: dict | None = None
    #: How much further than clip/denominator one client can move the mean as the server learns it (L2):
    #: under secure aggregation, the fixed-point rounding of every client's input (`secure.encoding.sensitivity_slack`).
    quantisation_slack: float = 0.0
    #: The sums the noise goes on, each moved by one client by clip/denominator at most: 1 (the mean of the
    #: factors), 2 (FLoRIST's two sketch sums, the second computed on the noised first). Each takes
    #: √noised_sums·σ times that: together, the privacy of one such sum noised at σ (Gaussian
    #: mechanisms compose by their squared sensitivity-to-noise ratios), which the accountant counts.
    noised_sums: int = 1

    def noise_std(self) -> float:
        """Central DP's noise std on each noised sum: σ·√noised_sums times one client's largest effect on
        it, clip/denominator (+ the slack)."""
        return self.noise_multiplier * math.sqrt(self.noised_sums) * (self.clip / self.denominator + self.quantisation_slack)

    def reference_modules(self, method: AggregationMethod) -> dict | None:
        if self.reference is None:
            if not method.merges_into_base:
                raise FloristError(f"{method.name} clients continue a global adapter; bounding their updates needs it "
                                   "(--reference DIR: the global the clients were sent)")
            return None
        return read_adapter(self.reference).modules


def round_bounding(federation, round_index: int, *, reference: Path | None, secret_dir: Path):
    """How the server bounds round ``round_index``'s client updates (``federation.clip_update_norm``)
    and, with ``central_dp``, noises their mean (None when it does not), accounted by `florist_hf.privacy`.
    ``reference``: the global the round's clients continued (continue-style methods)."""
    from florist_hf.privacy import (central_delta, central_epsilon, central_noise_multiplier, derived_seed, require_opacus,
                                    secret_seed)

    if federation.clip_update_norm is None:
        return None
    bounding = UpdateBounding(clip=federation.clip_update_norm, reference=reference)
    central = federation.central_dp
    if central is not None:
        require_opacus()
        sampled = federation.clients_sampled()
        rate = sampled / federation.num_clients
        noise = central_noise_multiplier(central, rate, federation.rounds, federation.num_clients)
        bounding.noise_multiplier, bounding.denominator = noise, sampled
        bounding.noise_seed = derived_seed(secret_seed(secret_dir), "central-dp", round_index)
        bounding.accounting = {
            "sample_rate": rate, "rounds": round_index, "accountant": central.accountant, "level": "client",
            "delta": central_delta(central, federation.num_clients),
            "epsilon": central_epsilon(central, noise, rate, round_index, federation.num_clients),
            "epsilon_planned": central_epsilon(central, noise, rate, federation.rounds, federation.num_clients),
        }
    return bounding


def _bound_clients(bounding: UpdateBounding, method: AggregationMethod, adapters: Sequence[LoraAdapter],
                   weights: Sequence[float]) -> tuple[list[dict], list[float], list[ClientBound]]:
    """The clients' modules bounded as ``bounding`` asks, the weights to aggregate them with, and
    each client's bound."""
    reference = bounding.reference_modules(method)
    rescale, used_weights = 1.0, list(weights)
    if bounding.noise_multiplier is not None:
        # DP-FedAvg: a fixed denominator, every client alike, so that one client moves the mean by clip/n at most.
        rescale, used_weights = len(adapters) / bounding.denominator, [1.0] * len(adapters)
        if method.central_dp_on != FACTOR_SUMS:
            raise FloristError(f"central_dp on the plain server step noises a mean of factors (fedit, ffa); {method.name} "
                               "is not one (florist takes it on its secure sketch sums: secure_aggregation)")
        refuse_uneven_ranks(adapters)
    modules, bounds = [], []
    for adapter in adapters:
        if reference is not None and set(reference) != set(adapter.modules):
            raise FloristError(f"{adapter.path}: adapts other modules than the global it continued ({bounding.reference})")
        try:
            bounded, bound = bound_client(adapter.modules, bounding.clip, reference=reference,
                                          freezes_lora_a=method.freezes_lora_a, rescale=rescale)
        except ValueError as error:
            raise FloristError(f"{adapter.path}: {error}") from None
        modules.append(bounded)
        bounds.append(bound)
    return modules, used_weights, bounds


def refuse_uneven_ranks(adapters: Sequence[LoraAdapter]) -> None:
    """Central DP on a mean of factors: one line (`bounding.averaged_ranks_refusal`) when the round's
    clients differ in rank on any module."""
    for name in adapters[0].modules:
        reason = averaged_ranks_refusal([adapter.modules[name].rank for adapter in adapters])
        if reason is not None:
            raise FloristError(reason)


def add_central_noise(result: AggregationResult, bounding: UpdateBounding, method: AggregationMethod) -> None:
    """Gaussian noise of std ``bounding.noise_std()`` (σ·clip/n) on every trained factor of the mean (B, and A
    unless frozen), drawn in one fixed order from the round's secret seed."""
    generator = torch.Generator().manual_seed(bounding.noise_seed)
    std = bounding.noise_std()
    for name in sorted(result.modules):  # one fixed order: the same seed gives the same noise
        module = result.modules[name]
        module.lora_b = gaussian_noise_like(module.lora_b, std, generator)
        if not method.freezes_lora_a:
            module.lora_a = gaussian_noise_like(module.lora_a, std, generator)


def _client_report(method: AggregationMethod, modules: Sequence[dict], result: AggregationResult,
                   bounds: list[ClientBound] | None, bounding: UpdateBounding | None) -> dict:
    """The sidecar's per-client norms (and, for fresh-LoRA methods, cosines to the global update)
    of the clients' ``modules`` as they sent them."""
    clients = [bound.record() for bound in bounds] if bounds else [{} for _ in modules]
    report: dict = {"clients": clients}
    if method.merges_into_base and all(module for module in modules):
        if _report_reads_factors(method, bounding):
            products = {name: factor_products([client[name] for client in modules], m.lora_b, m.lora_a)
                        for name, m in result.modules.items()}
        else:
            products = {name: module.client_products for name, module in result.modules.items()}
            if any(product is None for product in products.values()):
                raise RuntimeError(f"{method.name} declares reports_client_products but returned a module without them")
        outlook = outlier_report(modules, products)
        for client, whole in zip(clients, outlook["clients"]):
            client.setdefault("update_norm", whole["update_norm"])
            client["cosine"] = whole["cosine"]
        report["modules"] = outlook["modules"]
    if all("update_norm" in client for client in clients):
        flagged = outliers([c["update_norm"] for c in clients])
        report["outliers"] = flagged
    return report


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
    bounding: UpdateBounding | None = None,
) -> ServerStep:
    """Read client adapters, aggregate them, and write the global PEFT adapter + sidecar atomically.
    With ``bounding`` every client's update is first bounded (and, for client-level DP, the mean noised).

    Every input problem raises FloristError before anything is written to ``out_dir``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FloristError(f"{out_dir}: already exists; choose another --out or pass --force to replace it")
    if method.streaming:
        if weights is not None and len(weights) != len(client_dirs):
            client_weights([None] * len(client_dirs), weights)  # the one-line error for a count mismatch
        streamed = StreamingServerRound(method, bounding)
        for index, client_dir in enumerate(client_dirs):
            streamed.add(client_dir, None if weights is None else weights[index])
        return streamed.write(out_dir, dtype=dtype, overwrite=overwrite, client_names=client_names)
    started = time.perf_counter()
    adapters = read_client_adapters(client_dirs)
    raw_weights = client_weights(adapters, weights)
    wire_dtype = dtype or widest_dtype(adapter.dtype for adapter in adapters)
    modules, used_weights, bounds = [dict(adapter.modules) for adapter in adapters], raw_weights, None
    if bounding is not None:
        modules, used_weights, bounds = _bound_clients(bounding, method, adapters, raw_weights)
    # Unless the outlier report reads them, each module's client factors are released as soon as that
    # module is aggregated: the clients' factors and the global's are never all in memory at once.
    release = not _report_reads_factors(method, bounding)
    if release:
        adapters = [without_factors(adapter) for adapter in adapters]
    try:
        # Results in the wire dtype module by module: fp64 copies of every module would double the peak.
        result = method.aggregate(modules, used_weights, result_dtype=wire_dtype, release=release)
    except SharedAMismatch as error:
        raise FloristError(f"{adapters[error.client_index].path}: {error}") from None
    if bounding is not None and bounding.noise_multiplier is not None:
        add_central_noise(result, bounding, method)
    report = _client_report(method, [adapter.modules for adapter in adapters], result, bounds, bounding)
    # Freed before the write, whose serialisation holds a second copy of the global adapter.
    del modules
    adapters = [without_factors(adapter) for adapter in adapters]
    return _write_server_step(method, adapters, raw_weights, result, out_dir, wire_dtype, overwrite, client_names,
                              time.perf_counter() - started, report, bounding)


def _report_reads_factors(method: AggregationMethod, bounding: UpdateBounding | None) -> bool:
    """Whether the outlier report computes the clients' products with the global from their factors:
    for a merge-style method that does not return them, or when the factors it aggregated are not
    those sent (a bound relative to a reference changes them, central noise changes the global;
    a fresh LoRA's bound scales s only, which the report applies itself)."""
    as_sent = bounding is None or (bounding.reference is None and bounding.noise_multiplier is None)
    return method.merges_into_base and not (as_sent and method.reports_client_products())


def _write_server_step(method, adapters, raw_weights, result, out_dir, wire_dtype, overwrite, client_names,
                       server_seconds, report: dict | None = None, bounding: UpdateBounding | None = None,
                       sidecar_extra: dict | None = None) -> ServerStep:
    """The global adapter (and FlexLoRA's per-client ones) plus the sidecar, written atomically.
    ``sidecar_extra``: merged into the sidecar, dict into dict (secure aggregation's record)."""
    communication = round_communication(
        method,
        adapters[0].module_shapes,
        [_client_rank(adapter) for adapter in adapters],
        result.selected_ranks,
        bytes_per_param=torch.finfo(wire_dtype).bits // 8,
    )
    names = list(client_names) if client_names else [f"client_{index}" for index in range(len(adapters))]
    sidecar = build_sidecar(method, adapters, raw_weights, result, communication, names, server_seconds)
    if report is not None:
        for client, row in zip(sidecar["clients"], report["clients"]):
            client.update(row)
        for name, rows in report.get("modules", {}).items():
            sidecar["modules"][name]["clients"] = rows
        sidecar["outliers"] = [names[index] for index in report.get("outliers", [])]
    if bounding is not None:
        sidecar["bounding"] = {
            "clip_update_norm": bounding.clip,
            "bounded": "the factors' change since the global the clients continued" if bounding.reference is not None
                       else "each client's update s·B·A",
            "over": "the whole adapter",
            **({"central_dp": {"noise_multiplier": bounding.noise_multiplier, "denominator": bounding.denominator,
                               "noise_std": bounding.noise_std(), "weighting": "uniform",
                               **({"noised_sums": bounding.noised_sums} if bounding.noised_sums > 1 else {}),
                               **({"quantisation_slack": bounding.quantisation_slack} if bounding.quantisation_slack else {}),
                               **(bounding.accounting or {})}}
               if bounding.noise_multiplier is not None else {}),
        }
    _merge(sidecar, sidecar_extra or {})
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


def _merge(target: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


class StreamingServerRound:
    """Client adapter directories folded into a streaming aggregation one at a time, as they arrive:
    the server holds the running factors and one client, never every client's stack.

    ``add`` reads and checks one client (every problem a one-line FloristError, before anything is
    written) and folds it in; ``write`` selects the ranks on the final spectrum and writes the global
    adapter and sidecar atomically, exactly as ``aggregate_adapters`` does.
    """

    def __init__(self, method: AggregationMethod, bounding: UpdateBounding | None = None):
        self.method = method
        self.round = method.stream()
        self.bounding = bounding
        self.adapters: list[LoraAdapter] = []  # folded clients, factors dropped
        self.given_weights: list[float | None] = []
        #: Each folded client's update norm (and bound); their cosines need the factors, which are not kept.
        self.client_rows: list[dict] = []
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
        modules = adapter.modules
        if self.bounding is not None:
            try:
                modules, bound = bound_client(modules, self.bounding.clip)
            except ValueError as error:
                raise FloristError(f"{adapter.path}: {error}") from None
            self.client_rows.append(bound.record())
        else:
            self.client_rows.append({"update_norm": update_norm(modules)})
        self.round.add(modules, float(used))
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
        report = {"clients": self.client_rows,
                  "outliers": outliers([row["update_norm"] for row in self.client_rows])}
        return _write_server_step(self.method, self.adapters, raw_weights, result, Path(out_dir), wire_dtype,
                                  overwrite, client_names, seconds, report, self.bounding)


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
