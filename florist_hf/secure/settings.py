"""The protocol's settings and their checks, free of any cryptographic import (the recipe reads them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Default fractional bits of the fixed-point encoding (see ``encoding``).
FRACTION_BITS = 32
#: Why central DP refuses a sketch narrower than its exact width (the recipe and the server step say it).
NARROW_SKETCH_UNDER_DP = ("central_dp with a narrower sketch: its error-check sum is not noised; remove "
                          "federation.secure_aggregation.sketch_columns (the default width is exact)")


def default_threshold(num_clients: int) -> int:
    """t = ⌈2n/3⌉ (at least 2, and above n/2): the honest-majority bound of Bell et al."""
    return max(2, num_clients // 2 + 1, math.ceil(2 * num_clients / 3))


@dataclass(frozen=True)
class SecAggSettings:
    """The protocol's settings, checked here once (the recipe puts its key before the message)."""

    #: Clients needed at every stage (None: ``default_threshold``); up to n − t may vanish after masking.
    threshold: int | None = None
    fraction_bits: int = FRACTION_BITS

    def __post_init__(self):
        if not 8 <= self.fraction_bits <= 52:
            raise ValueError(f"fraction_bits {self.fraction_bits} is outside [8, 52]; 32 keeps fp32 detail")

    def threshold_for(self, num_clients: int) -> int:
        """t for ``num_clients`` clients; a ValueError names the range when it is out of it."""
        if num_clients < 2:
            raise ValueError(f"secure aggregation needs at least 2 clients (the sum of one is its update); got {num_clients}")
        threshold = default_threshold(num_clients) if self.threshold is None else self.threshold
        if not num_clients // 2 < threshold <= num_clients or threshold < 2:
            raise ValueError(f"threshold {threshold} is outside ({num_clients // 2}, {num_clients}] for {num_clients} "
                             f"clients: more than half must be needed to unmask, e.g. {default_threshold(num_clients)}")
        return threshold
