"""The method interface and the name registry: a method is chosen by name, never by an if-chain."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import torch
from threadpoolctl import threadpool_limits

from florist_hf.aggregation.types import AggregationResult, ClientModule, ModuleAggregate

METHODS: dict[str, type["AggregationMethod"]] = {}


def register_method(cls: type["AggregationMethod"]) -> type["AggregationMethod"]:
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
    #: A client's update can be bounded before aggregation; FlexLoRA aggregates each client's whole
    #: product (the global it was sent included), so it has no update apart from that to bound.
    bounds_updates: ClassVar[bool] = True
    #: Clients train a fresh LoRA on top of the base plus every round's global update (FLoRIST,
    #: FLoRA: SPEC §4's merge-style); otherwise they keep training the global factors.
    merges_into_base: ClassVar[bool] = False
    #: Clients are folded into the result one at a time (``stream()``) rather than stacked at once.
    streaming: bool = False

    @abstractmethod
    def aggregate_module(self, clients: Sequence[ClientModule], client_weights: torch.Tensor) -> ModuleAggregate:
        """Aggregate one module; ``client_weights`` are normalised (they sum to 1)."""

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
    ) -> AggregationResult:
        """Aggregate every module; clients must share module names and shapes (checked on load).

        Factors come back in the compute precision (fp64) unless ``result_dtype`` is given: then each
        module is cast as soon as it is computed, so a whole model's results are never held in fp64.
        Modules are independent, so they are computed in parallel on torch's threads (see ``map_modules``).
        """
        if not clients:
            raise ValueError("no clients to aggregate")
        weights = torch.as_tensor(list(client_weights), dtype=torch.float64)
        if weights.numel() != len(clients) or bool((weights <= 0).any()) or not bool(torch.isfinite(weights).all()):
            raise ValueError("client weights must be one positive finite number per client")
        weights = weights / weights.sum()

        def aggregate_one(name: str) -> ModuleAggregate:
            return _cast(self.aggregate_module([client[name] for client in clients], weights), result_dtype)

        names = list(clients[0])
        modules = dict(zip(names, map_modules(aggregate_one, names)))
        return AggregationResult(self.name, modules, weights.tolist(), self.options())


def map_modules(function: Callable[[str], ModuleAggregate], names: Sequence[str]) -> list[ModuleAggregate]:
    """``[function(name) for name in names]``, spread over ``torch.get_num_threads()`` worker threads.

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
            return [function(name) for name in names]
    torch.set_num_threads(1)  # read by each new worker thread on its first op
    try:
        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="florist-aggregate"
        ) as pool:
            return list(pool.map(function, names))
    finally:
        torch.set_num_threads(threads)


def _contiguous(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype or tensor.dtype).contiguous()  # no copy when already both


def _cast(module: ModuleAggregate, dtype: torch.dtype | None) -> ModuleAggregate:
    """Contiguous factors in ``dtype`` (default: as computed), in one copy at most."""
    module.lora_b, module.lora_a = _contiguous(module.lora_b, dtype), _contiguous(module.lora_a, dtype)
    if module.client_factors is not None:
        module.client_factors = [(_contiguous(b, dtype), _contiguous(a, dtype)) for b, a in module.client_factors]
    return module


def get_method(name: str, **options) -> AggregationMethod:
    """Instantiate a registered method by name, e.g. ``get_method("florist", threshold=0.9)``."""
    try:
        method_cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown aggregation method {name!r}; choose one of {sorted(METHODS)}") from None
    return method_cls(**options)
