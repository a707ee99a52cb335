"""Per-round communication in parameters and bytes, and the paper's Eff figure (SPEC §5)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from florist_hf.aggregation.base import AggregationMethod


@dataclass
class CommunicationReport:
    """One round, summed over modules. Per-client lists are in client order."""

    uplink_params: list[int]
    downlink_params: list[int]
    bytes_per_param: int
    #: Σ over modules of the rank of the global adapter broadcast in one round (halved for B-only).
    broadcast_rank_total: float

    @property
    def uplink_params_total(self) -> int:
        return sum(self.uplink_params)

    @property
    def downlink_params_total(self) -> int:
        return sum(self.downlink_params)

    @property
    def eff_x1e4(self) -> float:
        """The paper's "Eff. (×10⁻⁴)": 10⁴ / Σ_modules broadcast rank."""
        return 1e4 / self.broadcast_rank_total

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "uplink_params_total": self.uplink_params_total,
            "downlink_params_total": self.downlink_params_total,
            "uplink_bytes": [p * self.bytes_per_param for p in self.uplink_params],
            "downlink_bytes": [p * self.bytes_per_param for p in self.downlink_params],
            "uplink_bytes_total": self.uplink_params_total * self.bytes_per_param,
            "downlink_bytes_total": self.downlink_params_total * self.bytes_per_param,
            "eff_x1e4": self.eff_x1e4,
        }


def round_communication(
    method: AggregationMethod,
    module_shapes: Mapping[str, tuple[int, int]],
    client_ranks: Sequence[int | Mapping[str, int]],
    selected_ranks: Mapping[str, int] | None = None,
    bytes_per_param: int = 4,
) -> CommunicationReport:
    """Traffic of one round. ``module_shapes`` maps module name -> (m, n) of its frozen weight.

    A client's rank is one number, or a mapping module -> rank when its modules differ.

    ``selected_ranks`` are FLoRIST's per-module ranks; methods with a fixed broadcast rank ignore
    them. Without them (planning before a run), FLoRIST is counted at the largest client rank.
    """
    uplink = [0] * len(client_ranks)
    downlink = [0] * len(client_ranks)
    broadcast_total = 0.0
    for name, (m, n) in module_shapes.items():
        module_ranks = [rank if isinstance(rank, int) else rank[name] for rank in client_ranks]
        selected = (selected_ranks or {}).get(name, max(module_ranks))
        sent_per_rank = m if method.b_only else m + n
        sent_up_per_rank = m if method.b_only or method.freezes_lora_a else m + n
        for k, rank in enumerate(module_ranks):
            uplink[k] += rank * sent_up_per_rank
            downlink[k] += method.downlink_rank(rank, module_ranks, selected) * sent_per_rank
        broadcast = method.broadcast_rank(module_ranks, selected)
        broadcast_total += broadcast / 2 if method.b_only else broadcast
    return CommunicationReport(uplink, downlink, bytes_per_param, broadcast_total)
