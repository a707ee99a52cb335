"""The global model after each round of a run directory: which global adapters and which global
state make it up, the state rebuilt where a stop left it missing or stale, the one update that
catches a node up on the rounds it missed, and the whole model published as one PEFT adapter.

Merge-style methods fold every round's global adapter into the clients' base (the cumulative
update, `global_state`); FedEx-LoRA folds the rounds' residuals and continues the last global's
factors; continue-style methods are their last global adapter alone.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from florist_hf.rounds import adapter_digest
from florist_hf.rundir import RunPaths
from florist_hf.server import RESIDUAL_DIR, write_published_adapter


class GlobalHistory:
    """The rounds of a run whose global adapter exists (``rounds_done``, in order), and the global
    model after each. ``main`` is False on the other processes of an ``accelerate launch``: they
    read what the main process (re)builds."""

    def __init__(self, paths: RunPaths, method, *, main: bool = True):
        self.paths = paths
        self.method = method
        self.main = main
        self.rounds_done: list[int] = []

    @property
    def holds_state(self) -> bool:
        """Whether the clients hold a global state beside the base: the cumulative update
        (merge-style methods) or the sum of the earlier rounds' residuals (FedEx-LoRA)."""
        return self.method.merges_into_base or self.method.holds_residual

    def received(self) -> list[int]:
        """The rounds whose global adapters the next round's clients receive: every round done
        where a global state holds them, else the last global's factors to continue (round 0: the
        shared init)."""
        return list(self.rounds_done) if self.holds_state else [self.rounds_done[-1] if self.rounds_done else 0]

    def continued(self, before: int | None = None) -> Path:
        """The global adapter a continue-style client of round ``before`` (default: the next
        round) starts from: the last one done before it, or round 0's shared init."""
        earlier = [t for t in self.rounds_done if before is None or t < before]
        return self.paths.global_dir(earlier[-1] if earlier else 0)

    def state_update_dir(self, round_index: int) -> Path:
        """What round ``round_index`` adds to the global state: its global adapter (merge-style
        methods), or the residual part of it (FedEx-LoRA)."""
        global_dir = self.paths.global_dir(round_index)
        return global_dir / RESIDUAL_DIR if self.method.holds_residual else global_dir

    def global_model(self, round_index: int) -> tuple[Path | None, Path | None]:
        """(global state, global adapter) that make up the global model after ``round_index``:
        the state of every round (merge-style methods); the last round's global adapter
        (continue-style); FedEx-LoRA both, the residuals of the rounds before and the last global."""
        rounds = [t for t in self.rounds_done if t <= round_index]
        if self.method.merges_into_base:
            return self.global_state_dir(round_index), None
        earlier = self.global_state_dir(rounds[-2]) if self.method.holds_residual and len(rounds) > 1 else None
        return earlier, self.paths.global_dir(rounds[-1])

    def global_state_dir(self, round_index: int) -> Path | None:
        """The directory of the global state of the rounds done up to ``round_index`` (None where
        the method holds none); the main process (re)builds it where it is missing or stale.

        Each round's state is the previous one plus that round's update, re-factorised exactly
        (`global_state.fold`), one round at a time as a Flower node folds them. Only the two newest
        states are kept: every older one is the same fold of the kept global adapters.
        """
        from florist_hf.adapters import read_adapter
        from florist_hf.global_state import fold, read_global_state, read_state_record, write_global_state

        rounds = [t for t in self.rounds_done if t <= round_index]
        if not self.holds_state or not rounds:
            return None
        target = self.paths.global_state_dir(rounds[-1])
        if not self.main:  # the main process built it before the others read it
            return target
        digests = {str(t): adapter_digest(self.paths.global_dir(t)) for t in rounds}

        def valid(count: int) -> bool:
            record = read_state_record(self.paths.global_state_dir(rounds[count - 1]))
            return record is not None and record.get("rounds") == rounds[:count] and record.get("inputs") == {
                str(t): digests[str(t)] for t in rounds[:count]}

        if valid(len(rounds)):
            return target
        start = next((count for count in range(len(rounds) - 1, 0, -1) if valid(count)), 0)
        state = read_global_state(self.paths.global_state_dir(rounds[start - 1])) if start else None
        for position in range(start, len(rounds)):
            t = rounds[position]
            state = fold(state, [read_adapter(self.state_update_dir(t))], [t], [digests[str(t)]])
            if position >= len(rounds) - 2:  # the previous state stays for the next round's catch-up bytes
                write_global_state(state, self.paths.global_state_dir(t))
        for t in rounds[:-2]:
            shutil.rmtree(self.paths.global_state_dir(t), ignore_errors=True)
        return target

    def catch_up_state(self, rounds: Sequence[int]):
        """The global updates of ``rounds`` summed and compacted into one (exact): what a Flower
        node that missed those rounds receives instead of each of them."""
        from florist_hf.adapters import read_adapter
        from florist_hf.global_state import fold

        return fold(None, [read_adapter(self.state_update_dir(t)) for t in rounds], list(rounds),
                    [adapter_digest(self.paths.global_dir(t)) for t in rounds])

    def publish(self, round_index: int, out_dir: Path, *, threshold: float | None) -> Path:
        """The global model after ``round_index`` as one PEFT adapter on the original base
        (`server.write_published_adapter`; ``threshold``: the recipe's publish.threshold, None: exact)."""
        from florist_hf.adapters import read_adapter
        from florist_hf.global_state import fold, read_global_state

        rounds = [t for t in self.rounds_done if t <= round_index]
        state_dir, adapter = self.global_model(round_index)
        state = read_global_state(state_dir) if state_dir else None
        if self.method.holds_residual:  # the earlier residuals plus the last round's whole global
            state = fold(state, [read_adapter(adapter)], [rounds[-1]])
        return write_published_adapter(self.paths.global_dir(rounds[-1]), state, self.method, out_dir, threshold=threshold)
