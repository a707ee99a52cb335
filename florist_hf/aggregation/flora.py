"""FLoRA: broadcast the stacked client factors themselves; exact, at rank R = Σ r_k."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from florist_hf.aggregation.base import FACTORS, AggregationMethod, register_method
from florist_hf.aggregation.linalg import stack_weighted_factors
from florist_hf.aggregation.types import ClientModule, ModuleAggregate


@register_method
class Flora(AggregationMethod):
    name = "flora"
    exact = True
    merges_into_base = True
    #: It broadcasts the stacked client factors themselves: every client's own.
    needs = frozenset({FACTORS})

    def reports_client_products(self) -> bool:
        return True

    def aggregate_module(self, clients: Sequence[ClientModule], client_weights: torch.Tensor,
                         result_dtype: torch.dtype | None = None) -> ModuleAggregate:
        stacked_b, stacked_a, products = stack_weighted_factors(clients, client_weights)
        return ModuleAggregate(stacked_b, stacked_a, selected_rank=stacked_a.shape[0], client_products=products)

    def broadcast_rank(self, client_ranks: Sequence[int], selected_rank: int) -> int:
        return sum(client_ranks)
