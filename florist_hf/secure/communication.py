"""What one secure round sends, from the shapes and ranks alone, beside the plain round's: each
client's masked uploads (8-byte ring words), the basis Q it receives (as Householder reflectors),
and the masking protocol's own messages (keys and shares), which are measured by running the
protocol once on empty arrays: their sizes do not depend on what is summed, only on the number of
clients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

from florist_hf.aggregation import AggregationMethod, round_communication, sketch
from florist_hf.secure.methods import FACTOR_SUMS, SKETCH, secure_inputs
from florist_hf.secure.settings import SecAggSettings

#: A masked value travels as one word of the ring Z/2^64.
WORD_BYTES = 8
#: Q's reflectors travel in fp64 (Q must stay orthonormal).
BASIS_BYTES_PER_PARAM = sketch.RangeBasis.BYTES_PER_VALUE


def masked_params(method: AggregationMethod, plans) -> int:
    """The values every client masks and sends in a round (the same for every client): per module
    (m + n)·p for the two sketches (and m·8 for the error check of a narrow one), and the summed
    factors padded to the round's largest rank, m·r_max (+ r_max·n unless A is frozen)."""
    needs = secure_inputs(method.name)
    total = 0
    for plan in plans:
        m, n = plan.shape
        if SKETCH in needs:
            total += (m + n) * plan.columns + (m * sketch.ERROR_CHECK_COLUMNS if plan.checks_error else 0)
        if FACTOR_SUMS in needs:
            total += plan.factor_values(method.freezes_lora_a)
    return total


def basis_params(method: AggregationMethod, plans) -> int:
    """The values of Q every client of a sketch method receives: per module its p Householder
    reflectors as one m×p array and their p scalars τ (`sketch.RangeBasis`)."""
    return sum(plan.basis_values for plan in plans) if SKETCH in secure_inputs(method.name) else 0


@lru_cache(maxsize=32)
def protocol_bytes(num_clients: int, settings: SecAggSettings, sums: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Each client's protocol bytes up (its keys, encrypted shares and revealed shares) and down (the
    others' keys and the shares routed to it) over ``sums`` secure sums with no client vanishing,
    counted as `server_step.Traffic` counts a real round."""
    from florist_hf.secure.local import secure_sum
    from florist_hf.secure.server_step import Traffic

    traffic = Traffic(num_clients)
    for _ in range(sums):
        secure_sum({k: {} for k in range(num_clients)}, settings, on_message=traffic)
    return tuple(traffic.protocol_up), tuple(traffic.down)


def secure_round_communication(
    method: AggregationMethod,
    module_shapes: Mapping[str, tuple[int, int]],
    client_ranks: Sequence[int | Mapping[str, int]],
    selected_ranks: Mapping[str, int] | None = None,
    *,
    settings: SecAggSettings = SecAggSettings(),
    sketch_columns: int | None = None,
    bytes_per_param: int = 4,
) -> dict:
    """One round's traffic per client, plain and secure side by side (bytes), the secure uplink split
    into its masked arrays and the protocol's messages, the downlink into the plain round's, Q and the
    protocol's. A ValueError (one line) for a method that cannot run under secure aggregation."""
    from florist_hf.secure.server_step import plan_modules

    needs = secure_inputs(method.name)
    ranks = [{name: rank if isinstance(rank, int) else rank[name] for name in module_shapes} for rank in client_ranks]
    plans = plan_modules(module_shapes, ranks, sketch_columns)
    plain = round_communication(method, module_shapes, client_ranks, selected_ranks, bytes_per_param).to_dict()
    words = masked_params(method, plans)
    basis = basis_params(method, plans) * BASIS_BYTES_PER_PARAM
    protocol_up, protocol_down = protocol_bytes(len(ranks), settings, 2 if SKETCH in needs else 1)
    masked_up = [words * WORD_BYTES] * len(ranks)
    up = [masked + protocol for masked, protocol in zip(masked_up, protocol_up)]
    down = [plain_down + basis + protocol for plain_down, protocol in zip(plain["downlink_bytes"], protocol_down)]
    return {
        "plain": {key: plain[key] for key in ("uplink_params", "uplink_bytes", "uplink_bytes_total", "downlink_bytes",
                                              "downlink_bytes_total", "bytes_per_param")},
        "secure": {
            "uplink_params": [words] * len(ranks), "bytes_per_param": WORD_BYTES,
            "masked_uplink_bytes": masked_up, "protocol_uplink_bytes": list(protocol_up),
            "uplink_bytes": up, "uplink_bytes_total": sum(up),
            "basis_downlink_bytes": basis, "protocol_downlink_bytes": list(protocol_down),
            "downlink_bytes": down, "downlink_bytes_total": sum(down),
            "sums": 2 if SKETCH in needs else 1, "sketch_columns": {plan.name: plan.columns for plan in plans},
        },
    }
