"""FedSVD: clients train only B against a shared frozen A; the server averages the B's, and
re-factorises B̄·A by its SVD, so that next round's frozen A is orthonormal (arXiv 2505.12805)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from florist_hf.aggregation.base import FACTOR_SUMS, AggregationMethod, register_method
from florist_hf.aggregation.ffa import check_shared_a
from florist_hf.aggregation.linalg import COMPUTE_DTYPE, padded_weighted_sum, product_svd
from florist_hf.aggregation.types import ClientModule, ModuleAggregate


@register_method
class FedSVD(AggregationMethod):
    """Σ p_k s_k B_k A = B̄·A exactly (every client holds a prefix of one A, as in FFA-LoRA); the
    global update is then written as U·Σ (the new B) times Vᵀ (the new A, orthonormal rows), its
    thin SVD at the largest client rank. A client of smaller rank continues from the top r_k
    singular components (the same truncation FlexLoRA sends), so with heterogeneous ranks its
    starting point is the best rank-r_k approximation of the global update, not the update itself.

    Differs from the authors' code in one respect: their clients share one rank; here each client
    takes the first r_k rows of the shared A, so ranks may differ (at equal ranks it is the same).
    """

    name = "fedsvd"
    exact = True
    freezes_lora_a = True
    #: Σ p_k·s_k·B_k (the shared A is the server's own).
    needs = frozenset({FACTOR_SUMS})

    def __init__(self, shared_a_tolerance: float = 1e-6):
        self.shared_a_tolerance = shared_a_tolerance

    def aggregate_module(self, clients: Sequence[ClientModule], client_weights: torch.Tensor,
                         result_dtype: torch.dtype | None = None) -> ModuleAggregate:
        shared_a = check_shared_a(clients, self.shared_a_tolerance).to(COMPUTE_DTYPE)
        max_rank = shared_a.shape[0]
        b_weights = [w * c.scale for w, c in zip(client_weights.tolist(), clients)]
        mean_b = padded_weighted_sum([c.lora_b for c in clients], b_weights, max_rank, dim=1)
        u, sigma, vh = product_svd(mean_b, shared_a)
        # The thin SVD keeps min(m, n, r) components; the rank stays the largest client's (a
        # rank-deficient B̄ gives zero singular values, with orthonormal rows of A all the same).
        lora_b, lora_a = u[:, :max_rank] * sigma[:max_rank], vh[:max_rank]
        return ModuleAggregate(lora_b, lora_a.clone(), selected_rank=max_rank, singular_values=sigma)

    def broadcast_rank(self, client_ranks: Sequence[int], selected_rank: int) -> int:
        return max(client_ranks)
