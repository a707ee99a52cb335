"""Shared decompositions: the thin SVD of a product of stacked factors, and energy thresholding."""

from __future__ import annotations

import torch

#: Every decomposition runs in this precision, whatever the adapters' dtype (bf16 included).
COMPUTE_DTYPE = torch.float64


def stack_weighted_factors(clients, client_weights) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack effective client factors so that ``stacked_b @ stacked_a = sum_k p_k s_k B_k A_k``.

    The client scale s_k goes into its B block and the data weight p_k into its A block (SPEC §2.1).
    """
    # One fp64 buffer per stack, filled in place: the per-client casts, products and the cat each
    # allocated a new stack-sized tensor, a quarter of FLoRIST's time at Llama-7B shapes.
    ranks = [c.rank for c in clients]
    (m, n), total_rank = clients[0].shape, sum(ranks)
    stacked_b = torch.empty(m, total_rank, dtype=COMPUTE_DTYPE)
    stacked_a = torch.empty(total_rank, n, dtype=COMPUTE_DTYPE)
    for client, b_block, a_block in zip(clients, stacked_b.split(ranks, dim=1), stacked_a.split(ranks, dim=0)):
        b_block.copy_(client.lora_b)
        a_block.copy_(client.lora_a)
    # Scales multiply in fp64, after the cast, as before.
    stacked_b.mul_(torch.tensor([c.scale for c in clients], dtype=COMPUTE_DTYPE).repeat_interleave(torch.tensor(ranks)))
    stacked_a.mul_(torch.as_tensor(client_weights, dtype=COMPUTE_DTYPE).repeat_interleave(torch.tensor(ranks))[:, None])
    return stacked_b, stacked_a


def product_svd(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``left @ right`` (m×R times R×n) without forming the m×n product.

    QR of each factor separately, then an SVD of the small core R_B R_Aᵀ: cost O((m+n)R² + R³).
    Householder QR is backward stable for rank-deficient stacks (a client whose B is still zero,
    duplicated clients, R > m), so no special case is needed. Returns (U, sigma, Vh) with
    ``left @ right == U @ diag(sigma) @ Vh``.
    """
    q_left, r_left = torch.linalg.qr(left, mode="reduced")  # m×k1, k1×R
    q_right, r_right = torch.linalg.qr(right.T, mode="reduced")  # n×k2, k2×R
    core = r_left @ r_right.T  # k1×k2, k ≤ R
    core_u, sigma, core_vh = torch.linalg.svd(core, full_matrices=False)
    return q_left @ core_u, sigma, core_vh @ q_right.T


#: A stack's Gram matrix is trusted while the stack's condition number is at most 1e4 (smallest
#: eigenvalue ≥ 1e-8 × largest): the basis it gives is orthonormal to eps·κ² ≤ 2e-8, below fp32
#: resolution. Rank-deficient or worse-conditioned stacks take the Householder path.
GRAM_MIN_EIGENVALUE_RATIO = 1e-8


def _gram_basis(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``factor`` (m×R) = Q·(S Vᵀ) with Q = factor·(V S⁻¹) orthonormal, from the R×R Gram matrix only.

    Returns (S Vᵀ, V S⁻¹), or None when the Gram matrix is too ill-conditioned to trust.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(factor.T @ factor)
    if not bool(eigenvalues[0] > eigenvalues[-1] * GRAM_MIN_EIGENVALUE_RATIO):
        return None
    singular_values = eigenvalues.sqrt()
    return singular_values[:, None] * eigenvectors.T, eigenvectors / singular_values


def truncated_product_svd(
    left: torch.Tensor, right: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(B_g, A_g, sigma, rank): ``left @ right`` truncated at the rank ``select_rank`` picks.

    Same result as ``product_svd`` + ``select_rank`` + ``truncate``, cheaper: the orthonormal bases
    come from the R×R Gram matrices (GEMMs and one small eigh, no Householder QR), and only the
    ``rank`` kept columns of Q·U are ever formed.
    """
    shape = (left.shape[0], right.shape[1])
    left_basis, right_basis = _gram_basis(left), _gram_basis(right.T)
    if left_basis is None or right_basis is None:  # rank-deficient stack (zero or duplicated clients, R > m)
        u, sigma, vh = product_svd(left, right)
        rank = select_rank(sigma, threshold, shape)
        lora_b, lora_a = truncate(u, sigma, vh, rank)
        return lora_b, lora_a.clone(), sigma, rank  # clone: do not keep all of vh alive
    (r_left, to_q_left), (r_right, to_q_right) = left_basis, right_basis
    core_u, sigma, core_vh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    rank = select_rank(sigma, threshold, shape)  # full column rank here, so rank ≤ sigma.numel()
    lora_b = left @ (to_q_left @ (core_u[:, :rank] * sigma[:rank]))
    lora_a = (to_q_right @ core_vh[:rank].T).T @ right  # = (Q_A V)[:, :rank]ᵀ, already row-major
    return lora_b, lora_a, sigma, rank


def numerical_rank(sigma: torch.Tensor, shape: tuple[int, int]) -> int:
    """Count of singular values above round-off (the tolerance numpy's matrix_rank uses)."""
    if sigma.numel() == 0 or float(sigma[0]) == 0.0:
        return 0
    tolerance = float(sigma[0]) * max(shape) * torch.finfo(sigma.dtype).eps
    return int((sigma > tolerance).sum())


def energy(sigma: torch.Tensor) -> torch.Tensor:
    """E(j) = sum_{i<=j} sigma_i² / sum_i sigma_i²: the share of the update kept at rank j."""
    squared = sigma.to(COMPUTE_DTYPE) ** 2
    total = squared.sum()
    if total == 0:
        return torch.ones_like(squared)
    return torch.cumsum(squared, dim=0) / total


def select_rank(sigma: torch.Tensor, threshold: float, shape: tuple[int, int]) -> int:
    """The smallest rank whose singular-value energy reaches ``threshold`` (SPEC §2.4).

    Never more than the numerical rank (components below round-off carry no energy), never less
    than it at threshold 1 (round-off can push the last partial sum a hair below 1), and at least
    1 so that an all-zero update still yields a loadable rank-1 adapter of zeros.
    """
    rank = numerical_rank(sigma, shape)
    if rank == 0:
        return 1
    if threshold >= 1.0:
        return rank
    first_reaching = int(torch.searchsorted(energy(sigma), torch.tensor([threshold], dtype=COMPUTE_DTYPE)))
    return max(1, min(first_reaching + 1, rank))


def truncate(u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors (B, A) with the singular values in B: the best rank-r approximation."""
    kept = min(rank, sigma.numel())
    lora_b = u[:, :kept] * sigma[:kept]
    lora_a = vh[:kept]
    if kept < rank:  # more rank asked for than exists: pad with zero components
        lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], rank - kept)], dim=1)
        lora_a = torch.cat([lora_a, lora_a.new_zeros(rank - kept, lora_a.shape[1])], dim=0)
    return lora_b, lora_a


def zero_pad_rank(tensor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Pad a factor with zeros along its rank dimension up to ``rank`` (heterogeneous clients)."""
    missing = rank - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad_shape = list(tensor.shape)
    pad_shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
