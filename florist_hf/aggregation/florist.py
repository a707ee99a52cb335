"""FLoRIST: exact SVD of the stacked client factors without the dense update, then thresholding."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from florist_hf.aggregation.base import AggregationMethod, register_method
from florist_hf.aggregation.linalg import stack_client_factors, truncated_product_svd
from florist_hf.aggregation.types import ClientModule, ModuleAggregate


@register_method
class Florist(AggregationMethod):
    """Keep, per module, the smallest rank whose singular-value energy reaches ``threshold`` (τ)."""

    name = "florist"
    exact = True  # at τ = 1; below it, the best approximation at the selected rank
    merges_into_base = True

    def __init__(self, threshold: float = 0.9):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = float(threshold)

    def options(self) -> dict:
        return {"threshold": self.threshold}

    def aggregate_module(self, clients: Sequence[ClientModule], client_weights: torch.Tensor) -> ModuleAggregate:
        stacked_b, stacked_a, column_scale = stack_client_factors(clients, client_weights)
        lora_b, lora_a, sigma, selected_rank = truncated_product_svd(stacked_b, stacked_a, column_scale, self.threshold)
        return ModuleAggregate(lora_b, lora_a, selected_rank, singular_values=sigma)


def sum_of_updates(updates: Sequence[ClientModule], threshold: float = 1.0) -> ModuleAggregate:
    """Σ_k s_k B_k A_k (no weighting) re-factorised by the same stacked decomposition.

    A merge-style federation publishes the sum of its round updates as one adapter this way:
    exact at threshold 1, with rank at most the sum of the rounds' ranks.
    """
    return Florist(threshold).aggregate_module(updates, torch.ones(len(updates), dtype=torch.float64))
