"""The method interface and the name registry: a method is chosen by name, never by an if-chain.

Each method declares, in its own module, what it needs from the clients (``needs``), the
federation settings it takes (``settings``), what it can do (the class flags below) and what it
refuses (``refusal``); everything outside the methods reads those declarations through ``METHODS``,
so a new method is one module plus one import in ``aggregation/__init__.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import ClassVar

import torch
from threadpoolctl import threadpool_limits

from florist_hf.aggregation.types import AggregationResult, ClientModule, ModuleAggregate

METHODS: dict[str, type["AggregationMethod"]] = {}

# What the server needs from the clients to aggregate (``AggregationMethod.needs``): under secure
# aggregation it learns sums only, so a method that needs each client's own factors cannot run there.
#: Each client's own factors (FLoRA broadcasts them; a robust statistic reads every client's).
FACTORS = "factors"
#: The weighted sums of the clients' factors, Σ p_k·s_k·B_k and Σ p_k·A_k, zero-padded to the largest rank.
FACTOR_SUMS = "factor_sums"
#: The sums of each client's two sketches of its update, Σ p_k·s_k·B_k·(A_k·Ω) and Σ p_k·s_k·(Qᵀ·B_k)·A_k
#: (Ω shared and random, Q the orthonormal range of the first sum): the round's update ΔW = Σ p_k·s_k·B_k·A_k.
SKETCH_SUMS = "sketch_sums"
NEEDS = (FACTORS, FACTOR_SUMS, SKETCH_SUMS)


def register_method(cls: type["AggregationMethod"]) -> type["AggregationMethod"]:
    """Add a method to ``METHODS`` under its ``name``, after checking its declarations."""
    if not cls.needs or not cls.needs <= set(NEEDS):
        raise TypeError(f"{cls.__name__}.needs must be a non-empty subset of {NEEDS}")
    if (SKETCH_SUMS in cls.needs) != (cls.from_sketch is not AggregationMethod.from_sketch):
        raise TypeError(f"{cls.__name__} declares {SKETCH_SUMS} in its needs exactly when it defines from_sketch")
    if cls.central_dp_on is not None and cls.central_dp_on not in cls.needs:
        raise TypeError(f"{cls.__name__} noises {cls.central_dp_on} for central DP, which it does not declare in its needs")
    if cls.name in METHODS:
        raise TypeError(f"aggregation method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


class AggregationMethod(ABC):
    """One federated LoRA aggregation rule, applied module by module."""

    name: ClassVar[str]
    #: True when the global update equals the weighted sum of client updates exactly.
    exact: ClassVar[bool]
    #: Only B travels, both ways (FFA-LoRA's A never changes): halves the traffic and counts half in Eff.
    b_only: ClassVar[bool] = False
    #: Clients train B only, A frozen at what the server sent (FFA-LoRA, FedSVD): only B goes up.
    freezes_lora_a: ClassVar[bool] = False
    #: Clients continue the global factors on top of a frozen sum of earlier rounds' residuals
    #: (FedEx-LoRA: each global's components past ``continued_rank``).
    holds_residual: ClassVar[bool] = False
    #: The global factors are averages of the client factors (FedIT, FFA-LoRA): the server can add
    #: noise to them (central DP) or take robust statistics of them instead.
    averages_factors: ClassVar[bool] = False
    #: Client-level central DP (``federation.central_dp``): the sums the server noises, each client's bounded
    #: update weighted alike: ``FACTOR_SUMS`` (the mean of the factors: FedIT, FFA-LoRA), ``SKETCH_SUMS``
    #: (the two sketch sums, under secure aggregation: FLoRIST), or None where the global needs each
    #: client's own factors and noise on the server cannot hide them.
    central_dp_on: ClassVar[str | None] = None
    #: A client's update can be bounded before aggregation; FlexLoRA aggregates each client's whole
    #: product (the global it was sent included), so it has no update apart from that to bound.
    bounds_updates: ClassVar[bool] = True
    #: Clients train a fresh LoRA on top of the base plus every round's global update (FLoRIST,
    #: FLoRA: SPEC §4's merge-style); otherwise they keep training the global factors.
    merges_into_base: ClassVar[bool] = False
    #: Clients are folded into the result one at a time (``stream()``) rather than stacked at once.
    streaming: bool = False
    #: It can aggregate streaming (``aggregation: streaming``), not only stacked.
    can_stream: ClassVar[bool] = False
    #: What the server needs from the clients (a subset of ``NEEDS``) with the method's default options.
    needs: ClassVar[frozenset[str]] = frozenset()
    #: The federation settings (recipe keys, CLI options) the method takes -> its constructor's keyword.
    settings: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def from_settings(cls, settings: Mapping[str, object]) -> "AggregationMethod":
        """The method with its options taken from federation settings (the keys it declares in ``settings``)."""
        return cls(**{keyword: settings[key] for key, keyword in cls.settings.items() if key in settings})

    @classmethod
    def refusal(cls, client_ranks: Sequence[int], samples_every_client: bool) -> str | None:
        """Why the method cannot run a federation of clients with these LoRA ranks (sampled every
        round or not), as one line naming the fix; None when it can."""
        return None

    def reports_client_products(self) -> bool:
        """Whether ``aggregate_module`` returns each client's `ClientProducts` with the global update
        (for the outlier report; merge-style methods read them off the Gram matrices they form)."""
        return False

    def client_needs(self) -> frozenset[str]:
        """What the server needs from the clients with these options (``needs`` unless an option changes it)."""
        return self.needs

    @abstractmethod
    def aggregate_module(self, clients: Sequence[ClientModule], client_weights: torch.Tensor,
                         result_dtype: torch.dtype | None = None) -> ModuleAggregate:
        """Aggregate one module; ``client_weights`` are normalised (they sum to 1). ``result_dtype``: what the
        caller keeps the factors in (None: the compute precision); a method may compute its last products no
        finer than that needs (FLoRIST's, in fp32 for a 16-bit result)."""

    def from_sketch(self, update, client_ranks: Sequence[int], summed: ClientModule | None = None,
                    result_dtype: torch.dtype | None = None) -> ModuleAggregate:
        """One module from the round's sketched update (an `aggregation.sketch.SketchedUpdate`: ΔW = Q·Z,
        learnt from two sums), the clients' ranks (public) and, where the method also declares
        ``FACTOR_SUMS``, the summed factors (Σ p_k·s_k·B_k, Σ p_k·A_k, padded) as one client of scale 1;
        ``result_dtype`` as in ``aggregate_module``. Defined by exactly the methods that declare
        ``SKETCH_SUMS`` (secure aggregation calls it)."""
        raise NotImplementedError(f"{self.name} does not aggregate from sketch sums")

    def sketch_precision(self, result_dtype: torch.dtype | None) -> torch.dtype:
        """The precision of the QR that gives the sketch's range basis Q, for a result kept in
        ``result_dtype`` (Q travels in fp64 and is orthogonal to fp64 precision either way: see
        `sketch.range_basis`); fp64 unless the method can do with less."""
        return torch.float64

    def broadcast_rank(self, client_ranks: Sequence[int], selected_rank: int) -> int:
        """Rank of the global adapter the server broadcasts for one module (the Eff denominator)."""
        return selected_rank

    def downlink_rank(self, client_rank: int, client_ranks: Sequence[int], selected_rank: int) -> int:
        """Rank one client receives for one module."""
        return self.broadcast_rank(client_ranks, selected_rank)

    def options(self) -> dict:
        """The method's settings, recorded in the sidecar."""
        return {}

    def aggregate(
        self,
        clients: Sequence[dict[str, ClientModule]],
        client_weights: Sequence[float],
        result_dtype: torch.dtype | None = None,
        *,
        release: bool = False,
    ) -> AggregationResult:
        """Aggregate every module; clients must share module names and shapes (checked on load).

        Factors come back in the compute precision (fp64) unless ``result_dtype`` is given: then each
        module is cast as soon as it is computed, so a whole model's results are never held in fp64.
        With ``release`` each module's client factors are taken out of ``clients`` (the caller's dicts,
        left empty) as that module is aggregated, so that their memory goes as the results arrive.
        Modules are independent, so they are computed in parallel on torch's threads (see ``map_modules``).
        """
        if not clients:
            raise ValueError("no clients to aggregate")
        weights = torch.as_tensor(list(client_weights), dtype=torch.float64)
        if weights.numel() != len(clients) or bool((weights <= 0).any()) or not bool(torch.isfinite(weights).all()):
            raise ValueError("client weights must be one positive finite number per client")
        weights = weights / weights.sum()

        def aggregate_one(name: str) -> ModuleAggregate:
            modules = [client.pop(name) if release else client[name] for client in clients]
            return self.aggregate_module(modules, weights, result_dtype)

        names = list(clients[0])
        # Cast on this thread: the results are allocated where the released client factors were.
        modules = dict(zip(names, map_modules(aggregate_one, names, then=lambda module: _cast(module, result_dtype))))
        return AggregationResult(self.name, modules, weights.tolist(), self.options())


def map_modules(function: Callable[[str], ModuleAggregate], names: Sequence[str],
                then: Callable[[ModuleAggregate], ModuleAggregate] = lambda module: module) -> list[ModuleAggregate]:
    """``[then(function(name)) for name in names]``, ``function`` spread over ``torch.get_num_threads()``
    worker threads, ``then`` on the calling thread as each result arrives, in order.

    A module's work is a handful of GEMMs on m×R data with R in the hundreds and a few R×R
    factorisations that do not parallelise: one module per core, each single-threaded, keeps every
    core busy where threads within one module would mostly wait. Torch ops release the GIL. numpy's
    BLAS (``linalg.blas_matmul``) gets the same thread budget as torch, and both settings are
    restored afterwards.
    """
    threads = torch.get_num_threads()
    workers = min(threads, len(names))
    if workers <= 1:
        with threadpool_limits(threads, user_api="blas"):
            return [then(function(name)) for name in names]
    with single_threaded_pool(workers) as pool:
        return [then(module) for module in pool.map(function, names)]


@contextmanager
def single_threaded_pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    """``workers`` threads for per-module jobs, torch and numpy's BLAS at one thread each while it
    is open (torch's setting is read by each new worker thread on its first op); both restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="florist-aggregate"
        ) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


class ModuleWorkers:
    """Per-module jobs submitted one by one as their inputs arrive (`map_modules` when all are at
    hand): on ``torch.get_num_threads()`` single-threaded worker threads (`single_threaded_pool`,
    opened at the first ``submit``), or run at once on the calling thread when that is one thread.
    Torch ops and numpy's BLAS release the GIL, so the jobs overlap what the calling thread does
    meanwhile. Leaving the ``with`` waits for every job and restores the thread settings."""

    def __init__(self):
        self.threads = torch.get_num_threads()
        self._stack = ExitStack()
        self._pool: ThreadPoolExecutor | None = None
        self._started = False

    def submit(self, function: Callable[..., object], *args) -> Future:
        if not self._started:
            self._started = True
            if self.threads > 1:
                self._pool = self._stack.enter_context(single_threaded_pool(self.threads))
            else:
                self._stack.enter_context(threadpool_limits(1, user_api="blas"))
        if self._pool is not None:
            return self._pool.submit(function, *args)
        future: Future = Future()
        try:
            future.set_result(function(*args))
        except Exception as error:  # raised where the result is read, as a worker's would be
            future.set_exception(error)
        return future

    def __enter__(self) -> "ModuleWorkers":
        return self

    def __exit__(self, *exc_info) -> None:
        self._pool, self._started = None, False
        self._stack.close()


def _contiguous(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype or tensor.dtype).contiguous()  # no copy when already both


def _cast(module: ModuleAggregate, dtype: torch.dtype | None) -> ModuleAggregate:
    """Contiguous factors in ``dtype`` (default: as computed), in one copy at most."""
    module.lora_b, module.lora_a = _contiguous(module.lora_b, dtype), _contiguous(module.lora_a, dtype)
    if module.client_factors is not None:
        module.client_factors = [(_contiguous(b, dtype), _contiguous(a, dtype)) for b, a in module.client_factors]
    return module


def method_class(name: str) -> type[AggregationMethod]:
    """The registered method called ``name``; a ValueError lists the registered names."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown aggregation method {name!r}; choose one of {', '.join(sorted(METHODS))}") from None


def get_method(name: str, **options) -> AggregationMethod:
    """Instantiate a registered method by name, e.g. ``get_method("florist", threshold=0.9)``."""
    return method_class(name)(**options)


def method_from_settings(name: str, settings: Mapping[str, object]) -> AggregationMethod:
    """A registered method with the federation settings it declares taken from ``settings``
    (e.g. a recipe's federation section); the others are ignored."""
    return method_class(name).from_settings(settings)
