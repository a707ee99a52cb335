"""FLoRIST: exact SVD of the stacked client factors without the dense update, then thresholding."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from florist_hf.aggregation.base import SKETCH_SUMS, AggregationMethod, method_class, register_method
from florist_hf.aggregation import sketch
from florist_hf.aggregation.linalg import product_dtype, stacked_truncation
from florist_hf.aggregation.streaming import StreamingFloristRound
from florist_hf.aggregation.types import ClientModule, ModuleAggregate

#: How the server decomposes a round: every client's factors stacked at once, or folded in one
#: client at a time into a running SVD (``streaming``, memory bounded by the kept rank).
AGGREGATION_MODES = ("stacked", "streaming")


@dataclass(frozen=True)
class FloristOptions:
    """FLoRIST's server settings, checked here once: the recipe, the CLI and the sweep build them
    and put their own key or flag before the message of the ValueError."""

    #: The energy threshold τ: per module the smallest rank whose share of the spectrum reaches it.
    threshold: float = 0.9
    aggregation: str = "stacked"
    #: Streaming only: components below this fraction of the largest singular value are dropped.
    tolerance: float = 0.0

    def __post_init__(self):
        if not (0.0 < self.threshold <= 1.0) or math.isnan(self.threshold):
            raise ValueError(f"τ = {self.threshold:g} is outside (0, 1]; the energy threshold is the share of each "
                             "module's spectrum FLoRIST keeps, e.g. 0.9")
        if self.aggregation not in AGGREGATION_MODES:
            raise ValueError(f"aggregation {self.aggregation!r} is unknown; choose stacked or streaming")
        if not 0.0 <= self.tolerance < 1.0:
            raise ValueError(f"streaming_tolerance {self.tolerance:g} is outside [0, 1), e.g. 1e-3")
        if self.tolerance and self.aggregation != "streaming":
            raise ValueError("streaming_tolerance applies to aggregation: streaming only; set both or neither")


def check_aggregation_mode(method: str, aggregation: str, tolerance: float = 0.0) -> None:
    """Streaming is FLoRIST's (its stacked cost grows with the clients' summed rank; a method that
    can stream declares ``can_stream``); every other method aggregates stacked. A ValueError names
    what to drop."""
    if not method_class(method).can_stream and (aggregation != "stacked" or tolerance):
        raise ValueError(f"aggregation: streaming is FLoRIST's (its stacked cost grows with the clients' summed rank); "
                         f"{method} aggregates stacked")


@register_method
class Florist(AggregationMethod):
    """Keep, per module, the smallest rank whose singular-value energy reaches ``threshold`` (τ)."""

    name = "florist"
    exact = True  # at τ = 1; below it, the best approximation at the selected rank
    merges_into_base = True
    can_stream = True
    #: The τ-truncated SVD of ΔW alone, which the two sketch sums give exactly (for a sketch width ≥ Σ r_k).
    needs = frozenset({SKETCH_SUMS})
    central_dp_on = SKETCH_SUMS
    settings = {"threshold": "threshold", "aggregation": "aggregation", "streaming_tolerance": "tolerance"}

    def __init__(self, threshold: float = 0.9, aggregation: str = "stacked", tolerance: float = 0.0):
        options = FloristOptions(float(threshold), aggregation, float(tolerance))
        self.threshold, self.aggregation, self.tolerance = options.threshold, options.aggregation, options.tolerance

    @property
    def streaming(self) -> bool:
        return self.aggregation == "streaming"

    def reports_client_products(self) -> bool:
        return not self.streaming

    def options(self) -> dict:
        if not self.streaming:  # the stacked default records what it always did
            return {"threshold": self.threshold}
        return {"threshold": self.threshold, "aggregation": self.aggregation, "tolerance": self.tolerance}

    def stream(self) -> StreamingFloristRound:
        """An empty round to fold clients into as they arrive (see ``StreamingFloristRound``)."""
        return StreamingFloristRound(self.threshold, self.tolerance, self.options())

    def aggregate_module(self, clients: Sequence[ClientModule], client_weights: torch.Tensor,
                         result_dtype: torch.dtype | None = None) -> ModuleAggregate:
        if self.streaming:  # clients already in memory: folded one after another all the same
            streamed = self.stream()
            for client, weight in zip(clients, client_weights.tolist()):
                streamed.add({"module": client}, weight)
            return streamed.result().modules["module"]
        return stacked_truncation(clients, client_weights, self.threshold, product_dtype(result_dtype))

    def from_sketch(self, update: sketch.SketchedUpdate, client_ranks: Sequence[int],
                    summed: ClientModule | None = None, result_dtype: torch.dtype | None = None) -> ModuleAggregate:
        return sketch.florist_from_sketch(update, self.threshold, product_dtype(result_dtype))

    def sketch_precision(self, result_dtype: torch.dtype | None) -> torch.dtype:
        # Q's span need only be as close to the update's as the kept factors' last products are precise.
        return product_dtype(result_dtype)
