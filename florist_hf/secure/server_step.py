"""The server step under secure aggregation: each client computes its contribution from its own adapter,
the contributions are summed through SecAgg+, and the global adapter is built from the sums alone.

FLoRIST, FlexLoRA and FedEx-LoRA take the two sums of the two-stage sketch (`aggregation.sketch`):
exact when the sketch is as wide as the update's rank bound; FedIT, FFA-LoRA and FedSVD take their
summed factors and aggregate them as one client of weight 1 (the same code as the plain method).
In ``florist-hf run`` the clients' side runs in the server's process, each on its own adapter only
(`secure_aggregate_adapters`); in a Flower deployment each runs on its node (`flower.secure`). Either
way the server's side sees nothing but the protocol's messages and the sums (`secure_aggregate`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from florist_hf.adapters import LoraAdapter, client_weights, read_adapter, read_client_adapters, widest_dtype, without_factors
from florist_hf.aggregation import (
    AggregationMethod,
    AggregationResult,
    ClientModule,
    ModuleAggregate,
    round_communication,
)
from florist_hf.aggregation import sketch
from florist_hf.aggregation.base import ModuleWorkers
from florist_hf.aggregation.bounding import bound_client
from florist_hf.aggregation.linalg import COMPUTE_DTYPE, padded_weighted_sum
from florist_hf.errors import FloristError
from florist_hf.secure.encoding import sensitivity_slack, sum_error
from florist_hf.secure.errors import SecureAggregationError
from florist_hf.secure.local import SecureSum, secure_sum
from florist_hf.secure.methods import FACTOR_SUMS, SKETCH, secure_inputs
from florist_hf.secure.protocol import ArrayJobs, EncryptedShares, MaskedInput, PublicKeys, RevealedShares
from florist_hf.secure.settings import NARROW_SKETCH_UNDER_DP, SecAggSettings
from florist_hf.server import (
    ServerStep,
    UpdateBounding,
    _client_rank,
    _write_server_step,
    add_central_noise,
    refuse_uneven_ranks,
)

OUTLIER_NOTE = "unavailable under secure aggregation: the server sees only sums, never a client's update or its norm"


@dataclass(frozen=True)
class SecureRound:
    """A round's public secure-aggregation parameters."""

    settings: SecAggSettings
    #: Seeds the public sketch matrices Ω (the server broadcasts it; the engine derives it from the recipe).
    seed: int
    #: Sketch width per module (None: min(Σ r_k + 8, m, n), exact; see `sketch.default_columns`). Central DP
    #: on the sketch sums needs one fixed before the round (`sketch.participation_free_columns`).
    sketch_columns: int | None = None
    #: The global the clients continued: its frozen A is the shared A of FFA-LoRA and FedSVD.
    reference: Path | None = None
    #: federation.clip_update_norm: each client bounds its own update before it masks (the server
    #: sees no norm); the update is the change since ``reference`` where there is one, else s·B·A.
    clip: float | None = None
    #: federation.central_dp (FedIT, FFA-LoRA): the round's noise (σ, the fixed denominator, the secret seed,
    #: the accounting), added by the server to the decoded mean (`server.round_bounding` makes it).
    central_dp: UpdateBounding | None = None


@dataclass(frozen=True)
class ModulePlan:
    """What every client sends for one module (public: shapes, ranks and the seed are)."""

    name: str
    shape: tuple[int, int]
    max_rank: int
    columns: int
    exact_columns: int

    @property
    def checks_error(self) -> bool:
        return self.columns < self.exact_columns

    def factor_values(self, freezes_lora_a: bool) -> int:
        """The values of the module's summed factors a client sends: Σ p·s·B padded to the round's largest
        rank (m·r_max), and Σ p·A (r_max·n) unless A is frozen."""
        m, n = self.shape
        return m * self.max_rank + (0 if freezes_lora_a else self.max_rank * n)

    @property
    def basis_values(self) -> int:
        """The values of the module's broadcast basis Q (`sketch.RangeBasis.values`)."""
        return sketch.RangeBasis.values(self.shape[0], self.columns)


def plan_modules(module_shapes: Mapping[str, tuple[int, int]], client_ranks: Sequence[Mapping[str, int]],
                 sketch_columns: int | None) -> list[ModulePlan]:
    plans = []
    for name, shape in module_shapes.items():
        ranks = [ranks[name] for ranks in client_ranks]
        exact = sketch.rank_bound(ranks, shape)
        columns = sketch.default_columns(ranks, shape) if sketch_columns is None else min(sketch_columns, *shape)
        plans.append(ModulePlan(name, shape, max(ranks), columns, exact))
    return plans


class ClientSide:
    """One client's part of the secure round: it reads its own adapter's modules and nothing else."""

    def __init__(self, modules: Mapping[str, ClientModule], weight: float, needs: Sequence[str], freezes_lora_a: bool,
                 unit_sketch: bool = False):
        self.modules, self.weight, self.needs, self.freezes_lora_a = modules, float(weight), needs, freezes_lora_a
        self.unit_sketch = unit_sketch

    def first_sum(self, plans: Sequence[ModulePlan], seed: int) -> dict[str, np.ndarray]:
        """The range sketch (and error check) and/or the padded weighted factors, by array name."""
        arrays = {}
        for plan in plans:
            module = self.modules[plan.name]
            if SKETCH in self.needs:
                omega = sketch.sketch_matrix(plan.shape[1], plan.columns, seed, plan.name, orthonormal=self.unit_sketch)
                arrays[f"{plan.name}/range"] = sketch.range_sketch(module, self.weight, omega).numpy()
                if plan.checks_error:
                    check = sketch.sketch_matrix(plan.shape[1], sketch.ERROR_CHECK_COLUMNS, seed, plan.name, "error")
                    arrays[f"{plan.name}/check"] = sketch.range_sketch(module, self.weight, check).numpy()
            if FACTOR_SUMS in self.needs:
                scale = self.weight * module.scale
                arrays[f"{plan.name}/lora_b"] = padded_weighted_sum([module.lora_b], [scale], plan.max_rank, dim=1).numpy()
                if not self.freezes_lora_a:
                    arrays[f"{plan.name}/lora_a"] = padded_weighted_sum([module.lora_a], [self.weight], plan.max_rank,
                                                                        dim=0).numpy()
        return arrays

    def second_sum(self, bases: Mapping[str, sketch.RangeBasis]) -> dict[str, np.ndarray]:
        """The projection sketch Z_k = p_k s_k (Qᵀ B_k) A_k of every module, on the broadcast Q."""
        return {f"{name}/projection": sketch.projection_sketch(self.modules[name], self.weight, basis).numpy()
                for name, basis in bases.items()}


@dataclass(frozen=True)
class SumTask:
    """What every client computes for one secure sum, all of it public: the first sum's module plans
    and sketch seed, or the second's broadcast bases Q; the clients' normalised weights, in order."""

    kind: str  # "first" or "second"
    plans: tuple[ModulePlan, ...]
    seed: int
    weights: tuple[float, ...]
    needs: tuple[str, ...]
    freezes_lora_a: bool
    bases: Mapping[str, sketch.RangeBasis] | None = None
    #: Each client first bounds its update to this norm (`aggregation.bounding.bound_client`); relative:
    #: the update is the change of its factors since the global it continued (its ``reference``).
    clip: float | None = None
    relative: bool = False
    #: Central DP's fixed denominator: each bounded update is scaled by n/denominator (`bound_client`).
    rescale: float = 1.0
    #: Central DP on the sketch sums: Ω with orthonormal columns, so that a sketch is no longer than the
    #: update it sketches (`sketch.sketch_matrix`).
    unit_sketch: bool = False

    def compute(self, index: int, modules: Mapping[str, ClientModule],
                reference: Mapping[str, ClientModule] | None = None) -> dict[str, np.ndarray]:
        """Client ``index``'s arrays, from its own adapter's ``modules`` (bounded first where the round
        clips, relative to ``reference``, the global it continued, where the update is a change)."""
        if self.clip is not None:
            if self.relative and reference is None:
                raise FloristError("secure aggregation: a client bounds the change of its factors since the global it "
                                   "continued, and that global is missing on its side")
            try:
                modules, _ = bound_client(modules, self.clip, reference=reference if self.relative else None,
                                          freezes_lora_a=self.freezes_lora_a, rescale=self.rescale)
            except ValueError as error:
                raise FloristError(f"secure aggregation: client {index}: {error}") from None
        side = ClientSide(modules, self.weights[index], self.needs, self.freezes_lora_a, self.unit_sketch)
        return side.first_sum(self.plans, self.seed) if self.kind == "first" else side.second_sum(self.bases)


#: Runs one secure sum among the round's clients (SecAgg+ ids 0..n−1, in the round's order), each
#: computing its arrays by ``SumTask.compute``; every message the server receives goes to the Traffic;
#: the server unmasks each array, and runs what follows on it, as the `ArrayJobs` (when given) say.
SumRunner = Callable[[SumTask, SecAggSettings, "Traffic", ArrayJobs | None], SecureSum]


def local_sums(adapters: Sequence[LoraAdapter], reference: Path | None = None) -> SumRunner:
    """The clients of ``florist-hf run``: in this process, each masking its own adapter's arrays;
    ``reference``: the global they continued, which each holds (read once, where a bound needs it)."""
    def run(task: SumTask, settings: SecAggSettings, traffic: "Traffic", jobs: ArrayJobs | None = None) -> SecureSum:
        continued = read_adapter(reference).modules if task.relative and reference is not None else None
        inputs = {k: partial(task.compute, k, adapter.modules, continued) for k, adapter in enumerate(adapters)}
        return secure_sum(inputs, settings, on_message=traffic, jobs=jobs)

    return run


def _tensor(summed: SecureSum, key: str) -> torch.Tensor:
    return torch.from_numpy(summed.arrays[key])


def _message_bytes(message) -> int:
    if isinstance(message, MaskedInput):
        return sum(array.nbytes for array in message.arrays.values())
    if isinstance(message, PublicKeys):
        return len(message.share_key) + len(message.mask_key)
    if isinstance(message, EncryptedShares):
        return sum(len(ciphertext) for ciphertext in message.ciphertexts.values())
    if isinstance(message, RevealedShares):
        return sum(len(share) for share in [*message.seed_shares.values(), *message.key_shares.values()])
    raise TypeError(type(message))


class Traffic:
    """What each client sends and receives in the secure sums, counted message by message as the
    server receives them: bytes up (every message it sent), bytes down (the keys and shares routed
    to it), and the masked parameters it sent."""

    def __init__(self, num_clients: int):
        self.up, self.down, self.params = [0] * num_clients, [0] * num_clients, [0] * num_clients
        #: the part of ``up`` that is the protocol's own (keys, encrypted and revealed shares)
        self.protocol_up = [0] * num_clients

    def __call__(self, message) -> None:
        self.up[message.client_id] += _message_bytes(message)
        if not isinstance(message, MaskedInput):
            self.protocol_up[message.client_id] += _message_bytes(message)
        if isinstance(message, MaskedInput):
            self.params[message.client_id] += sum(array.size for array in message.arrays.values())
        elif isinstance(message, PublicKeys):  # the server forwards every client's keys to every other
            for other in range(len(self.down)):
                self.down[other] += _message_bytes(message) if other != message.client_id else 0
        elif isinstance(message, EncryptedShares):
            for recipient, ciphertext in message.ciphertexts.items():
                self.down[recipient] += len(ciphertext)


def _run_sum(run_sum: SumRunner, task: SumTask, settings: SecAggSettings, stage: str, traffic: Traffic,
             jobs: ArrayJobs | None = None) -> SecureSum:
    summed = run_sum(task, settings, traffic, jobs)
    if len(summed.included) != len(task.weights):
        raise SecureAggregationError(f"secure aggregation: {len(task.weights) - len(summed.included)} clients vanished "
                                     f"during the {stage}; the round needs every client's share of both sums — rerun it")
    return summed


def secure_aggregate_adapters(
    client_dirs: Sequence[str | os.PathLike],
    method: AggregationMethod,
    out_dir: str | os.PathLike,
    secure: SecureRound,
    *,
    weights: Sequence[float] | None = None,
    overwrite: bool = False,
    client_names: Sequence[str] | None = None,
) -> ServerStep:
    """`server.aggregate_adapters` with the server learning only sums; the same global adapter
    within the fixed-point encoding's round-off, written the same way, its sidecar recording the
    protocol, each module's sketch and the traffic (secure and plain side by side). The clients'
    side runs here, each on its own adapter (`local_sums`)."""
    if Path(out_dir).exists() and not overwrite:
        raise FloristError(f"{out_dir}: already exists; choose another --out or pass --force to replace it")
    _check_method(method)
    started = time.perf_counter()
    adapters = read_client_adapters(client_dirs)
    return secure_aggregate([without_factors(adapter) for adapter in adapters], local_sums(adapters, secure.reference),
                            method, out_dir,
                            secure, weights=weights, overwrite=overwrite, client_names=client_names, started=started)


def _check_method(method: AggregationMethod) -> tuple[str, ...]:
    try:
        return secure_inputs(method.name)
    except ValueError as error:
        raise FloristError(str(error)) from None


def _sum_with_jobs(run_sum: SumRunner, task: SumTask, settings: SecAggSettings, stage: str, traffic: Traffic,
                   part: str, job: Callable[[str, torch.Tensor], object]) -> tuple[SecureSum, dict[str, object]]:
    """One secure sum whose arrays the server unmasks on `ModuleWorkers`, each module's ``part`` array
    going on at once, on the same worker, to ``job(module, values)``; returns the sum and every job's
    result by module. The workers close (and torch's threads come back) before it returns, so that
    clients running in this process compute the next sum at the caller's thread setting."""
    results: dict[str, object] = {}

    def then(name: str, values: np.ndarray) -> None:
        module, kind = name.rsplit("/", 1)
        if kind == part:
            results[module] = job(module, torch.from_numpy(values))

    with ModuleWorkers() as workers:
        summed = _run_sum(run_sum, task, settings, stage, traffic, ArrayJobs(then, workers.submit, workers.threads))
    return summed, results


@dataclass
class SecureResult:
    """What the server builds from the secure sums alone (`secure_result`), before anything is written."""

    result: AggregationResult
    raw_weights: list[float]
    needs: tuple[str, ...]
    plans: list[ModulePlan]
    updates: dict[str, sketch.SketchedUpdate]
    traffic: Traffic
    #: What the global is written in: the clients' widest dtype (the sketch methods' precision follows it).
    result_dtype: torch.dtype
    #: Central DP's noise as added (its std covering the fixed-point rounding's slack); None without it.
    central: UpdateBounding | None = None

    @property
    def sums(self) -> int:
        """The secure sums the round took: two for the sketch methods, one for the sum methods."""
        return 2 if SKETCH in self.needs else 1


def secure_result(adapters: Sequence[LoraAdapter], run_sum: SumRunner, method: AggregationMethod, secure: SecureRound,
                  weights: Sequence[float] | None = None) -> SecureResult:
    """The server's side of a secure round, in memory: ``adapters`` are what it knows of the clients
    (their configs, module shapes, ranks and sample counts; factor-free, `adapters.without_factors`),
    ``run_sum`` reaches the clients; it learns the sums and builds the global adapter from them.

    Each array of a sum is unmasked on `ModuleWorkers`, and each module's work follows on the same
    worker as soon as its array is: the range basis Q of each module in the first sum, each module's
    aggregate in the second (the AES keystreams, the decoding and the linear algebra all release the
    GIL, so they run in parallel)."""
    needs = _check_method(method)
    raw_weights = client_weights(adapters, weights)
    total = sum(raw_weights)
    normalised = [weight / total for weight in raw_weights]  # public: the sample counts are
    central, rescale = secure.central_dp, 1.0
    if central is not None:
        if method.central_dp_on is None or secure.clip is None:
            raise FloristError(f"central_dp under secure aggregation noises sums of bounded updates (fedit, ffa, florist "
                               f"with clip_update_norm); {method.name} with clip {secure.clip} is not that")
        # DP-FedAvg as in the plain step: every client alike and a fixed denominator, so that one client moves
        # the mean by clip/denominator at most (and, as the server learns it, by the rounding's slack besides).
        normalised, rescale = [1.0 / len(adapters)] * len(adapters), len(adapters) / central.denominator
        if method.central_dp_on == FACTOR_SUMS:
            refuse_uneven_ranks(adapters)
    plans = plan_modules(adapters[0].module_shapes, [{n: m.rank for n, m in a.modules.items()} for a in adapters],
                         secure.sketch_columns)
    if secure.clip is not None and not method.bounds_updates:
        raise FloristError(f"clip_update_norm: {method.name} has no update to bound (use florist, fedit or ffa)")
    relative = secure.clip is not None and not method.merges_into_base
    if relative and secure.reference is None:
        raise FloristError(f"{method.name} clients bound the change since the global they continued; none was given")
    if central is not None and SKETCH in needs:
        if secure.sketch_columns is None:  # the engine fixes it: `sketch.participation_free_columns`
            raise FloristError("central_dp on the sketch sums needs a sketch width fixed before the round, not one read "
                               "off the round's own clients (whose ranks it would tell): set SecureRound.sketch_columns")
        if any(plan.checks_error for plan in plans):
            raise FloristError(NARROW_SKETCH_UNDER_DP)
    task = SumTask("first", tuple(plans), secure.seed, tuple(normalised), tuple(needs), method.freezes_lora_a,
                   clip=secure.clip, relative=relative, rescale=rescale, unit_sketch=central is not None)

    shared_a = None
    if method.freezes_lora_a:  # public: the server sent it
        if secure.reference is None:
            raise FloristError(f"{method.name} under secure aggregation reads the shared frozen A from the global the "
                               "clients continued; none was given")
        shared_a = read_adapter(secure.reference).modules

    by_name = {plan.name: plan for plan in plans}
    entry_error = sum_error(len(adapters), secure.settings.fraction_bits)
    result_dtype = widest_dtype(adapter.dtype for adapter in adapters)  # what the global is written in
    # Each client computes its arrays when it masks them (one client's held at a time).
    traffic = Traffic(len(adapters))
    if SKETCH not in needs:
        first = _run_sum(run_sum, task, secure.settings, "first sum", traffic)
        modules = {}
        for plan in plans:  # the summed factors are the clients' weighted average: aggregated as one client of weight 1
            summed_b = _tensor(first, f"{plan.name}/lora_b")
            if shared_a is not None:
                summed_a = shared_a[plan.name].lora_a[: plan.max_rank].to(COMPUTE_DTYPE)
            else:
                summed_a = _tensor(first, f"{plan.name}/lora_a")
            modules[plan.name] = method.aggregate_module([ClientModule(summed_a, summed_b, 1.0)],
                                                         torch.ones(1, dtype=COMPUTE_DTYPE))
        result = AggregationResult(method.name, modules, normalised, method.options())
        if central is not None:  # central DP's methods sum their factors: this path alone
            entries = sum(plan.factor_values(method.freezes_lora_a) for plan in plans)
            central = replace(central, quantisation_slack=sensitivity_slack(len(adapters), entries,
                                                                            secure.settings.fraction_bits))
            add_central_noise(result, central, method)
        return SecureResult(result, raw_weights, needs, plans, {}, traffic, result_dtype, central)

    noise_std, noised, precision = 0.0, lambda module, purpose, values: values, method.sketch_precision(result_dtype)
    if central is not None:  # FLoRIST: both sketch sums noised, Q taken from the noised first (`sketch_noise`)
        central, noised = sketch_noise(central, plans, len(adapters), secure.settings.fraction_bits)
        noise_std = central.noise_std()
    first, bases = _sum_with_jobs(run_sum, task, secure.settings, "first sum", traffic, "range",
                                  lambda module, values: sketch.range_basis(noised(module, "range", values), precision))
    bases = {plan.name: bases[plan.name] for plan in plans}  # every Q before any is sent
    for plan in plans:  # Y is done with once its Q is taken: its memory goes before the second sum comes
        del first.arrays[f"{plan.name}/range"]
    updates: dict[str, sketch.SketchedUpdate] = {}

    def aggregate(module: str, projection: torch.Tensor) -> ModuleAggregate:
        plan, basis = by_name[module], bases[module]
        error = sketch.sketch_error(basis, _tensor(first, f"{module}/check")) if plan.checks_error else None
        update = updates[module] = sketch.SketchedUpdate(basis, noised(module, "projection", projection), error,
                                                         entry_error=entry_error, noise_std=noise_std)
        summed = (ClientModule(_tensor(first, f"{module}/lora_a"), _tensor(first, f"{module}/lora_b"), 1.0)
                  if FACTOR_SUMS in needs else None)
        return method.from_sketch(update, [adapter.modules[module].rank for adapter in adapters], summed, result_dtype)

    _, modules = _sum_with_jobs(run_sum, replace(task, kind="second", bases=bases), secure.settings, "second sum",
                                traffic, "projection", aggregate)
    modules = {plan.name: modules[plan.name] for plan in plans}
    result = AggregationResult(method.name, modules, normalised, method.options())
    ordered = {plan.name: updates[plan.name] for plan in plans}
    return SecureResult(result, raw_weights, needs, plans, ordered, traffic, result_dtype, central)


def sketch_noise(central: UpdateBounding, plans: Sequence[ModulePlan], num_clients: int, fraction_bits: int
                 ) -> tuple[UpdateBounding, Callable[[str, str, torch.Tensor], torch.Tensor]]:
    """Central DP on the two sketch sums: the round's noise record and the function that noises a
    module's decoded sum (in place) before anything is computed from it.

    Each client's update is bounded, ‖ΔW_k‖_F ≤ clip over its whole adapter, and weighted 1/denominator.
    Ω has orthonormal columns, so ‖ΔW_k·Ω‖_F ≤ ‖ΔW_k‖_F, and Q has too, so ‖Qᵀ·ΔW_k‖_F ≤ ‖ΔW_k‖_F:
    one client moves each sum (all modules together) by clip/denominator at most, plus the fixed-point
    rounding's slack. Q is computed from the noised Y (post-processing), and with Q fixed the second
    sum has that same sensitivity: two Gaussian mechanisms, each noised at √2·σ, compose to one at σ.
    The noise is drawn per module and sum from the round's secret seed, whatever order the modules'
    arrays are unmasked in."""
    entries = max(sum(plan.shape[0] * plan.columns for plan in plans), sum(plan.columns * plan.shape[1] for plan in plans))
    central = replace(central, quantisation_slack=sensitivity_slack(num_clients, entries, fraction_bits), noised_sums=2)
    std, seed = central.noise_std(), central.noise_seed

    def noised(module: str, purpose: str, values: torch.Tensor) -> torch.Tensor:
        return values.add_(sketch.gaussian_noise(tuple(values.shape), std, seed, module, purpose))

    return central, noised


def secure_aggregate(
    adapters: Sequence[LoraAdapter],
    run_sum: SumRunner,
    method: AggregationMethod,
    out_dir: str | os.PathLike,
    secure: SecureRound,
    *,
    weights: Sequence[float] | None = None,
    overwrite: bool = False,
    client_names: Sequence[str] | None = None,
    started: float | None = None,
) -> ServerStep:
    """The server's side of a secure round (`secure_result`), the global adapter written with a
    sidecar recording the protocol, each module's sketch and the traffic (secure and plain side by side)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FloristError(f"{out_dir}: already exists; choose another --out or pass --force to replace it")
    started = time.perf_counter() if started is None else started
    built = secure_result(adapters, run_sum, method, secure, weights)
    result, plans, needs, traffic, wire_dtype = built.result, built.plans, built.needs, built.traffic, built.result_dtype
    seconds = time.perf_counter() - started

    up, down, params = traffic.up, traffic.down, traffic.params
    basis_bytes = sum(plan.basis_values for plan in plans) * sketch.RangeBasis.BYTES_PER_VALUE if SKETCH in needs else 0
    plain = round_communication(method, adapters[0].module_shapes, [_client_rank(a) for a in adapters],
                                result.selected_ranks, bytes_per_param=torch.finfo(wire_dtype).bits // 8).to_dict()
    downlink = [plain_down + routed + basis_bytes for plain_down, routed in zip(plain["downlink_bytes"], down)]
    extra = {
        "secure_aggregation": {
            "protocol": "SecAgg+ (Bell et al. 2020), all pairs",
            "settings": secure_record(secure),
            "threshold": secure.settings.threshold_for(len(adapters)),
            "sums": built.sums,
            "needs": list(needs),
            "sketch_seed": secure.seed if SKETCH in needs else None,
            "outlier_report": OUTLIER_NOTE,
            "server_seconds": "in florist-hf run it includes every client's side (sketching, masking), run in the "
                              "server's process",
        },
        **({"bounding": {"clip_update_norm": secure.clip, "where": "on each client, before masking: the server sees "
                         "no client's norm", "over": "the whole adapter",
                         "bounded": "the factors' change since the global the clients continued"
                                    if not method.merges_into_base else "each client's update s·B·A"}}
           if secure.clip is not None else {}),
        "modules": {name: {"sketch": update.record()} for name, update in built.updates.items()},
        "communication": {
            "uplink_bytes": up, "uplink_bytes_total": sum(up), "downlink_bytes": downlink,
            "downlink_bytes_total": sum(downlink),
            "secure": {"uplink_params": params, "bytes_per_param": 8, "basis_downlink_bytes": basis_bytes,
                       "protocol_uplink_bytes": traffic.protocol_up, "protocol_downlink_bytes": down},
            "plain": {key: plain[key] for key in ("uplink_bytes", "uplink_bytes_total", "downlink_bytes",
                                                  "downlink_bytes_total", "bytes_per_param")},
        },
    }
    return _write_server_step(method, adapters, built.raw_weights, result, out_dir, wire_dtype, overwrite, client_names,
                              seconds, bounding=built.central, sidecar_extra=extra)


def secure_record(secure: SecureRound) -> dict:
    """The settings a round's sidecar records (and a resumed run compares)."""
    return {"threshold": secure.settings.threshold, "fraction_bits": secure.settings.fraction_bits,
            "sketch_columns": secure.sketch_columns}
