"""Shared decompositions: the thin SVD of a product of stacked factors, and energy thresholding."""

from __future__ import annotations

import torch

#: Every decomposition runs in this precision, whatever the adapters' dtype (bf16 included).
COMPUTE_DTYPE = torch.float64


def stack_weighted_factors(clients, client_weights) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack effective client factors so that ``stacked_b @ stacked_a = sum_k p_k s_k B_k A_k``.

    The client scale s_k goes into its B block and the data weight p_k into its A block (SPEC §2.1).
    """
    stacked_b = torch.cat([c.lora_b.to(COMPUTE_DTYPE) * c.scale for c in clients], dim=1)
    stacked_a = torch.cat([c.lora_a.to(COMPUTE_DTYPE) * float(p) for c, p in zip(clients, client_weights)], dim=0)
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
