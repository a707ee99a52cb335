"""FedIT: average A and B separately (zero-padded to the largest rank); inexact by design."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from florist_hf.aggregation.base import AggregationMethod, register_method
from florist_hf.aggregation.linalg import COMPUTE_DTYPE, zero_pad_rank
from florist_hf.aggregation.types import ClientModule, ModuleAggregate


@register_method
class FedIT(AggregationMethod):
    """B̄ = Σ p_k s_k B_k and Ā = Σ p_k A_k: the product of averages is not the average of products
    (the "aggregation noise" exact methods avoid). Clients of smaller rank take the first r_k
    components of the padded average next round."""

    name = "fedit"
    exact = False

    def aggregate_module(self, clients: Sequence[ClientModule], client_weights: torch.Tensor) -> ModuleAggregate:
        max_rank = max(c.rank for c in clients)
        mean_b = sum(
            float(p) * c.scale * zero_pad_rank(c.lora_b.to(COMPUTE_DTYPE), max_rank, dim=1)
            for c, p in zip(clients, client_weights)
        )
        mean_a = sum(
            float(p) * zero_pad_rank(c.lora_a.to(COMPUTE_DTYPE), max_rank, dim=0)
            for c, p in zip(clients, client_weights)
        )
        return ModuleAggregate(mean_b, mean_a, selected_rank=max_rank)

    def broadcast_rank(self, client_ranks: Sequence[int], selected_rank: int) -> int:
        return max(client_ranks)
