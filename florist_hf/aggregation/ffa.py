"""FFA-LoRA: A is random, frozen and shared; only B is trained and averaged, which is exact."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from florist_hf.aggregation.base import FACTOR_SUMS, AggregationMethod, register_method
from florist_hf.aggregation.bounding import robust_combine
from florist_hf.aggregation.fedit import robust_needs, robust_options
from florist_hf.aggregation.linalg import COMPUTE_DTYPE, padded_weighted_sum
from florist_hf.aggregation.types import ClientModule, ModuleAggregate


class SharedAMismatch(ValueError):
    """Clients did not start from the same frozen A (a different seed or a trained A)."""

    def __init__(self, client_index: int):
        super().__init__(
            f"client {client_index}'s lora_A differs from the shared frozen A: FFA-LoRA needs every client "
            "to freeze the same random A (same seed; heterogeneous ranks use its first r_k rows)"
        )
        self.client_index = client_index


def check_shared_a(clients: Sequence[ClientModule], tolerance: float) -> torch.Tensor:
    """The shared frozen A (the largest client's), after checking that every client's A is its
    first r_k rows; raises `SharedAMismatch` naming the first client whose A differs."""
    max_rank = max(c.rank for c in clients)
    shared_a = next(c for c in clients if c.rank == max_rank).lora_a
    for index, client in enumerate(clients):
        prefix = shared_a[: client.rank]
        # Compared in the clients' own dtype (no fp64 copies): the difference of near-equal floats is exact.
        common = torch.promote_types(client.lora_a.dtype, prefix.dtype)
        difference = float((client.lora_a.to(common) - prefix.to(common)).abs().max())
        if not difference <= tolerance * max(1.0, float(prefix.abs().max())):
            raise SharedAMismatch(index)
    return shared_a


@register_method
class FFALoRA(AggregationMethod):
    """Every client uses the first r_k rows of one frozen A of the largest rank, so
    Σ p_k s_k B_k A_k = (Σ p_k s_k pad(B_k)) A exactly (the FFA-LoRA paper's form)."""

    name = "ffa"
    exact = True
    averages_factors = True
    b_only = True
    freezes_lora_a = True
    #: Σ p_k·s_k·B_k (the shared A is the server's own).
    needs = frozenset({FACTOR_SUMS})
    central_dp_on = FACTOR_SUMS
    settings = {"robust": "robust", "trim_fraction": "trim_fraction"}

    def __init__(self, shared_a_tolerance: float = 1e-6, robust: str | None = None, trim_fraction: float = 0.1):
        self.shared_a_tolerance = shared_a_tolerance
        #: None (the weighted mean of the B's), "median" or "trimmed_mean" (coordinate-wise, each client alike).
        self.robust = robust
        self.trim_fraction = trim_fraction

    def options(self) -> dict:
        return robust_options(self.robust, self.trim_fraction)

    def client_needs(self) -> frozenset[str]:
        return robust_needs(self.robust, self.needs)

    def aggregate_module(self, clients: Sequence[ClientModule], client_weights: torch.Tensor,
                         result_dtype: torch.dtype | None = None) -> ModuleAggregate:
        max_rank = max(c.rank for c in clients)
        shared_a = check_shared_a(clients, self.shared_a_tolerance).to(COMPUTE_DTYPE)
        if self.robust is not None:
            combined_b = robust_combine([c.scale * c.lora_b.to(COMPUTE_DTYPE) for c in clients], max_rank, 1, self.robust,
                                        self.trim_fraction)
            return ModuleAggregate(combined_b, shared_a, selected_rank=max_rank)
        b_weights = [w * c.scale for w, c in zip(client_weights.tolist(), clients)]
        mean_b = padded_weighted_sum([c.lora_b for c in clients], b_weights, max_rank, dim=1)
        return ModuleAggregate(mean_b, shared_a, selected_rank=max_rank)

    def broadcast_rank(self, client_ranks: Sequence[int], selected_rank: int) -> int:
        return max(client_ranks)
