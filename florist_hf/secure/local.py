"""One secure sum run in one process: every client still masks and the server still only unmasks the
sum; the messages pass as Python objects instead of over a network (``florist-hf run`` and tests)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from florist_hf.secure.protocol import STAGES, ArrayJobs, MaskedInput, SecAggClient, SecAggServer, run_stages
from florist_hf.secure.settings import SecAggSettings


@dataclass
class SecureSum:
    """The decoded sum and the clients whose inputs it holds (the others vanished before masking)."""

    arrays: dict[str, np.ndarray]
    included: tuple[int, ...]
    #: Every message the server received, in order, when a transcript was asked for.
    transcript: list = field(default_factory=list)


def secure_sum(
    inputs: Mapping[int, Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]]],
    settings: SecAggSettings = SecAggSettings(),
    vanish: Mapping[str, Collection[int]] | None = None,
    keep_transcript: bool = False,
    on_message: Callable[[object], None] | None = None,
    jobs: ArrayJobs | None = None,
) -> SecureSum:
    """Σ_k inputs[k] through SecAgg+, client ids as keys; an input may be a function computing the
    client's arrays, called when it masks them.

    The masked inputs reach the server one at a time and are added as they come, so besides the
    server's sum one client's arrays (and their masked copy) are held at once; the first masked input's
    arrays become the server's running sum. ``on_message`` sees
    every message the server receives (e.g. to count bytes); ``keep_transcript`` keeps them all;
    ``jobs``: where the server unmasks each array and what runs on it then (`ArrayJobs`).
    ``vanish`` maps a stage ("keys", "shares", "masked", "unmask") to the clients that stop replying
    from that stage on, as a crashed or disconnected client would. A SecureAggregationError (one
    line) when fewer than the threshold remain at any stage.
    """
    vanish = vanish or {}
    unknown = set(vanish) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown protocol stages {sorted(unknown)}; choose from {STAGES}")
    gone: set[int] = set()
    transcript: list = []
    server = SecAggServer(inputs, settings)
    clients = {cid: SecAggClient(cid, arrays) for cid, arrays in inputs.items()}

    def exchange(stage: str, requests: Mapping[int, object]) -> Iterator:
        # A generator: at the masked stage each client masks when the server takes its input.
        gone.update(vanish.get(stage, ()))
        for cid, request in requests.items():
            if cid in gone:
                continue
            message = clients[cid].respond(stage, request)
            if keep_transcript:  # as received: the server adds into the first masked input's own arrays
                transcript.append(MaskedInput(message.client_id, {name: array.copy() for name, array in message.arrays.items()})
                                  if isinstance(message, MaskedInput) else message)
            if on_message is not None:
                on_message(message)
            yield message
            del message  # taken (a masked input added): not held while the next client computes its own

    arrays = run_stages(server, exchange, jobs)
    return SecureSum(arrays, server.survivors, transcript)
