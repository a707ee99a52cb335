"""Shared decompositions: the thin SVD of a product of stacked factors (Cholesky QR and an R×R
eigendecomposition, Householder fallback), and energy thresholding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from florist_hf.aggregation.types import ClientModule, ClientProducts, ModuleAggregate

#: Every decomposition runs in this precision, whatever the adapters' dtype (bf16 included).
COMPUTE_DTYPE = torch.float64


def product_dtype(result_dtype: torch.dtype | None) -> torch.dtype:
    """The precision of the last m×R products that form kept factors stored in ``result_dtype``: fp32 for a
    16-bit float, whose rounding (2^-9 for bf16, 2^-12 for fp16) is over a thousand times fp32's error on
    these products (inner dimension R, a few 1e-7 relative), else the compute precision."""
    return torch.float32 if result_dtype in (torch.bfloat16, torch.float16) else COMPUTE_DTYPE


def _stacked_copies(clients) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """fp64 copies of the client factors, B blocks side by side (m×R) and A blocks stacked (R×n)."""
    # One fp64 buffer per stack, filled in place: no stack-sized temporaries per client.
    ranks = [c.rank for c in clients]
    (m, n), total_rank = clients[0].shape, sum(ranks)
    stacked_b = torch.empty(m, total_rank, dtype=COMPUTE_DTYPE)
    stacked_a = torch.empty(total_rank, n, dtype=COMPUTE_DTYPE)
    for client, b_columns, a_rows in zip(clients, stacked_b.split(ranks, dim=1), stacked_a.split(ranks)):
        b_columns.copy_(client.lora_b)
        a_rows.copy_(client.lora_a)
    return stacked_b, stacked_a, ranks


def stack_weighted_factors(clients, client_weights) -> tuple[torch.Tensor, torch.Tensor, ClientProducts]:
    """Stack effective client factors so that ``stacked_b @ stacked_a = sum_k p_k s_k B_k A_k``, and
    each client's products with that sum (`ClientProducts`, from the stacks' Gram matrices).

    The client scale s_k goes into its B block and the data weight p_k into its A block (SPEC §2.1).
    """
    stacked_b, stacked_a, ranks = _stacked_copies(clients)
    column_b = torch.tensor([c.scale for c in clients], dtype=COMPUTE_DTYPE).repeat_interleave(torch.tensor(ranks))
    row_a = torch.as_tensor(client_weights, dtype=COMPUTE_DTYPE).repeat_interleave(torch.tensor(ranks))
    # The Grams of the unscaled stacks, the scales folded into R×R products: Bᵀ(B·D_s) and (D_p·A)Aᵀ.
    gram_b, gram_a = column_gram(stacked_b), row_gram(stacked_a)
    column_scale = column_b * row_a
    global_squared = float((gram_b * gram_a * (column_scale[:, None] * column_scale[None, :])).sum())
    products = client_products(gram_b, gram_a, gram_b * column_b, row_a[:, None] * gram_a, ranks, global_squared)
    # Scales multiply in fp64, after the cast.
    stacked_b.mul_(column_b)
    stacked_a.mul_(row_a[:, None])
    return stacked_b, stacked_a, products


def client_products(gram_b: torch.Tensor, gram_a: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                    ranks: Sequence[int], global_norm_squared: float) -> ClientProducts:
    """Each client's products with a global update B_g·A_g, read off R×R-sized blocks.

    For unscaled stacks B (m×R, client k's columns a block of r_k) and A (R×n, its rows):
    ``gram_b`` = BᵀB and ``gram_a`` = A·Aᵀ give ‖B_k·A_k‖²_F = Σ (BᵀB)_kk ⊙ (A·Aᵀ)_kk, and
    ``left`` = Bᵀ·B_g (R×p) and ``right`` = A_g·Aᵀ (p×R) give ⟨B_k·A_k, B_g·A_g⟩_F =
    tr((B_kᵀ·B_g)(A_g·A_kᵀ)): O(R²) work once the Grams exist, never an m×n or m×R product.
    """
    norms_squared, inners, start = [], [], 0
    for rank in ranks:
        block = slice(start, start + rank)
        norms_squared.append(float((gram_b[block, block] * gram_a[block, block]).sum()))
        inners.append(float((left[block] * right[:, block].T).sum()))
        start += rank
    return ClientProducts(norms_squared, inners, global_norm_squared)


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


def stack_client_factors(clients, client_weights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stacked_b, stacked_a, column_scale): plain fp64 copies of the client factors, stacked.

    ``stacked_b @ diag(column_scale) @ stacked_a = sum_k p_k s_k B_k A_k``. The scales stay out of
    the big stacks: they are folded into R×R matrices instead, with no extra pass over m×R data.
    """
    stacked_b, stacked_a, ranks = _stacked_copies(clients)
    client_scale = torch.tensor([c.scale for c in clients], dtype=COMPUTE_DTYPE)
    client_scale = client_scale * torch.as_tensor(client_weights, dtype=COMPUTE_DTYPE)
    return stacked_b, stacked_a, client_scale.repeat_interleave(torch.tensor(ranks))


def blas_matmul(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ right`` for the m×R-sized fp64 products, through numpy's BLAS.

    numpy's matmul calls SYRK when ``right`` is ``left`` transposed (same buffer): one triangle of a
    Gram matrix, half a GEMM's work, then mirrored, so the result is exactly symmetric. torch has no
    SYRK. On these skinny shapes (inner dimension R) numpy's GEMM also ran up to ~25 % faster than
    torch's on the development machine. The arrays are views of the tensors: nothing is copied.
    numpy's BLAS threads follow torch's (see ``map_modules``).
    """
    numpy_ready = all(
        t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and not t.requires_grad for t in (left, right)
    )
    if not numpy_ready or left.dtype != right.dtype:
        return left @ right
    return torch.from_numpy(left.numpy() @ right.numpy())


def row_gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows @ rows.T`` (SYRK)."""
    return blas_matmul(rows, rows.T)


def column_gram(columns: torch.Tensor, column_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``(columns·diag(column_scale))ᵀ (columns·diag(column_scale))`` (SYRK), the scale folded into
    the R×R result rather than applied to the m×R columns."""
    gram = blas_matmul(columns.T, columns)
    return gram if column_scale is None else gram * (column_scale[:, None] * column_scale[None, :])


#: A stack is decomposed through its Gram matrix (Cholesky QR) while its condition number is at
#: most this: the implied orthonormal basis then departs from orthonormality by ~eps·κ² ≤ 2e-8,
#: below fp32 resolution. Rank-deficient or worse-conditioned stacks take the Householder path.
MAX_GRAM_CONDITION = 1e4


def _cholesky_basis(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(C, C⁻¹) with ``gram = C Cᵀ`` (C lower triangular), or None when the stack is too ill-conditioned.

    For a stack X with ``gram = XᵀX``: X = Q·Cᵀ with Q = X·C⁻ᵀ orthonormal.
    """
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:  # not numerically positive definite: the stack is rank-deficient
        return None
    chol_inverse = torch.linalg.solve_triangular(chol, torch.eye(gram.shape[0], dtype=gram.dtype), upper=False)
    # ‖C‖_F·‖C⁻¹‖_F bounds the 2-norm condition number κ(C) = κ(X) from above: a cheap, safe test.
    if not float(torch.linalg.matrix_norm(chol) * torch.linalg.matrix_norm(chol_inverse)) <= MAX_GRAM_CONDITION:
        return None
    return chol, chol_inverse


#: The fast path reads ΔW's singular values off an eigendecomposition of an R×R matrix whose
#: eigenvalues are σ² with an absolute error of about R·eps·σ_1². Every kept σ must come out with
#: at most this relative error (below fp32's 6e-8), or the module takes the Householder path.
KEPT_SIGMA_ACCURACY = 1e-8


class TruncatedProduct(NamedTuple):
    """``truncated_product_svd``'s result: the kept factors (singular values in B), every singular
    value, the kept rank, and, when asked for, each client's products with the kept update."""

    lora_b: torch.Tensor
    lora_a: torch.Tensor
    sigma: torch.Tensor
    rank: int
    client_products: ClientProducts | None = None


def truncated_product_svd(
    stacked_b: torch.Tensor, stacked_a: torch.Tensor, column_scale: torch.Tensor, threshold: float,
    missing_energy: float = 0.0, client_ranks: Sequence[int] | None = None, orthonormal_b: bool = False,
    products_in: torch.dtype = COMPUTE_DTYPE,
) -> TruncatedProduct:
    """(B_g, A_g, sigma, rank) for ΔW = stacked_b·diag(column_scale)·stacked_a, truncated at the
    rank ``select_rank`` picks (``missing_energy``: see there); with ``client_ranks`` (the clients'
    blocks of the stacks) also each client's `ClientProducts` with B_g·A_g.

    Same result as ``product_svd`` + ``select_rank`` + ``truncate``, cheaper. The B stack is
    orthogonalised through a Cholesky of its R×R Gram matrix (Cholesky QR: GEMMs and an R×R
    factorisation, no Householder QR over m×R data): B·diag(s) = Q_B·C_Bᵀ, so ΔW = Q_B·(C_Bᵀ A).
    ΔW's left singular vectors are then Q_B times the eigenvectors of the R×R matrix
    K = (C_Bᵀ A)(C_Bᵀ A)ᵀ = C_Bᵀ·(A Aᵀ)·C_B, with eigenvalues σ². A is never factorised, and only
    the ``rank`` kept columns are ever formed. The clients' products come from the same two Grams
    (B_g = B·M_B and A_g = M_A·A, so Bᵀ·B_g = (BᵀB)·M_B and A_g·Aᵀ = M_A·(A Aᵀ)): R×R work.

    ``orthonormal_b``: the caller vouches that stacked_b·diag(column_scale) has orthonormal columns
    (a Householder Q, the sketch's basis): then C_B = I and B's Gram is never formed.

    ``products_in``: the precision of the two m×R products that form the kept factors (``product_dtype``);
    everything before them, and the Householder path, stays in fp64.
    """
    shape = (stacked_b.shape[0], stacked_a.shape[1])
    if orthonormal_b and client_ranks is not None:
        raise ValueError("the clients' products read B's Gram, which an orthonormal B skips")
    if orthonormal_b:
        identity = torch.eye(stacked_b.shape[1], dtype=stacked_b.dtype)
        gram_b, b_basis = None, (identity, identity)
    else:
        gram_b = column_gram(stacked_b)  # unscaled: the scales are folded into the R×R copy below
        b_basis = _cholesky_basis(gram_b * (column_scale[:, None] * column_scale[None, :]))
    gram_a = None
    if b_basis is not None:
        b_chol, b_chol_inverse = b_basis
        gram_a = row_gram(stacked_a)
        eigenvalues, eigenvectors = torch.linalg.eigh(gram_a if orthonormal_b else b_chol.T @ gram_a @ b_chol)
        eigenvalues, core_u = eigenvalues.flip(0), eigenvectors.flip(1)  # largest first
        sigma = eigenvalues.clamp_min(0).sqrt()  # round-off can leave zero eigenvalues slightly negative
        rank = select_rank(sigma, threshold, shape, missing_energy)
        resolved = eigenvalues[0] * eigenvalues.numel() * torch.finfo(eigenvalues.dtype).eps / KEPT_SIGMA_ACCURACY
        if eigenvalues[rank - 1] > 0 and eigenvalues[rank - 1] >= resolved:
            kept_u, kept_sigma = core_u[:, :rank], sigma[:rank]
            # B_g = Q_B U_p Σ_p = B·diag(s)·C_B⁻ᵀ·U_p Σ_p ;  A_g = V_pᵀ = Σ_p⁻¹ U_pᵀ Q_Bᵀ ΔW = Σ_p⁻¹ U_pᵀ C_Bᵀ A.
            b_mix = column_scale[:, None] * (b_chol_inverse.T @ (kept_u * kept_sigma))
            a_mix = (kept_u.T @ b_chol.T) / kept_sigma[:, None]
            lora_b = _product_in(stacked_b, b_mix, products_in, rows=True)
            lora_a = _product_in(stacked_a, a_mix, products_in, rows=False)
            products = None
            if client_ranks is not None:  # ‖B_g·A_g‖² = Σ kept σ²
                products = client_products(gram_b, gram_a, gram_b @ b_mix, a_mix @ gram_a, client_ranks,
                                           float(kept_sigma.square().sum()))
            return TruncatedProduct(lora_b, lora_a, sigma, rank, products)
    # Rank-deficient or ill-conditioned B stack (zero or duplicated clients, R > m), or kept singular
    # values too small for the squared problem to resolve: Householder QR of both stacks.
    u, sigma, vh = product_svd(stacked_b * column_scale, stacked_a)
    rank = select_rank(sigma, threshold, shape, missing_energy)
    lora_b, lora_a = truncate(u, sigma, vh, rank)
    products = None
    if client_ranks is not None:  # the rare path: the m×R products with the kept factors themselves
        gram_a = row_gram(stacked_a) if gram_a is None else gram_a
        products = client_products(gram_b, gram_a, blas_matmul(stacked_b.T, lora_b), blas_matmul(lora_a, stacked_a.T),
                                   client_ranks, float(sigma[:rank].square().sum()))
    return TruncatedProduct(lora_b, lora_a.clone(), sigma, rank, products)  # clone: do not keep all of vh alive


#: Rows (columns) of a stack cast at a time for a product in a narrower precision: no cast copy of a whole stack.
PRODUCT_BLOCK = 512


def _product_in(stack: torch.Tensor, mix: torch.Tensor, dtype: torch.dtype, *, rows: bool) -> torch.Tensor:
    """``stack @ mix`` (``rows``: B stack m×R times R×k) or ``mix @ stack`` (k×R times the A stack R×n) in
    ``dtype``, the stack cast a block of rows (columns) at a time into a buffer of one block."""
    if dtype == stack.dtype:
        return blas_matmul(stack, mix) if rows else blas_matmul(mix, stack)
    mix = mix.to(dtype)
    length = stack.shape[0] if rows else stack.shape[1]
    out = torch.empty((length, mix.shape[1]) if rows else (mix.shape[0], length), dtype=dtype)
    for start in range(0, length, PRODUCT_BLOCK):
        block = slice(start, min(start + PRODUCT_BLOCK, length))
        if rows:
            out[block] = blas_matmul(stack[block].to(dtype), mix)
        else:
            out[:, block] = blas_matmul(mix, stack[:, block].to(dtype))
    return out


def stacked_truncation(clients: Sequence[ClientModule], client_weights: torch.Tensor, threshold: float,
                       products_in: torch.dtype = COMPUTE_DTYPE) -> ModuleAggregate:
    """The τ-truncated SVD of Σ_k w_k·s_k·B_k·A_k from the clients' stacked factors (stacked FLoRIST),
    with each client's `ClientProducts` with it; ``products_in``: see ``truncated_product_svd``."""
    stacked_b, stacked_a, column_scale = stack_client_factors(clients, client_weights)
    kept = truncated_product_svd(stacked_b, stacked_a, column_scale, threshold,
                                 client_ranks=[client.rank for client in clients], products_in=products_in)
    return ModuleAggregate(kept.lora_b, kept.lora_a, kept.rank, singular_values=kept.sigma,
                           client_products=kept.client_products)


def sum_of_updates(updates: Sequence[ClientModule], threshold: float = 1.0) -> ModuleAggregate:
    """Σ_k s_k B_k A_k (no weighting) re-factorised by the same stacked decomposition.

    A merge-style federation publishes the sum of its round updates as one adapter this way:
    exact at threshold 1, with rank at most the sum of the rounds' ranks.
    """
    return stacked_truncation(updates, torch.ones(len(updates), dtype=torch.float64), threshold)


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


def select_rank(sigma: torch.Tensor, threshold: float, shape: tuple[int, int], missing_energy: float = 0.0) -> int:
    """The smallest rank whose singular-value energy reaches ``threshold`` (SPEC §2.4).

    Never more than the numerical rank (components below round-off carry no energy), never less
    than it at threshold 1 (round-off can push the last partial sum a hair below 1), and at least
    1 so that an all-zero update still yields a loadable rank-1 adapter of zeros.

    ``missing_energy``: Σσ² of components that ``sigma`` no longer lists (what a streaming
    tolerance dropped), counted in the total, so that τ is the share of the whole update's energy.
    """
    rank = numerical_rank(sigma, shape)
    if rank == 0:
        return 1
    if threshold >= 1.0:
        return rank
    squared = sigma.to(COMPUTE_DTYPE) ** 2
    target = threshold * (float(squared.sum()) + missing_energy)
    first_reaching = int(torch.searchsorted(torch.cumsum(squared, dim=0), torch.tensor([target], dtype=COMPUTE_DTYPE)))
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


def padded_weighted_sum(factors, weights, rank: int, dim: int) -> torch.Tensor:
    """Σ_k w_k·F_k in fp64, each factor zero-padded along ``dim`` (its rank dimension) to ``rank``.

    Accumulated in place: a factor of rank r_k adds into the first r_k components only, which is the
    zero-padding without materialising padded copies (heterogeneous-rank averaging).
    """
    shape = list(factors[0].shape)
    shape[dim] = rank
    total = torch.zeros(shape, dtype=COMPUTE_DTYPE)
    for factor, weight in zip(factors, weights):
        total.narrow(dim, 0, factor.shape[dim]).add_(factor, alpha=weight)
    return total
