"""The data every aggregation method consumes and produces: per-module factors, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ClientModule:
    """One client's LoRA factors for one adapted linear layer W (m = out, n = in).

    ``scale`` is the PEFT scaling s_k (alpha / r, or alpha / sqrt(r) with rsLoRA): the client's
    effective update is ``scale * lora_b @ lora_a``.
    """

    lora_a: torch.Tensor  # (r_k, n)
    lora_b: torch.Tensor  # (m, r_k)
    scale: float

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.lora_b.shape[0], self.lora_a.shape[1])


@dataclass(frozen=True)
class ClientProducts:
    """For one module, what the outlier report needs of each client's factors (unscaled: the report
    multiplies by each client's scale as sent): ‖B_k·A_k‖²_F and ⟨B_k·A_k, B_g·A_g⟩_F, in client
    order, and ‖B_g·A_g‖²_F, the round's global update of the module as computed (before any cast)."""

    norms_squared: list[float]
    inners: list[float]
    global_norm_squared: float


@dataclass
class ModuleAggregate:
    """The server's result for one module.

    The global factors carry the whole effective update: ``lora_b @ lora_a`` is the update, with
    every scale folded into ``lora_b`` (an adapter written from them uses scaling 1).
    """

    lora_b: torch.Tensor  # (m, selected_rank)
    lora_a: torch.Tensor  # (selected_rank, n)
    selected_rank: int
    #: Singular values of the aggregated update, descending (FLoRIST, FlexLoRA); None otherwise.
    singular_values: torch.Tensor | None = None
    #: Per-client factors when clients receive different adapters (FlexLoRA), in client order.
    client_factors: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    #: What a streaming aggregation left out (its tolerance, discarded energy, error bound); None when exact.
    approximation: dict | None = None
    #: FedEx-LoRA: the first components the clients continue; the rest is the residual that joins the base.
    continued_rank: int | None = None
    #: The clients' products with the global update (merge-style methods, which read them off the
    #: Gram matrices they form anyway); None where the method does not compute them.
    client_products: ClientProducts | None = None

    @property
    def delta_weight(self) -> torch.Tensor:
        """The dense update; for tests and small modules only."""
        return self.lora_b @ self.lora_a


@dataclass
class AggregationResult:
    """All modules of one round, keyed by module name, plus the normalised client weights."""

    method: str
    modules: dict[str, ModuleAggregate]
    client_weights: list[float]
    options: dict = field(default_factory=dict)

    @property
    def selected_ranks(self) -> dict[str, int]:
        return {name: module.selected_rank for name, module in self.modules.items()}
