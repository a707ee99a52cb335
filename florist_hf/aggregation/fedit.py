"""FedIT: average A and B separately (zero-padded to the largest rank); inexact by design."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from florist_hf.aggregation.base import FACTOR_SUMS, FACTORS, AggregationMethod, register_method
from florist_hf.aggregation.bounding import robust_combine
from florist_hf.aggregation.linalg import COMPUTE_DTYPE, padded_weighted_sum
from florist_hf.aggregation.types import ClientModule, ModuleAggregate


def robust_needs(robust: str | None, needs: frozenset[str]) -> frozenset[str]:
    """A robust statistic reads every client's own factors; the weighted mean, their sums (``needs``)."""
    return needs if robust is None else frozenset({FACTORS})


def robust_options(robust: str | None, trim_fraction: float) -> dict:
    """The sidecar's record of a robust rule (nothing for the weighted mean, as before it existed)."""
    if robust is None:
        return {}
    return {"robust": robust, **({"trim_fraction": trim_fraction} if robust == "trimmed_mean" else {})}


@register_method
class FedIT(AggregationMethod):
    """B̄ = Σ p_k s_k B_k and Ā = Σ p_k A_k: the product of averages is not the average of products
    (the "aggregation noise" exact methods avoid). Clients of smaller rank take the first r_k
    components of the padded average next round."""

    name = "fedit"
    exact = False
    averages_factors = True
    needs = frozenset({FACTOR_SUMS})
    central_dp_on = FACTOR_SUMS
    settings = {"robust": "robust", "trim_fraction": "trim_fraction"}

    def __init__(self, robust: str | None = None, trim_fraction: float = 0.1):
        #: None (the weighted mean), "median" or "trimmed_mean" (coordinate-wise, each client alike).
        self.robust = robust
        self.trim_fraction = trim_fraction

    def options(self) -> dict:
        return robust_options(self.robust, self.trim_fraction)

    def client_needs(self) -> frozenset[str]:
        return robust_needs(self.robust, self.needs)

    def aggregate_module(self, clients: Sequence[ClientModule], client_weights: torch.Tensor,
                         result_dtype: torch.dtype | None = None) -> ModuleAggregate:
        max_rank = max(c.rank for c in clients)
        if self.robust is not None:
            mean_b = robust_combine([c.scale * c.lora_b.to(COMPUTE_DTYPE) for c in clients], max_rank, 1, self.robust, self.trim_fraction)
            mean_a = robust_combine([c.lora_a for c in clients], max_rank, 0, self.robust, self.trim_fraction)
            return ModuleAggregate(mean_b, mean_a, selected_rank=max_rank)
        weights = client_weights.tolist()
        mean_b = padded_weighted_sum([c.lora_b for c in clients], [w * c.scale for w, c in zip(weights, clients)], max_rank, dim=1)
        mean_a = padded_weighted_sum([c.lora_a for c in clients], weights, max_rank, dim=0)
        return ModuleAggregate(mean_b, mean_a, selected_rank=max_rank)

    def broadcast_rank(self, client_ranks: Sequence[int], selected_rank: int) -> int:
        return max(client_ranks)
