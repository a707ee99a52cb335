"""FlexLoRA: form the dense update, one SVD per module, each client gets its own rank's truncation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from florist_hf.aggregation import sketch
from florist_hf.aggregation.base import SKETCH_SUMS, AggregationMethod, register_method
from florist_hf.aggregation.linalg import COMPUTE_DTYPE, truncate
from florist_hf.aggregation.types import ClientModule, ModuleAggregate


@register_method
class FlexLoRA(AggregationMethod):
    """The dense baseline whose O(mn·min(m, n)) cost FLoRIST avoids.

    The published global adapter is the truncation at ``global_rank`` (default: the largest client
    rank, so in the homogeneous setting it is exactly what every client receives).
    """

    name = "flexlora"
    exact = False
    bounds_updates = False
    #: The SVD of ΔW alone (each client's truncation at its rank, which is public).
    needs = frozenset({SKETCH_SUMS})

    def __init__(self, global_rank: int | None = None):
        self.global_rank = global_rank

    def options(self) -> dict:
        return {"global_rank": self.global_rank}

    def aggregate_module(self, clients: Sequence[ClientModule], client_weights: torch.Tensor,
                         result_dtype: torch.dtype | None = None) -> ModuleAggregate:
        dense_update = sum(
            (float(p) * c.scale) * (c.lora_b.to(COMPUTE_DTYPE) @ c.lora_a.to(COMPUTE_DTYPE))
            for c, p in zip(clients, client_weights)
        )
        u, sigma, vh = torch.linalg.svd(dense_update, full_matrices=False)  # the one SVD this round
        global_rank = self.global_rank or max(c.rank for c in clients)
        lora_b, lora_a = truncate(u, sigma, vh, global_rank)
        per_client = [truncate(u, sigma, vh, c.rank) for c in clients]
        stacked_rank = sum(c.rank for c in clients)  # the update's rank cannot exceed Σ r_k
        return ModuleAggregate(
            lora_b, lora_a, global_rank, singular_values=sigma[:stacked_rank], client_factors=per_client
        )

    def from_sketch(self, update: sketch.SketchedUpdate, client_ranks: Sequence[int],
                    summed: ClientModule | None = None, result_dtype: torch.dtype | None = None) -> ModuleAggregate:
        return sketch.flexlora_from_sketch(update, client_ranks, self.global_rank)

    def broadcast_rank(self, client_ranks: Sequence[int], selected_rank: int) -> int:
        return self.global_rank or max(client_ranks)

    def downlink_rank(self, client_rank: int, client_ranks: Sequence[int], selected_rank: int) -> int:
        return client_rank
