"""FedIT: average A and B separately (zero-padded to the largest rank); inexact by design."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from florist_hf.aggregation.base import AggregationMethod, register_method
from florist_hf.aggregation.linalg import COMPUTE_DTYPE
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
        (m, n) = clients[0].shape
        # Accumulate in place into the padded fp64 averages: a client of rank r_k adds to the first
        # r_k components only, which is zero-padding without materialising the padded copies.
        mean_b = torch.zeros(m, max_rank, dtype=COMPUTE_DTYPE)
        mean_a = torch.zeros(max_rank, n, dtype=COMPUTE_DTYPE)
        for client, weight in zip(clients, client_weights.tolist()):
            mean_b[:, : client.rank].add_(client.lora_b, alpha=weight * client.scale)
            mean_a[: client.rank].add_(client.lora_a, alpha=weight)
        return ModuleAggregate(mean_b, mean_a, selected_rank=max_rank)

    def broadcast_rank(self, client_ranks: Sequence[int], selected_rank: int) -> int:
        return max(client_ranks)
