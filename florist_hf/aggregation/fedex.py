"""FedEx-LoRA: FedIT's averaged factors, made exact by the residual of the average of products
(arXiv 2410.09432): Σ p_k s_k B_k A_k − B̄·Ā goes into the frozen base, and clients continue (B̄, Ā)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from florist_hf.aggregation import sketch
from florist_hf.aggregation.base import FACTOR_SUMS, SKETCH_SUMS, AggregationMethod, register_method
from florist_hf.aggregation.fedit import FedIT
from florist_hf.aggregation.linalg import sum_of_updates
from florist_hf.aggregation.types import ClientModule, ModuleAggregate


@register_method
class FedExLoRA(AggregationMethod):
    """The round's global update Σ p_k s_k B_k A_k written as one adapter: its first r components
    are FedIT's averages (B̄ = Σ p_k s_k pad(B_k), Ā = Σ p_k pad(A_k)), which the clients continue;
    the rest is the residual Σ p_k s_k B_k A_k − B̄·Ā, re-factorised exactly at its numerical rank
    (≤ Σ r_k + r), which joins the frozen base. The authors' code sends the residual as a dense
    m×n matrix; here it travels and is held as those factors: the same update, fewer bytes.
    """

    name = "fedex"
    exact = True
    #: The residual part of each round's global joins the clients' frozen global state.
    holds_residual = True
    #: FedIT's averages, and ΔW for the residual ΔW − B̄·Ā.
    needs = frozenset({FACTOR_SUMS, SKETCH_SUMS})

    @classmethod
    def refusal(cls, client_ranks: Sequence[int], samples_every_client: bool) -> str | None:
        if len(set(client_ranks)) > 1:
            return ("fedex keeps the global model exact only when every client continues the same averaged "
                    f"factors: give every client one rank (lora.ranks: {list(client_ranks)})")
        if not samples_every_client:
            return ("fedex with federation.clients_per_round is not supported yet (a client that sat out would "
                    "need the residuals it missed); sample every client, or use florist or flora")
        return None

    def aggregate_module(self, clients: Sequence[ClientModule], client_weights: torch.Tensor,
                         result_dtype: torch.dtype | None = None) -> ModuleAggregate:
        averages = FedIT().aggregate_module(clients, client_weights)
        max_rank, mean_b, mean_a = averages.selected_rank, averages.lora_b, averages.lora_a
        parts = [ClientModule(lora_a=c.lora_a, lora_b=c.lora_b, scale=w * c.scale) for w, c in zip(client_weights.tolist(), clients)]
        residual = sum_of_updates([*parts, ClientModule(lora_a=mean_a, lora_b=mean_b, scale=-1.0)])
        return ModuleAggregate(
            torch.cat([mean_b, residual.lora_b], dim=1), torch.cat([mean_a, residual.lora_a]),
            selected_rank=max_rank + residual.selected_rank, continued_rank=max_rank,
        )

    def from_sketch(self, update: sketch.SketchedUpdate, client_ranks: Sequence[int],
                    summed: ClientModule | None = None, result_dtype: torch.dtype | None = None) -> ModuleAggregate:
        return sketch.fedex_from_sketch(update, summed.lora_b, summed.lora_a)
