"""The cumulative global update of a merge-style federation (FLoRIST, FLoRA), held compactly.

After round T the global model is base + Σ_{t≤T} s_t·B_t·A_t. Holding the T rounds' factors side
by side costs rank Σ r_t, which grows with every round. Instead the sum is re-factorised exactly
after each round into one factor pair whose B is orthonormal (rank: the dimension of the updates'
column space, never above min(m, n)), and a module whose rank reaches the break-even
r·(m + n) ≥ m·n is held as a dense m×n delta: memory and forward cost per module are bounded by
min(low-rank, dense), whatever the round count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from florist_hf.aggregation.linalg import COMPUTE_DTYPE, numerical_rank, product_svd, select_rank, truncate
from florist_hf.aggregation.types import ClientModule


@dataclass(frozen=True)
class HeldUpdate:
    """One module's cumulative update: ``lora_b @ lora_a`` (low-rank) or ``dense`` (m×n), unscaled."""

    shape: tuple[int, int]
    lora_b: torch.Tensor | None = None  # (m, r)
    lora_a: torch.Tensor | None = None  # (r, n)
    dense: torch.Tensor | None = None  # (m, n)

    def __post_init__(self):
        if (self.dense is None) == (self.lora_a is None or self.lora_b is None):
            raise ValueError("a held update is either low-rank (lora_b, lora_a) or dense")

    @property
    def is_dense(self) -> bool:
        return self.dense is not None

    @property
    def rank(self) -> int:
        """Its rank as held: the factors' rank, or min(m, n) once dense."""
        return min(self.shape) if self.is_dense else self.lora_a.shape[0]

    @property
    def numel(self) -> int:
        return held_numel(self.shape, self.rank, self.is_dense)

    def as_update(self) -> ClientModule:
        """The low-rank form as a stacked-decomposition input (scale 1)."""
        return ClientModule(lora_a=self.lora_a, lora_b=self.lora_b, scale=1.0)

    def to(self, dtype: torch.dtype) -> HeldUpdate:
        if self.is_dense:
            return HeldUpdate(self.shape, dense=self.dense.to(dtype))
        return HeldUpdate(self.shape, lora_b=self.lora_b.to(dtype), lora_a=self.lora_a.to(dtype))

    def delta_weight(self) -> torch.Tensor:
        """The dense m×n update in fp64, a new tensor (tests, export and small modules)."""
        if self.is_dense:
            return self.dense.to(COMPUTE_DTYPE, copy=True)
        return self.lora_b.to(COMPUTE_DTYPE) @ self.lora_a.to(COMPUTE_DTYPE)


def held_numel(shape: tuple[int, int], rank: int, dense: bool) -> int:
    """Numbers a held update holds: r·(m + n), or m·n once dense."""
    m, n = shape
    return m * n if dense else rank * (m + n)


def dense_is_smaller(rank: int, shape: tuple[int, int]) -> bool:
    """The break-even: rank r costs r·(m + n) numbers, a dense delta m·n."""
    m, n = shape
    return rank * (m + n) >= m * n


def _dense_sum(held: HeldUpdate | None, updates: Sequence[ClientModule]) -> torch.Tensor:
    total = held.delta_weight() if held is not None else torch.zeros(updates[0].shape, dtype=COMPUTE_DTYPE)
    for update in updates:
        # Scale on the small factor, product in fp64: the dense sum is exact to fp64 round-off.
        total.addmm_(update.lora_b.to(COMPUTE_DTYPE) * update.scale, update.lora_a.to(COMPUTE_DTYPE))
    return total


def _extend_basis(basis: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(D, Q, R) with ``columns = basis·D + Q·R``, Q orthonormal and orthogonal to ``basis``
    (orthonormal, m×R), holding only the components of ``columns`` outside it (fp64).

    Projected twice (classical Gram-Schmidt is stable with one re-orthogonalisation); the residual's
    own thin SVD keeps the components above fp64 round-off of the columns' scale.
    """
    coefficients = basis.T @ columns
    residual = columns - basis @ coefficients
    again = basis.T @ residual
    residual -= basis @ again
    coefficients += again
    u, sigma, vh = torch.linalg.svd(residual, full_matrices=False)
    scale = float(torch.linalg.matrix_norm(columns, ord=2)) if columns.numel() else 0.0
    keep = sigma > max(columns.shape) * torch.finfo(COMPUTE_DTYPE).eps * scale
    return coefficients, u[:, keep], sigma[keep, None] * vh[keep]


def accumulate(held: HeldUpdate | None, updates: Sequence[ClientModule]) -> HeldUpdate:
    """``held`` + Σ s_k·B_k·A_k, exact, in the smaller of the two forms (fp64).

    Low-rank, the held update is B·A with B's columns orthonormal: the updates' B columns are
    split into their parts inside B's span and outside it, B grows by an orthonormal basis of the
    parts outside (``_extend_basis``), and A takes both parts' products with the updates' A:
    B·A + Bs·As = [B, Q]·[A + D·As; R·As]. That costs O((m + n)·R·r) per round for rank R held and
    r added, instead of a decomposition of the whole sum. Where some added columns fall inside B's
    span (they may cancel what is held) or the rank reaches the break-even, the exact numerical
    rank is taken (an SVD of A: cancelled components leave), and the update goes dense where it is
    still not smaller low-rank. A held dense delta just adds the products.
    """
    if not updates:
        if held is None:
            raise ValueError("nothing to accumulate")
        return held
    shape = updates[0].shape
    if any(update.shape != shape for update in updates) or (held is not None and held.shape != shape):
        raise ValueError(f"updates of different shapes: {sorted({u.shape for u in updates} | ({held.shape} if held else set()))}")
    if held is not None and held.is_dense:
        return HeldUpdate(shape, dense=_dense_sum(held, updates))
    m, n = shape
    stacked_b = torch.cat([update.lora_b.to(COMPUTE_DTYPE) * update.scale for update in updates], dim=1)
    stacked_a = torch.cat([update.lora_a.to(COMPUTE_DTYPE) for update in updates])
    basis = held.lora_b.to(COMPUTE_DTYPE) if held is not None else torch.zeros(m, 0, dtype=COMPUTE_DTYPE)
    lora_a = held.lora_a.to(COMPUTE_DTYPE) if held is not None else torch.zeros(0, n, dtype=COMPUTE_DTYPE)
    inside, outside, outside_coefficients = _extend_basis(basis, stacked_b)
    lora_b = torch.cat([basis, outside], dim=1)
    lora_a = torch.cat([lora_a + inside @ stacked_a, outside_coefficients @ stacked_a])
    grew_fully = outside.shape[1] == stacked_b.shape[1]
    if grew_fully and not dense_is_smaller(lora_b.shape[1], shape):
        return HeldUpdate(shape, lora_b=lora_b, lora_a=lora_a)
    # Columns inside B's span (which may cancel held components) or the break-even: the exact
    # numerical rank, from A's SVD (B is orthonormal, so ΔW's singular values are A's).
    u, sigma, vh = torch.linalg.svd(lora_a, full_matrices=False)
    rank = numerical_rank(sigma, shape)
    if dense_is_smaller(rank, shape):
        return HeldUpdate(shape, dense=lora_b @ lora_a)
    return HeldUpdate(shape, lora_b=lora_b @ u[:, :rank], lora_a=sigma[:rank, None] * vh[:rank])


@dataclass
class PublishedFactors:
    """A held update as PEFT factors (scale 1): the exact one at threshold 1, or truncated."""

    lora_b: torch.Tensor
    lora_a: torch.Tensor
    singular_values: torch.Tensor
    rank: int
    energy_kept: float
    #: The update's exact (numerical) rank, whatever was kept.
    exact_rank: int


def published_factors(held: HeldUpdate, threshold: float = 1.0) -> PublishedFactors:
    """The cumulative update's SVD kept at the smallest rank whose energy reaches ``threshold``
    (FLoRIST's rule applied to the whole federation's update; 1: exact, at its numerical rank)."""
    if held.is_dense:
        u, sigma, vh = torch.linalg.svd(held.dense.to(COMPUTE_DTYPE), full_matrices=False)
    else:
        u, sigma, vh = product_svd(held.lora_b.to(COMPUTE_DTYPE), held.lora_a.to(COMPUTE_DTYPE))
    # Each component's sign fixed (the largest entry of its right vector positive), so that two
    # runs whose states differ by round-off publish the same factors, not the same update with
    # some components negated.
    signs = torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True))).squeeze(1)
    signs[signs == 0] = 1
    u, vh = u * signs, vh * signs[:, None]
    exact = select_rank(sigma, 1.0, held.shape)
    rank = select_rank(sigma, threshold, held.shape)
    lora_b, lora_a = truncate(u, sigma, vh, rank)
    squared = sigma.to(COMPUTE_DTYPE) ** 2
    total = float(squared.sum())
    kept = float(squared[:rank].sum()) / total if total > 0 else 1.0
    return PublishedFactors(lora_b, lora_a.clone(), sigma, rank, min(kept, 1.0), exact)


def add_held(held: HeldUpdate, other: HeldUpdate) -> HeldUpdate:
    """Two held updates summed, exactly, in the smaller form (as `accumulate`)."""
    if other.is_dense:
        if held.shape != other.shape:
            raise ValueError(f"updates of different shapes: {held.shape}, {other.shape}")
        return HeldUpdate(held.shape, dense=held.delta_weight() + other.delta_weight())
    return accumulate(held, [other.as_update()])
