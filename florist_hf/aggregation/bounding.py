"""What one client can do to a round, bounded and seen: update norms in factor space, norm
clipping, the Gaussian noise of client-level DP, robust statistics, and the outlier report.

A client's update of one module is s·B·A (m × n); its Frobenius norm and its inner product with
another low-rank update come from the factors alone, ‖BA‖²_F = tr((BᵀB)(AAᵀ)), in O((m + n)·r²),
never the dense m × n matrix. The outlier report takes each module's products with the global
update as the merge-style methods read them off their Gram matrices (`types.ClientProducts`), or,
for factors changed after aggregation, from the factors here. Everything here is pure tensor math
in fp64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from florist_hf.aggregation.linalg import COMPUTE_DTYPE
from florist_hf.aggregation.types import ClientModule, ClientProducts


def low_rank_inner(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """⟨B1·A1, B2·A2⟩_F = tr((B1ᵀB2)(A2·A1ᵀ)), from the factors."""
    b1, a1, b2, a2 = (t.to(COMPUTE_DTYPE) for t in (b1, a1, b2, a2))
    return float(((b1.T @ b2) * (a1 @ a2.T)).sum())


def low_rank_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """‖B·A‖_F from the factors (the Gram products of the two sides)."""
    return math.sqrt(max(low_rank_inner(b, a, b, a), 0.0))


@dataclass(frozen=True)
class ClientBound:
    """One client's update norm over its whole adapter, and the factor (≤ 1) it was scaled by."""

    norm: float
    factor: float

    def record(self) -> dict:
        return {"update_norm": self.norm, "clip_factor": self.factor, "clipped": self.factor < 1.0}


def _factor_delta(client: ClientModule, reference: ClientModule, freezes_lora_a: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The change of a continued client's factors since the global it received, scales folded into B
    (the first r_k components of the reference, as the client was given them)."""
    rank = client.rank
    delta_b = client.scale * client.lora_b.to(COMPUTE_DTYPE) - reference.scale * reference.lora_b[:, :rank].to(COMPUTE_DTYPE)
    delta_a = None if freezes_lora_a else client.lora_a.to(COMPUTE_DTYPE) - reference.lora_a[:rank].to(COMPUTE_DTYPE)
    return delta_b, delta_a


def update_norm(modules: Mapping[str, ClientModule], reference: Mapping[str, ClientModule] | None = None,
                freezes_lora_a: bool = False) -> float:
    """A client's update norm over its whole adapter: √Σ of its modules' squared norms, summed in
    their order (‖s·B·A‖_F for a fresh LoRA, ``reference`` None; else the norm of its factors'
    change since ``reference``, B only where A is frozen)."""
    total = 0.0
    for name, module in modules.items():
        if reference is None:
            total += (module.scale * low_rank_norm(module.lora_b, module.lora_a)) ** 2
        else:
            delta_b, delta_a = _factor_delta(module, reference[name], freezes_lora_a)
            total += float(delta_b.square().sum()) + (0.0 if delta_a is None else float(delta_a.square().sum()))
    return math.sqrt(total)


def bound_client(modules: Mapping[str, ClientModule], clip: float | None, *,
                 reference: Mapping[str, ClientModule] | None = None, freezes_lora_a: bool = False,
                 rescale: float = 1.0) -> tuple[dict[str, ClientModule], ClientBound]:
    """One client's modules with its update scaled to norm ≤ ``clip`` (over the whole adapter, so
    that the bound is on the client's whole contribution, not on each of its modules), then by
    ``rescale`` (central DP's fixed denominator); as given where neither changes it.

    A fresh LoRA's update s·B·A scales with its scale; a continued client's factors become
    reference + c·(factors − reference), c the factor.
    """
    norm = update_norm(modules, reference, freezes_lora_a)
    if not math.isfinite(norm):
        raise ValueError(f"the client's update norm is {norm}: its factors are not finite")
    factor = 1.0 if clip is None or norm <= clip else clip / norm
    bound = ClientBound(norm, factor)
    scaling = factor * rescale
    if scaling == 1.0:
        return dict(modules), bound
    bounded = {}
    for name, module in modules.items():
        if reference is None:
            bounded[name] = ClientModule(module.lora_a, module.lora_b, module.scale * scaling)
            continue
        ref, rank = reference[name], module.rank
        delta_b, delta_a = _factor_delta(module, ref, freezes_lora_a)
        lora_b = (ref.scale * ref.lora_b[:, :rank].to(COMPUTE_DTYPE) + scaling * delta_b) / module.scale
        lora_a = module.lora_a if delta_a is None else ref.lora_a[:rank].to(COMPUTE_DTYPE) + scaling * delta_a
        bounded[name] = ClientModule(lora_a, lora_b, module.scale)
    return bounded, bound


def averaged_ranks_refusal(client_ranks: Sequence[int]) -> str | None:
    """Why central DP's noise on a mean of factors (calibrated to clip/denominator) would not hide one
    client of these LoRA ranks, as one line naming the fix; None when it does. Component j of the
    zero-padded mean is averaged over the clients whose rank exceeds j, so a client of another rank
    joining moves the others' share of the continued factors there, by far more than clip/denominator
    (measured: 0.69 against a bound of 2e-4 for ranks 8, 8, 8, 8 and a client of rank 2)."""
    if len(set(client_ranks)) <= 1:
        return None
    return (f"central_dp on a mean of factors needs one LoRA rank for every client (got {sorted(set(client_ranks))}): a client "
            "of another rank changes how many clients each component is averaged over, which moves the mean by far more "
            "than clip/n; give every client one rank, or use florist with secure_aggregation (its central DP takes any ranks)")


def gaussian_noise_like(tensor: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """``tensor`` plus N(0, std²) on every entry (computed in fp64, returned in its dtype)."""
    noise = torch.randn(tensor.shape, generator=generator, dtype=COMPUTE_DTYPE) * std
    return (tensor.to(COMPUTE_DTYPE) + noise.to(tensor.device)).to(tensor.dtype)


def robust_combine(tensors: Sequence[torch.Tensor], max_rank: int, dim: int, rule: str, trim_fraction: float = 0.1) -> torch.Tensor:
    """The coordinate-wise median or trimmed mean of client factors of ranks r_k along ``dim``,
    each client counted alike. Component j combines the clients whose rank exceeds j (a client of
    smaller rank has no such component; zero-padding would pull every statistic towards 0)."""
    ranks = [t.shape[dim] for t in tensors]
    shape = list(tensors[0].shape)
    shape[dim] = max_rank
    out = torch.zeros(shape, dtype=COMPUTE_DTYPE)
    bounds = sorted({0, *ranks})
    for low, high in zip(bounds, bounds[1:]):
        members = torch.stack([t.narrow(dim, low, high - low).to(COMPUTE_DTYPE) for t, r in zip(tensors, ranks) if r >= high])
        out.narrow(dim, low, high - low).copy_(_robust_statistic(members, rule, trim_fraction))
    return out


def _robust_statistic(stacked: torch.Tensor, rule: str, trim_fraction: float) -> torch.Tensor:
    count = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    if rule == "median":
        middle = count // 2
        return ordered[middle] if count % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])
    if rule == "trimmed_mean":
        cut = int(math.floor(trim_fraction * count))
        return ordered[cut:count - cut].mean(dim=0)
    raise ValueError(f"unknown robust rule {rule!r}; choose median or trimmed_mean")


def factor_products(modules: Sequence[ClientModule], global_b: torch.Tensor, global_a: torch.Tensor) -> ClientProducts:
    """One module's `ClientProducts` from the factors themselves, O((m + n)·r_k·p) per client: for
    a method that does not read them off its Gram matrices, or factors changed after aggregation."""
    return ClientProducts([low_rank_inner(m.lora_b, m.lora_a, m.lora_b, m.lora_a) for m in modules],
                          [low_rank_inner(m.lora_b, m.lora_a, global_b, global_a) for m in modules],
                          low_rank_inner(global_b, global_a, global_b, global_a))


def outlier_report(clients: Sequence[Mapping[str, ClientModule]], products: Mapping[str, ClientProducts]) -> dict:
    """Each client's update norm and its cosine to the round's global update, per module and over
    the whole adapter (fresh-LoRA updates s·B·A against the global B·A), from each module's
    `ClientProducts` and the clients' scales as they sent them."""
    per_module: dict[str, list[dict]] = {}
    totals = [{"norm_sq": 0.0, "inner": 0.0} for _ in clients]
    global_sq = 0.0
    for name, product in products.items():
        global_norm = math.sqrt(max(product.global_norm_squared, 0.0))
        global_sq += global_norm ** 2
        rows = []
        for index, client in enumerate(clients):
            scale = client[name].scale
            norm = scale * math.sqrt(max(product.norms_squared[index], 0.0))
            inner = scale * product.inners[index]
            totals[index]["norm_sq"] += norm ** 2
            totals[index]["inner"] += inner
            rows.append({"norm": norm, "cosine": _cosine(inner, norm, global_norm)})
        per_module[name] = rows
    whole = [{"update_norm": math.sqrt(t["norm_sq"]),
              "cosine": _cosine(t["inner"], math.sqrt(t["norm_sq"]), math.sqrt(global_sq))} for t in totals]
    return {"modules": per_module, "clients": whole}


def _cosine(inner: float, norm: float, other: float) -> float | None:
    return inner / (norm * other) if norm > 0 and other > 0 else None


def median_norm(norms: Sequence[float]) -> float:
    """The round's median update norm (the upper one of an even count), 0 for no clients."""
    return sorted(norms)[len(norms) // 2] if norms else 0.0


def outliers(norms: Sequence[float], ratio: float = 10.0) -> list[int]:
    """The clients an operator should look at: an update norm ``ratio`` times the round's median or
    more (among three clients or more). Their cosines are reported beside, not used: a poisoned
    global update turns every honest client's cosine to it towards 0."""
    median = median_norm(norms)
    return [index for index, norm in enumerate(norms) if len(norms) > 2 and median > 0 and norm >= ratio * median]
