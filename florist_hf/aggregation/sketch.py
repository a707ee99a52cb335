"""FLoRIST, FlexLoRA and FedEx-LoRA from two sums of client sketches, so a server that learns only sums
(secure aggregation) still aggregates them exactly: the two-stage sketch of FedASK (arXiv 2507.09990).

For one module the round's update is ΔW = Σ_k w_k·B_k·A_k with w_k = p_k·s_k (aggregation weight times
PEFT scale), of rank at most R = Σ r_k. With a public Gaussian Ω (n×p) drawn from a seed:

1. each client sends Y_k = w_k·B_k·(A_k·Ω) (m×p); the server learns Y = ΣY_k = ΔW·Ω and takes
   Q = orth(Y), whose span is ΔW's column space when p ≥ rank(ΔW) (Ω is generic);
2. each client sends Z_k = w_k·(Qᵀ·B_k)·A_k (p×n); the server learns Z = Qᵀ·ΔW, so ΔW = Q·Z and
   SVD(Z) = U_z·Σ·Vᵀ gives ΔW = (Q·U_z)·Σ·Vᵀ: FLoRIST's spectrum and τ-selected rank, FlexLoRA's SVD,
   and FedEx-LoRA's residual Q·Z − B̄·Ā.

The default p is that bound plus a few columns (``OVERSAMPLING``), which keeps the secure sums'
round-off from being amplified. With p < rank(ΔW) the update is replaced by its projection QQᵀΔW; the error is estimated from the sum
of a third, independent sketch ΔW·Ω' (Halko, Martinsson and Tropp 2011, §4.3): E‖(I−QQᵀ)ΔW·Ω'‖²_F =
q·‖(I−QQᵀ)ΔW‖²_F for q Gaussian columns. Pure math: no I/O, fp64 throughout.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from florist_hf.aggregation.linalg import COMPUTE_DTYPE, blas_matmul, sum_of_updates, truncate, truncated_product_svd
from florist_hf.aggregation.types import ClientModule, ModuleAggregate

#: Columns of the error-check sketch, sent only when the sketch is narrower than the update's rank bound.
ERROR_CHECK_COLUMNS = 8
#: t in the noise's spectral edge std·(√p + √n + t) (`SketchedUpdate.noise_floor`): pure noise reaches
#: above it with probability exp(−t²/2) = 1e-6 at most.
NOISE_EDGE_MARGIN = math.sqrt(2 * math.log(1e6))
#: Columns beyond the rank bound in the default sketch. At exactly p = rank(ΔW), VᵀΩ is a square
#: Gaussian matrix, whose smallest singular value is ~1/√p: noise in the summed Y (a secure sum's
#: fixed-point round-off) then reaches the update amplified by its inverse. Eight more columns make
#: VᵀΩ well conditioned (Halko, Martinsson and Tropp §4.2): on real SmolLM2 client adapters at 32
#: fractional bits the secure update's largest relative error fell from 1.2e-5 to 5.5e-7.
OVERSAMPLING = 8


def rank_bound(client_ranks: Sequence[int], shape: tuple[int, int]) -> int:
    """ΔW's rank is at most min(Σ r_k, m, n): a sketch at least this wide is exact."""
    return min(sum(client_ranks), *shape)


def default_columns(client_ranks: Sequence[int], shape: tuple[int, int]) -> int:
    """The rank bound plus ``OVERSAMPLING`` columns, at most min(m, n)."""
    return min(rank_bound(client_ranks, shape) + OVERSAMPLING, *shape)


def participation_free_columns(client_ranks: Sequence[int], participants: int) -> int:
    """A sketch width that does not depend on which clients take part in a round, yet is exact for
    any ``participants`` of them: the sum of the ``participants`` largest of the federation's
    ``client_ranks`` plus ``OVERSAMPLING`` (plan_modules caps it at min(m, n)). Central DP needs it:
    a width read off the round's own clients would tell whose ranks were in the round."""
    return sum(sorted(client_ranks, reverse=True)[:participants]) + OVERSAMPLING


def _stream(seed: int, module_name: str, purpose: str) -> np.random.Generator:
    # numpy's PCG64 through a SeedSequence keyed by a hash of the module name and the purpose: one
    # stream per (seed, module, purpose), whatever order the modules are worked on in.
    digest = hashlib.sha256(f"{module_name}\0{purpose}".encode()).digest()
    key = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *key])))


def sketch_matrix(n: int, columns: int, seed: int, module_name: str, purpose: str = "range",
                  orthonormal: bool = False) -> torch.Tensor:
    """The public Gaussian Ω (n×columns) every client and the server derive from the round's seed.

    One stream per (seed, module, purpose), so that clients in other processes, in any module order,
    draw the same Ω. ``orthonormal``: Ω's columns orthonormalised (the Q of its QR, columns ≤ n): the
    same span, so the same range and the same basis Q, and ‖Ω‖₂ = 1, so that no client's sketch is
    longer than its update, ‖ΔW_k·Ω‖_F ≤ ‖ΔW_k‖_F (the sensitivity central DP's noise is calibrated to).
    The Gaussian draws are the same bits everywhere; the QR's last bits may differ between machines'
    LAPACKs (~1e-16 relative, far below the secure sums' 2^-32 rounding; each client's Ω is orthonormal
    either way, which is what the bound reads).
    """
    if columns < 1:
        raise ValueError(f"a sketch needs at least one column, got {columns}")
    omega = torch.from_numpy(_stream(seed, module_name, purpose).standard_normal((n, columns)))
    return torch.linalg.qr(omega).Q if orthonormal else omega


def gaussian_noise(shape: tuple[int, ...], std: float, seed: int, module_name: str, purpose: str) -> torch.Tensor:
    """N(0, std²) entries (fp64), drawn from the stream of (``seed``, module, purpose): the same draws
    whatever order, or thread, the modules are noised in (central DP's, from its secret seed)."""
    return torch.from_numpy(_stream(seed, module_name, f"noise\0{purpose}").standard_normal(shape)).mul_(std)


def _effective(client: ClientModule, weight: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    return client.lora_b.to(COMPUTE_DTYPE), client.lora_a.to(COMPUTE_DTYPE), float(weight) * client.scale


def range_sketch(client: ClientModule, weight: float, omega: torch.Tensor) -> torch.Tensor:
    """Stage 1, on the client: Y_k = p_k·s_k·B_k·(A_k·Ω), m×p, never forming B_k·A_k."""
    lora_b, lora_a, scale = _effective(client, weight)
    return lora_b @ (scale * (lora_a @ omega.to(COMPUTE_DTYPE)))


@dataclass(frozen=True)
class RangeBasis:
    """Q (m×p, orthonormal columns) as the p Householder reflectors of a QR, never formed (forming
    it costs more than the QR): Qᵀ·X applies them by LAPACK's ormqr, Q·X by their compact WY form.
    What the server broadcasts and each client applies.

    ``reflectors`` is geqrf's output with R cleared: below the diagonal each reflector's tail (its
    head, 1, is implicit), zeros on and above it, so nothing but Q travels (R holds the summed
    sketch's norms); ``tau`` their scalars. Q = H_1·…·H_p applied to the first p columns of I_m.
    """

    reflectors: torch.Tensor  # m×p, fp64
    tau: torch.Tensor  # p, fp64

    #: Both travel in fp64 (Q must stay orthonormal).
    BYTES_PER_VALUE = 8
    #: ``apply`` takes ormqr for an x of at most columns / ORMQR_WIDTH columns, the WY form above.
    ORMQR_WIDTH = 4

    @staticmethod
    def values(rows: int, columns: int) -> int:
        """The values a basis of an m×p sketch travels as: the m×p reflectors and the p scalars τ."""
        return (rows + 1) * columns

    @property
    def shape(self) -> tuple[int, int]:
        return (self.reflectors.shape[0], self.reflectors.shape[1])

    @property
    def columns(self) -> int:
        return self.reflectors.shape[1]

    def apply(self, x: torch.Tensor, dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
        """Q·x for x p×k: m×k (row-major), by the compact WY form of the reflectors, or for a narrow x
        by LAPACK's ormqr; computed in ``dtype`` (fp32 for a factor kept in 16 bits, as FLoRIST's
        last products are: `linalg.product_dtype`).

        Q_full = H_1·…·H_p = I − V·T·Vᵀ with V = [unit lower triangle; tails] (m×p) and T upper
        triangular, T⁻¹ = striu(VᵀV) + diag(1/τ) (Puglisi 1992; Joffrain et al., TOMS 2006). On
        [x; 0] only V's top p×p block meets x: Q·x = [x; 0] − V·(T·(V₁ᵀ·x)), one SYRK for VᵀV (m·p²,
        whatever k) and one GEMM. ormqr's blocked sweep costs about 4·m·p·k instead, less when x has
        at most p/4 columns (``ORMQR_WIDTH``; at Llama-7B's 4096×160 basis and 26 columns, 2.2 ms
        against 3.2; at 81 columns, 5.8 against 4.8). A reflector whose τ is 0, the identity, has no
        T⁻¹: then ormqr too."""
        x, tails, tau = x.to(dtype), self.reflectors.to(dtype), self.tau.to(dtype)  # the casts keep ormqr's layout
        columns = self.columns
        if self.ORMQR_WIDTH * x.shape[1] <= columns or not bool((tau > 0).all()):
            padded = x.new_zeros((self.shape[0], x.shape[1]))
            padded[:columns] = x
            return torch.ormqr(tails, tau, padded).contiguous()
        top = tails[:columns]  # V₁ − I: strictly lower
        # VᵀV = LᵀL + L₁ + L₁ᵀ + I for V = L + [I; 0]: its strict upper triangle is striu(LᵀL) + L₁ᵀ.
        t_inverse = torch.triu(blas_matmul(tails.T, tails), 1) + top.T + torch.diag(1.0 / tau)
        core = torch.linalg.solve_triangular(t_inverse, top.T @ x + x, upper=True)  # T·V₁ᵀ·x
        product = blas_matmul(tails, core).neg_()  # −L·core, and −[core; 0] + [x; 0] below
        product[:columns] += x - core
        return product

    def apply_transpose(self, x: torch.Tensor) -> torch.Tensor:
        """Qᵀ·x for x m×k: p×k."""
        return self._rotate(x)[: self.columns]

    def residual_norm(self, x: torch.Tensor) -> float:
        """‖x − Q·Qᵀ·x‖_F, without cancellation: the norm of x's coordinates beyond the first p in
        the full orthogonal H_p·…·H_1 (the complement of Q's span)."""
        return float(self._rotate(x)[self.columns :].norm())

    def dense(self) -> torch.Tensor:
        """Q itself (m×p): for a use that needs it as a matrix (FedEx-LoRA's stack)."""
        return torch.linalg.householder_product(self.reflectors, self.tau)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ormqr(self.reflectors, self.tau, x.to(COMPUTE_DTYPE), transpose=True)


def range_basis(range_sum: torch.Tensor, precision: torch.dtype = COMPUTE_DTYPE) -> RangeBasis:
    """Stage 1, on the server: Q (m×p, orthonormal columns) spanning the summed sketch Y = ΔW·Ω, as
    the reflectors of Y's Householder QR (`RangeBasis`; Q is never formed).

    Householder QR: when Y is rank-deficient (p above ΔW's rank) Q still has orthonormal columns and
    its span contains Y's, so Q·Qᵀ·ΔW = ΔW all the same.

    ``precision``: the QR's (fp32 where the result is kept in 16 bits: `AggregationMethod.sketch_precision`;
    about half fp64's time). Its reflectors v then travel in fp64 with each τ recomputed there as
    2/(vᵀv), so that every H = I − τ·v·vᵀ, and Q, is orthogonal to fp64 precision whatever the QR's
    (the clients' sketches are no longer than their updates, which central DP's bound reads); only how
    closely Q's span holds the update's follows the QR's precision (~1e-7 relative in fp32, far below a
    16-bit factor's 4e-3).
    """
    reflectors, tau = torch.geqrf(range_sum.to(precision))
    reflectors = reflectors.tril_(-1)  # in place, keeping geqrf's column-major layout for ormqr
    if precision == COMPUTE_DTYPE:
        return RangeBasis(reflectors, tau)
    tails = reflectors.to(COMPUTE_DTYPE)  # the cast keeps the layout
    # v = [1; tail]: vᵀv = 1 + ‖tail‖². A τ of 0 (a zero column: H = I) stays 0.
    exact_tau = torch.where(tau > 0, 2.0 / (1.0 + tails.square().sum(0)), torch.zeros((), dtype=COMPUTE_DTYPE))
    return RangeBasis(tails, exact_tau)


def projection_sketch(client: ClientModule, weight: float, basis: RangeBasis) -> torch.Tensor:
    """Stage 2, on the client: Z_k = p_k·s_k·(Qᵀ·B_k)·A_k, p×n."""
    lora_b, lora_a, scale = _effective(client, weight)
    return (scale * basis.apply_transpose(lora_b)) @ lora_a


def sketch_error(basis: RangeBasis, check_sum: torch.Tensor) -> float:
    """Estimated relative Frobenius error ‖ΔW − QQᵀΔW‖/‖ΔW‖ from the summed check sketch ΔW·Ω'.

    Both norms are estimated from the same Ω' (each squared norm unbiased); 0 when ΔW·Ω' is zero.
    """
    check_sum = check_sum.to(COMPUTE_DTYPE)
    total = float(check_sum.norm())
    if total == 0.0:
        return 0.0
    return basis.residual_norm(check_sum) / total


@dataclass
class SketchedUpdate:
    """What the server holds for one module after both secure sums: ΔW ≈ basis·projection (exact
    when the sketch is at least as wide as ΔW's rank), and the estimated error when it may not be."""

    basis: RangeBasis  # Q, m×p
    projection: torch.Tensor  # Z = Qᵀ·ΔW, p×n
    #: Estimated relative error of Q·Z (None: the sketch was wide enough to be exact).
    error: float | None = None
    #: A bound on each summed entry's absolute error (a secure sum's fixed-point round-off; 0 for
    #: plain sums): components of the update below the noise it can make are not counted as rank.
    entry_error: float = 0.0
    #: The std of the Gaussian noise central DP added to each entry of both sums (0: none).
    noise_std: float = 0.0

    def noise_floor(self) -> float:
        """No singular value at or below this is known to be real: ‖Q·E_Z‖₂ ≤ ‖E_Z‖_F ≤ entry_error·√(p·n)
        for the round-off; for central DP's noise, std·(√p + √n + t): the largest singular value of a
        p×n matrix of N(0, std²) entries exceeds it with probability at most exp(−t²/2) (Davidson and
        Szarek), 1e-6 at ``NOISE_EDGE_MARGIN``. Keeping only the components above it is post-processing:
        no privacy is spent."""
        rows, columns = self.projection.shape
        edge = math.sqrt(rows) + math.sqrt(columns) + NOISE_EDGE_MARGIN
        return max(self.entry_error * math.sqrt(rows * columns), self.noise_std * edge)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.basis.shape[0], self.projection.shape[1])

    @property
    def columns(self) -> int:
        return self.basis.columns

    def svd(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, σ, Vh) of Q·Z: one p×n SVD, U = Q·U_z (its first ``rank`` columns only, when given)."""
        core_u, sigma, vh = torch.linalg.svd(self.projection.to(COMPUTE_DTYPE), full_matrices=False)
        return self.basis.apply(core_u[:, :rank]), sigma, vh

    def record(self) -> dict:
        """The sidecar's record of the sketch: its width, and its estimated error where it may not be exact."""
        return {"columns": self.columns, "estimated_relative_error": self.error}


def florist_from_sketch(update: SketchedUpdate, threshold: float, products_in: torch.dtype = COMPUTE_DTYPE
                        ) -> ModuleAggregate:
    """FLoRIST on the sketched update: the smallest rank whose energy reaches τ (``select_rank``);
    ``products_in``: the precision of the last products that form the kept factors (`linalg.product_dtype`)."""
    # ΔW = Q·Z with Q orthonormal: ΔW's singular values are Z's and its left singular vectors Q
    # times Z's. So the stacked FLoRIST's own decomposition (an eigendecomposition of the p×p Z·Zᵀ,
    # Householder where that is not accurate enough) runs on I_p·Z, and Q is applied once, to the
    # kept p×k factor.
    projection, columns = update.projection.to(COMPUTE_DTYPE), update.columns
    core_b, lora_a, sigma, rank, _ = truncated_product_svd(
        torch.eye(columns, dtype=COMPUTE_DTYPE), projection, torch.ones(columns, dtype=COMPUTE_DTYPE), threshold,
        orthonormal_b=True, products_in=products_in)
    floor = update.noise_floor()
    kept = min(rank, _above(sigma, floor))  # the columns come largest first: a prefix is a truncation
    lora_b = update.basis.apply(core_b[:, :kept], products_in)
    if floor > 0 and not float(sigma[0]) > floor:  # nothing above the noise: the update is not known to be
        lora_b.zero_()  # anything, so none is made (a rank-1 adapter of zeros; central DP's noise alone stays out)
    return ModuleAggregate(lora_b, lora_a[:kept].contiguous(), kept, singular_values=sigma)


def _above(sigma: torch.Tensor, floor: float) -> int:
    """How many singular values exceed ``floor`` (at least 1: an adapter needs a component)."""
    return max(1, int((sigma > floor).sum())) if floor > 0 else sigma.numel()


def flexlora_from_sketch(update: SketchedUpdate, client_ranks: Sequence[int], global_rank: int | None = None
                         ) -> ModuleAggregate:
    """FlexLoRA on the sketched update: the global at ``global_rank`` (default the largest client
    rank), each client its own rank's truncation."""
    global_rank = global_rank or max(client_ranks)
    u, sigma, vh = update.svd(max(global_rank, *client_ranks))
    lora_b, lora_a = truncate(u, sigma, vh, global_rank)
    per_client = [tuple(f.clone() for f in truncate(u, sigma, vh, rank)) for rank in client_ranks]
    return ModuleAggregate(lora_b, lora_a.clone(), global_rank, singular_values=sigma[: sum(client_ranks)],
                           client_factors=per_client)


def fedex_from_sketch(update: SketchedUpdate, mean_b: torch.Tensor, mean_a: torch.Tensor) -> ModuleAggregate:
    """FedEx-LoRA from FedIT's summed factors (B̄ = Σ p_k s_k pad(B_k), Ā = Σ p_k pad(A_k)) and the
    sketched update: the clients continue (B̄, Ā); the residual Q·Z − B̄·Ā, re-factorised exactly at
    its numerical rank, joins the frozen base. With secure sums (``update.entry_error`` > 0, the same
    bound on B̄'s and Ā's entries) components below the noise the round-off can make are left out."""
    mean_b, mean_a = mean_b.to(COMPUTE_DTYPE), mean_a.to(COMPUTE_DTYPE)
    residual = sum_of_updates([
        ClientModule(lora_a=update.projection.to(COMPUTE_DTYPE), lora_b=update.basis.dense(), scale=1.0),
        ClientModule(lora_a=mean_a, lora_b=mean_b, scale=-1.0),
    ])
    residual_b, residual_a, residual_rank = residual.lora_b, residual.lora_a, residual.selected_rank
    if update.entry_error > 0:
        # ‖B̃Ã − B̄Ā‖₂ ≤ ‖E_B‖_F‖Ā‖₂ + ‖B̄‖₂‖E_A‖_F + ‖E_B‖_F‖E_A‖_F, each ‖E‖_F ≤ entry_error·√(entries).
        error_b, error_a = update.entry_error * math.sqrt(mean_b.numel()), update.entry_error * math.sqrt(mean_a.numel())
        floor = (update.noise_floor() + error_b * float(torch.linalg.matrix_norm(mean_a, ord=2))
                 + float(torch.linalg.matrix_norm(mean_b, ord=2)) * error_a + error_b * error_a)
        residual_rank = min(residual_rank, _above(residual.singular_values, floor))
        residual_b, residual_a = residual_b[:, :residual_rank], residual_a[:residual_rank]
    continued = mean_a.shape[0]
    return ModuleAggregate(
        torch.cat([mean_b, residual_b], dim=1), torch.cat([mean_a, residual_a]),
        selected_rank=continued + residual_rank, continued_rank=continued,
    )


def sketched_update(clients: Sequence[ClientModule], client_weights: Sequence[float], seed: int, module_name: str,
                    columns: int | None = None) -> SketchedUpdate:
    """Both stages with plain sums (no protocol): the reference the secure path must reproduce, and
    what a test or a planner uses. ``client_weights`` are the normalised p_k."""
    ranks = [c.rank for c in clients]
    (m, n), exact_columns = clients[0].shape, rank_bound(ranks, clients[0].shape)
    columns = columns or default_columns(ranks, clients[0].shape)
    omega = sketch_matrix(n, columns, seed, module_name)
    basis = range_basis(sum(range_sketch(c, w, omega) for c, w in zip(clients, client_weights)))
    projection = sum(projection_sketch(c, w, basis) for c, w in zip(clients, client_weights))
    error = None
    if columns < exact_columns:
        check = sketch_matrix(n, ERROR_CHECK_COLUMNS, seed, module_name, purpose="error")
        error = sketch_error(basis, sum(range_sketch(c, w, check) for c, w in zip(clients, client_weights)))
    return SketchedUpdate(basis, projection, error)
