"""What each aggregation method needs from the clients when the server may learn only sums of what
they send, and which methods cannot run so (no cryptographic import: the recipe reads it)."""

from __future__ import annotations

#: The two sums of the two-stage sketch (`aggregation.sketch`): Y = ΔW·Ω, then Z = QᵀΔW.
SKETCH = "sketch"
#: FedIT's summed factors: Σ p_k s_k pad(B_k), and Σ p_k pad(A_k) unless A is frozen and shared.
FACTOR_SUMS = "factor_sums"

# Keyed by method name until the method registry declares it in each method's own module.
SECURE_INPUTS: dict[str, tuple[str, ...]] = {
    "florist": (SKETCH,),
    "flexlora": (SKETCH,),
    "fedex": (SKETCH, FACTOR_SUMS),
    "fedit": (FACTOR_SUMS,),
    "ffa": (FACTOR_SUMS,),
    "fedsvd": (FACTOR_SUMS,),
}
REFUSED = {
    "flora": "flora hands every client every other client's factors, so each update is seen whatever the server "
             "learns; choose florist (the same exact update, from two secure sums)",
}


def secure_inputs(method_name: str) -> tuple[str, ...]:
    """What ``method_name`` asks of each client under secure aggregation; a ValueError (one line)
    for a method that cannot run so."""
    if method_name in REFUSED:
        raise ValueError(f"secure_aggregation: {REFUSED[method_name]}")
    if method_name not in SECURE_INPUTS:
        raise ValueError(f"secure_aggregation: {method_name} has no secure form; choose one of {sorted(SECURE_INPUTS)}")
    return SECURE_INPUTS[method_name]
