"""What each aggregation method asks of the clients when the server may learn only sums of what they
send: read off the method registry (each method's ``needs``, declared in its own module), no
cryptographic import (the recipe reads it)."""

from __future__ import annotations

from florist_hf.aggregation import FACTOR_SUMS, FACTORS, METHODS, SKETCH_SUMS

#: The two sums of the two-stage sketch (`aggregation.sketch`): Y = ΔW·Ω, then Z = QᵀΔW.
SKETCH = SKETCH_SUMS
__all__ = ["FACTOR_SUMS", "SKETCH", "secure_inputs"]

#: Why a method whose clients' own factors are needed cannot run under secure aggregation, where more
#: can be said than that.
_WHY = {
    "flora": "flora hands every client every other client's factors, so each update is seen whatever the server "
             "learns; choose florist (the same exact update, from two secure sums)",
}


def secure_inputs(method_name: str) -> tuple[str, ...]:
    """What ``method_name`` asks of each client under secure aggregation (its registered ``needs``,
    sketch sums first); a ValueError (one line) for a method that needs each client's own factors."""
    needs = METHODS[method_name].needs
    if FACTORS in needs:
        why = _WHY.get(method_name, f"{method_name} needs each client's own factors, which the server never sees; "
                                    f"choose one of {', '.join(sorted(n for n, m in METHODS.items() if FACTORS not in m.needs))}")
        raise ValueError(f"secure_aggregation: {why}")
    return tuple(need for need in (SKETCH_SUMS, FACTOR_SUMS) if need in needs)
