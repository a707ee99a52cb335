"""The round engine: a federation's state on disk and the steps that move it on, round by round.

A federation is a run directory (`rundir.RunPaths`) and a `Federation` that knows, from the recipe and
what is on disk, which rounds are done and what each client of the next round receives. Two
drivers move the clients' adapters in and out and call the same steps in the same order:
``florist-hf run`` (`florist_hf.runner`) trains each client itself, in one process or in the
processes of ``accelerate launch``; the Flower strategy (`florist_hf.flower.strategy`) sends each
client's plan to its SuperNode::

    federation = Federation(recipe, console=console)
    federation.open(force=force)                            # recipe record, --force, base model
    for round_index in federation.round_indices:
        round_plan = federation.plan_round(round_index, client_sizes)
        if not round_plan.complete:
            ...                                             # adapters arrive in plan.export_dir
            trained = [plan for plan in round_plan.clients if federation.accept(plan)]
            federation.aggregate(round_plan, trained)
        federation.record_round(round_index, heldout)       # metrics.jsonl, per-round lm-eval
    federation.finish(client_sizes)                         # global_adapter/, run.json, the Hub

Every file is written atomically, and a round's record is rebuilt from its global adapter's
sidecar, so a driver stopped anywhere resumes to the same result. ``--force`` with changed server
settings (τ, the method) re-aggregates the rounds they touch from the kept client adapters; a
round whose clients trained on a global update that changed is set aside under ``superseded/``
and trained again. A change to how clients train is refused (see `recipe.client_training_changes`); a
round's record, its catch-up bytes and the digests of its globals are `rounds.py`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from florist_hf.adapters import SIDECAR
from florist_hf.errors import FloristError
from florist_hf.io_utils import append_jsonl, write_json_atomic, write_jsonl_atomic
from florist_hf.loading import gguf_provenance
from florist_hf.recipe import client_training_changes, method_of, sample_clients
from florist_hf.rounds import adapter_digest, describe_round, round_record
from florist_hf.rundir import (
    BASE_MODEL_DIR,
    GLOBAL_ADAPTER,
    METRICS_FILE,
    RECIPE_RECORD,
    ROUND_INPUTS,
    RUN_FORMAT,
    RUN_SUMMARY,
    SUPERSEDED_DIR,
    RunDirectoryLock,
    RunPaths,
    read_metrics,
)
from florist_hf.server import (
    RESIDUAL_DIR,
    ServerStep,
    StreamingServerRound,
    UpdateBounding,
    aggregate_adapters,
    write_published_adapter,
)
from florist_hf.tiny import TINY_LLAMA_ID, build_tiny_llama

@dataclass
class RoundPlan:
    """One round as the engine planned it: the sampled clients and what each one receives."""

    round: int
    selected: list[int]
    #: One plan per selected client (empty when the round is complete).
    clients: list = field(default_factory=list)
    #: Its global adapter exists: nothing to train or aggregate.
    complete: bool = False


def prepare_base_model(recipe, root: Path) -> str:
    """The base model's path: the recipe's Hub id or directory, the dequantized directory of its
    GGUF file (`loading.resolve_base`), or the builtin tiny Llama, built under ``root`` (a run
    directory, or a Flower client's work directory)."""
    from florist_hf.loading import resolve_base

    model = recipe.model
    if model.name_or_path == TINY_LLAMA_ID:
        return str(build_tiny_llama(Path(root) / BASE_MODEL_DIR, **model.tiny))
    return resolve_base(model.name_or_path, model.gguf_file, dtype=model.dtype, revision=model.revision)


def retire_directory(path: Path, new_path: Path) -> None:
    """Move ``path`` aside to ``new_path`` (replacing what was there), kept for inspection."""
    shutil.rmtree(new_path, ignore_errors=True)
    new_path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, new_path)


def record_key(record: dict) -> tuple:
    return record.get("kind"), record.get("round"), record.get("client")


class Federation:
    """A federation's state machine over its run directory; see the module docstring for the steps.

    ``main`` is False on the other processes of an ``accelerate launch``: they plan and train
    with the main process but write nothing.
    """

    def __init__(self, recipe, *, console=None, main: bool = True):
        from rich.console import Console

        self.recipe = recipe
        self.paths = RunPaths(Path(recipe.output_dir))
        self.method = method_of(recipe)
        self.console = console if console is not None and main else Console(quiet=not main)
        self.main = main
        self.base_path: str | None = None
        #: (kind, round, client) of every line in metrics.jsonl
        self.logged: set[tuple] = set()
        #: rounds whose global adapter exists, in order
        self.rounds_done: list[int] = []
        self._superseded: Path | None = None
        #: the recipe's tracker run (`tracking.FederationTracker`), main process only
        self.tracker = None
        #: the run directory's lock, held by the main process from `open` to `close`
        self._lock: RunDirectoryLock | None = None

    @property
    def round_indices(self) -> range:
        return range(1, self.recipe.federation.rounds + 1)

    # --- opening a run directory ----------------------------------------------------------------

    def open(self, *, force: bool = False) -> str:
        """Check the run directory against the recipe (main process), make or find the base
        model, and read what is logged; returns the base model's path or Hub id."""
        self.paths.root.mkdir(parents=True, exist_ok=True)
        if self.main:
            if self._lock is None:
                self._lock = RunDirectoryLock(self.paths.root)
                self._lock.acquire()
            self.check_recipe(force)
        self.base_path = prepare_base_model(self.recipe, self.paths.root)
        records = read_metrics(self.paths.metrics, strict=False)
        self.logged = {record_key(record) for record in records}
        tracking = self.recipe.tracking
        if tracking is not None and self.main and self.tracker is None:
            from florist_hf.tracking import FederationTracker

            self.tracker = FederationTracker(
                tracking.report_to, output_dir=self.paths.work, run_name=tracking.run_name or self.recipe.name,
                logging_dir=Path(tracking.logging_dir) if tracking.logging_dir else self.paths.root / "tracking",
                # Resumed: the steps of the clients already logged, so that the curves go on from there.
                start_step=sum(record.get("steps") or 0 for record in records if record.get("kind") == "client"),
            )
        return self.base_path

    def check_recipe(self, force: bool) -> None:
        """Refuse a run directory that holds another recipe unless ``force``; with ``force``,
        refuse still a change to how clients train (their kept adapters were trained without
        it) and accept the rest: server settings re-aggregate, new rounds extend the run."""
        from pydantic import ValidationError

        from florist_hf.recipe import Recipe

        record_file = self.paths.root / RECIPE_RECORD
        fingerprint = self.recipe.fingerprint()
        if record_file.exists():
            recorded = json.loads(record_file.read_text())
            if recorded.get("fingerprint") != fingerprint:
                if not force:
                    raise FloristError(
                        f"{self.paths.root}: holds a run of a different recipe (fingerprint {recorded.get('fingerprint')} "
                        f"vs {fingerprint}); use another output_dir, or --force to continue it with the new recipe"
                    )
                try:
                    changes = client_training_changes(Recipe.model_validate(recorded["recipe"]), self.recipe)
                except (KeyError, ValidationError):
                    changes = ["the recorded recipe.json cannot be read by this version"]
                if changes and any(self.paths.root.glob("rounds/*/clients/client_*")):
                    raise FloristError(
                        f"{self.paths.root}: --force cannot apply {changes[0]}"
                        + (f" (and {len(changes) - 1} more)" if len(changes) > 1 else "")
                        + ": it changes how the clients train, and the kept client adapters were trained without it; "
                        "use another output_dir"
                    )
        write_json_atomic(record_file, {"fingerprint": fingerprint, "recipe": self.recipe.model_dump(mode="json")})


    def describe(self, client_sizes: Sequence[int], where: str = "") -> str:
        recipe, federation = self.recipe, self.recipe.federation
        return (
            f"[bold]{recipe.name}[/]{where}: {federation.method}"
            + (f" (τ = {federation.threshold})" if federation.method == "florist" else "")
            + f", {federation.num_clients} clients {list(client_sizes)} samples, ranks "
            f"{[recipe.client_rank(k) for k in range(federation.num_clients)]}, {federation.rounds} rounds -> {self.paths.root}"
        )

    def ensure_initial_adapter(self) -> None:
        """Round 0's global adapter for continue-style methods: one shared LoRA init at the
        largest rank. Every client slices it to its own rank, so FedIT averages factors that
        started equal and FFA-LoRA's frozen A is the same on every client (SPEC §3)."""
        from florist_hf.client import build_lora_model
        from florist_hf.io_utils import atomic_directory

        recipe = self.recipe
        if not self.main or self.method.merges_into_base or self.paths.global_dir(0).exists():
            return
        max_rank = max(recipe.client_rank(k) for k in range(recipe.federation.num_clients))
        model = build_lora_model(
            self.base_path, rank=max_rank, alpha=max_rank, target_modules=recipe.lora.target_modules,
            dropout=0.0, use_rslora=False, dtype=recipe.model.dtype, seed=recipe.federation.seed,
            revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code,
        )
        with atomic_directory(self.paths.global_dir(0), overwrite=True) as staging:
            model.save_pretrained(staging)

    # --- one round --------------------------------------------------------------------------------

    def plan_round(self, round_index: int, client_sizes: Sequence[int]) -> RoundPlan:
        """The round's clients and what each receives; a complete round is reused as it is.

        A round whose clients trained on global updates that have since changed (a --force
        re-aggregation of an earlier round) is set aside and planned afresh; a round aggregated
        with other server settings keeps its client adapters and is aggregated again.
        """
        from florist_hf.client import ClientRound

        federation = self.recipe.federation
        selected = sample_clients(federation.num_clients, federation.clients_per_round, federation.seed, round_index)
        merges = self.method.merges_into_base
        # What the round's clients receive: every earlier round where a global state holds them
        # (merge-style; FedEx-LoRA's residuals), and the last global's factors to continue.
        received = list(self.rounds_done) if self.holds_state else [self.rounds_done[-1] if self.rounds_done else 0]
        self._retire_if_stale(round_index, received)
        round_plan = RoundPlan(round_index, selected, complete=self.paths.global_dir(round_index).exists())
        if round_plan.complete:
            self.rounds_done.append(round_index)
            self.global_state_dir(round_index)  # rebuilt here if a stop came before it was written
            return round_plan
        state_dir = self.global_state_dir(self.rounds_done[-1]) if self.holds_state and self.rounds_done else None
        continued = self.paths.global_dir(self.rounds_done[-1] if self.rounds_done else 0)
        for client_id in selected:
            round_plan.clients.append(
                ClientRound(
                    client_id=client_id,
                    round=round_index,
                    rank=self.recipe.client_rank(client_id),
                    num_samples=client_sizes[client_id],
                    export_dir=self.paths.client_dir(round_index, client_id),
                    global_state=state_dir,
                    init_adapter=None if merges else continued,
                    freeze_lora_a=self.method.freezes_lora_a,
                )
            )
        return round_plan

    def _retire_if_stale(self, round_index: int, received: list[int]) -> None:
        if not self.main:  # the main process plans first and moves what is stale
            return
        round_dir = self.paths.round_dir(round_index)
        inputs = {"globals": {str(t): adapter_digest(self.paths.global_dir(t)) for t in received}}
        inputs_file = round_dir / ROUND_INPUTS
        if inputs_file.exists() and json.loads(inputs_file.read_text()) != inputs:
            self._supersede(round_index, round_dir, "its clients trained on global updates that have changed")
        global_dir = self.paths.global_dir(round_index)
        if global_dir.exists():
            sidecar = json.loads((global_dir / SIDECAR).read_text())
            bounding = self.update_bounding(round_index)
            current = (self.method.name, json.loads(json.dumps(self.method.options())),
                       None if bounding is None else bounding.clip, None if bounding is None else bounding.noise_multiplier)
            recorded_bound = sidecar.get("bounding") or {}
            recorded = (sidecar.get("method"), sidecar.get("options"), recorded_bound.get("clip_update_norm"),
                        (recorded_bound.get("central_dp") or {}).get("noise_multiplier"))
            if recorded != current:
                self._supersede(round_index, global_dir, f"aggregated with {sidecar.get('method')} {sidecar.get('options')}"
                                + (f", clip_update_norm {recorded[2]}" if recorded[2] is not None else ""))
                for stale in ("published", "evaluation.json"):
                    if (round_dir / stale).exists():
                        retire_directory(round_dir / stale, self._superseded_dir() / "rounds" / str(round_index) / stale)
        write_json_atomic(inputs_file, inputs)

    def _superseded_dir(self) -> Path:
        if self._superseded is None:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            self._superseded = self.paths.root / SUPERSEDED_DIR / stamp
        return self._superseded

    def _supersede(self, round_index: int, path: Path, reason: str) -> None:
        """Move a stale round (or its global adapter) and its metrics lines under superseded/."""
        target = self._superseded_dir() / path.relative_to(self.paths.root)
        whole_round = path == self.paths.round_dir(round_index)
        # The metrics lines go first: a stop before the move finds the stale round again on resume,
        # whereas lines kept for a round already moved would be trusted as its record.
        kept, dropped = [], []
        for record in read_metrics(self.paths.metrics, strict=False):
            stale = record.get("round") == round_index and (whole_round or record.get("kind") != "client")
            (dropped if stale else kept).append(record)
        if dropped:
            for record in dropped:
                append_jsonl(self._superseded_dir() / METRICS_FILE, record)
                self.logged.discard(record_key(record))
            write_jsonl_atomic(self.paths.metrics, kept)
        retire_directory(path, target)
        what = f"round {round_index}" if whole_round else f"round {round_index}'s global adapter"
        self.console.print(f"[yellow]{what} set aside under {target.parent}: {reason}[/]")

    def accept(self, plan) -> bool:
        """Log a finished client once; a diverged (NaN/Inf) client is set aside and left out of its round."""
        from florist_hf import distributed
        from florist_hf.client import read_client_info

        info = read_client_info(plan.export_dir)
        key = ("client", plan.round, plan.client_id)
        if self.main and key not in self.logged:
            append_jsonl(self.paths.metrics, {"kind": "client", "round": plan.round, **info})
            self.logged.add(key)
            if self.tracker is not None:
                self.tracker.log_client(plan.client_id, plan.round, info)
        if not info.get("finite", True):
            distributed.wait_for_everyone()  # every process has read it before it moves
            # Kept for inspection under another name, so that a resumed run trains it again.
            if self.main:
                retire_directory(plan.export_dir, plan.export_dir.with_name(plan.export_dir.name + ".nonfinite"))
            self.console.print(f"  [yellow]client {plan.client_id}: training diverged (NaN/Inf); left out of round {plan.round}[/]")
            return False
        self.console.print(f"  client {plan.client_id}: loss {info['loss']:.4f}, {info['num_samples']} samples, {info['train_seconds']:.1f} s")
        return True

    def aggregate(self, round_plan: RoundPlan, trained: Sequence, streamed: StreamingServerRound | None = None) -> ServerStep | None:
        """The server step of one round, weighted by sample counts (main process; None elsewhere).

        ``streamed``: the trained clients already folded in as they arrived (streaming aggregation),
        used when it holds exactly ``trained``, in order; otherwise they are read from disk.
        """
        min_clients = self.recipe.federation.min_clients
        if len(trained) < min_clients:
            raise FloristError(
                f"{self.paths.round_dir(round_plan.round)}: only {len(trained)} of {len(round_plan.selected)} clients "
                f"trained successfully, below federation.min_clients = {min_clients}; earlier rounds are kept — run the "
                "fixed recipe (e.g. a lower learning rate) into another output_dir, or lower federation.min_clients "
                "and run again with --force"
            )
        step = None
        if self.main:
            global_dir, names = self.paths.global_dir(round_plan.round), [plan.export_dir.name for plan in trained]
            if streamed is not None and [Path(a.path) for a in streamed.adapters] == [plan.export_dir for plan in trained]:
                step = streamed.write(global_dir, client_names=names)
            else:
                step = aggregate_adapters(
                    [plan.export_dir for plan in trained], self.method, global_dir,
                    weights=[plan.num_samples for plan in trained], overwrite=False, client_names=names,
                    bounding=self.update_bounding(round_plan.round),
                )
            self._say_outliers(step)
            shutil.rmtree(self.paths.round_dir(round_plan.round) / "work", ignore_errors=True)  # the clients' checkpoints
        self.rounds_done.append(round_plan.round)
        self.global_state_dir(round_plan.round)
        return step

    def update_bounding(self, round_index: int) -> UpdateBounding | None:
        """How the server bounds round ``round_index``'s client updates, and noises their mean
        (`privacy.update_bounding`); None when it does not."""
        from florist_hf.privacy import update_bounding

        earlier = [t for t in self.rounds_done if t < round_index]
        # Continue-style clients start from the last global (round 0: the shared init); their update is the change since.
        reference = None if self.method.merges_into_base else self.paths.global_dir(earlier[-1] if earlier else 0)
        return update_bounding(self.recipe.federation, round_index, reference=reference, secret_dir=self.paths.root)

    def _say_outliers(self, step: ServerStep) -> None:
        """One line per client an operator should look at (`aggregation.bounding.outliers`: its norm far above the round's)."""
        from florist_hf.aggregation.bounding import median_norm

        clients = {client["name"]: client for client in step.sidecar["clients"]}
        median = median_norm([client["update_norm"] for client in clients.values() if client.get("update_norm") is not None])
        for name in step.sidecar.get("outliers", []):
            client = clients[name]
            cosine = client.get("cosine")
            self.console.print(
                f"  [yellow]{name}: update norm {client['update_norm']:.3g}"
                + (f" ({client['update_norm'] / median:.3g}× the round's median)" if median > 0 else "")
                + (f", cosine {cosine:.3f} to the global update" if cosine is not None else "")
                + (f", clipped to {step.sidecar['bounding']['clip_update_norm']:g}" if client.get("clipped") else "")
                + f"; see {step.out_dir / SIDECAR}[/]")

    @property
    def holds_state(self) -> bool:
        """Whether the clients hold a global state beside the base: the cumulative update
        (merge-style methods) or the sum of the earlier rounds' residuals (FedEx-LoRA)."""
        return self.method.merges_into_base or self.method.holds_residual

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
        """Merge-style methods: the directory of the cumulative update of the rounds done up to
        ``round_index``; the main process (re)builds it where it is missing or stale.

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

    def heldout_loss(self, round_index: int, tokenizer, test_records, *, base_cache=None) -> float | None:
        """The held-out loss (response tokens) of the global model after ``round_index``."""
        from florist_hf.heldout import global_heldout_loss

        state, adapter = self.global_model(round_index)
        return global_heldout_loss(self.recipe, self.base_path, tokenizer, test_records, self.paths.work,
                                   state=state, adapter=adapter, base_cache=base_cache)

    def _evaluates_round(self, round_index: int) -> bool:
        evaluation = self.recipe.evaluation
        return evaluation is not None and evaluation.every_round and round_index < self.recipe.federation.rounds

    def is_recorded(self, round_index: int) -> bool:
        """The round's line is in metrics.jsonl, and its per-round lm-eval too where the recipe asks
        for one (a stop during that evaluation leaves the round to finish on resume)."""
        return ("round", round_index, None) in self.logged and (
            not self._evaluates_round(round_index) or ("evaluation", round_index, None) in self.logged)

    def record_round(self, round_index: int, heldout: float | None, *, measured: dict | None = None) -> dict:
        """Write the round's line to metrics.jsonl (once), run the per-round lm-eval if the recipe
        asks, and print the round; main process only. ``measured``: what a driver measured itself
        (the Flower strategy: the bytes its messages carried)."""
        record = {**round_record(self.paths, round_index, heldout, merges_into_base=self.method.merges_into_base),
                  **(measured or {})}
        if ("round", round_index, None) not in self.logged:
            append_jsonl(self.paths.metrics, record)
            self.logged.add(("round", round_index, None))
            if self.tracker is not None:
                self.tracker.log_round(record, self.paths.global_dir(round_index) / SIDECAR, self.paths.work / "tracking_plots",
                                       images=self.recipe.tracking.log_images, console=self.console)
        if self._evaluates_round(round_index):
            published = self.publish(round_index, self.paths.round_dir(round_index) / "published")
            self.evaluate(published, round_index)
        self.console.print(describe_round(record))
        return record

    # --- the end of a run ------------------------------------------------------------------------

    def publish(self, round_index: int, out_dir: Path) -> Path:
        """The global model after ``round_index`` as one PEFT adapter on the original base."""
        from florist_hf.adapters import read_adapter
        from florist_hf.global_state import fold, read_global_state

        rounds = [t for t in self.rounds_done if t <= round_index]
        state_dir, adapter = self.global_model(round_index)
        state = read_global_state(state_dir) if state_dir else None
        if self.method.holds_residual:  # the earlier residuals plus the last round's whole global
            state = fold(state, [read_adapter(adapter)], [rounds[-1]])
        return write_published_adapter(self.paths.global_dir(rounds[-1]), state, self.method, out_dir,
                                       threshold=self.recipe.publish.threshold)

    def evaluate(self, adapter_dir: Path, round_index: int) -> dict:
        """The recipe's lm-eval evaluation of an adapter published after ``round_index``, once;
        later resumes reuse its file."""
        from florist_hf import distributed
        from florist_hf.evaluation import evaluate_recipe

        out_file = self.paths.round_dir(round_index) / "evaluation.json"
        # The evaluation section is not part of the run's fingerprint: a result made with other
        # settings (tasks, shots, limit) is made again rather than reused.
        settings = hashlib.sha256(self.recipe.evaluation.model_dump_json().encode()).hexdigest()[:16]
        evaluation = json.loads(out_file.read_text())["florist_hf_summary"] if out_file.exists() else None
        if evaluation is None or evaluation.get("settings") != settings:
            with distributed.single_process():  # lm-eval on the main process alone
                evaluation = evaluate_recipe(self.recipe, self.base_path, adapter_dir, out_file, self.console)
            evaluation["settings"] = settings
            results = json.loads(out_file.read_text())
            write_json_atomic(out_file, {**results, "florist_hf_summary": evaluation})
            self.logged.discard(("evaluation", round_index, None))
        if ("evaluation", round_index, None) not in self.logged:
            append_jsonl(self.paths.metrics, {"kind": "evaluation", "round": round_index, **evaluation})
            self.logged.add(("evaluation", round_index, None))
        return evaluation

    def finish(self, client_sizes: Sequence[int], *, runtime: dict | None = None) -> Path:
        """Publish the final global adapter, evaluate it, write run.json and push if the recipe
        says so (main process); returns the published adapter's directory."""
        final_dir = self.publish(self.rounds_done[-1], self.paths.root / GLOBAL_ADAPTER)
        evaluation = self.evaluate(final_dir, self.rounds_done[-1]) if self.recipe.evaluation is not None else None
        summary = self.summarize(client_sizes)
        summary["evaluation"] = evaluation
        published = json.loads((final_dir / SIDECAR).read_text())
        summary["published"] = {key: published.get(key) for key in ("total_rank", "publish_threshold", "high_rank_modules")}
        if published.get("high_rank_modules"):
            self.console.print(
                f"[yellow]{len(published['high_rank_modules'])} of {len(published['modules'])} modules of the cumulative update "
                f"are no longer low-rank (rank above a quarter of min(m, n)): {GLOBAL_ADAPTER}/ is exact but large; serve "
                "`florist-hf export --format merged`, or set publish.threshold for a compact adapter[/]")
        if runtime:
            summary["runtime"] = runtime
        write_json_atomic(self.paths.root / RUN_SUMMARY, summary)
        self._close_tracker()  # the run is complete; the push below still holds the directory
        hub = self.recipe.hub
        if hub is not None and hub.push:
            from florist_hf.hub import push

            url = push(self.paths.root, hub.repo_id, private=hub.private, include_client_details=hub.include_client_details)
            self.console.print(f"pushed to {url}")
        self.close()
        return final_dir

    def close(self) -> None:
        """End the tracker run, if any, and release the run directory (finish does; a driver
        that stops early must too)."""
        self._close_tracker()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _close_tracker(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

    def privacy_summary(self, records: list[dict]) -> dict | None:
        """What the run guarantees and bounds, for run.json and the model card (`privacy.privacy_summary`),
        from the records of metrics.jsonl and the last round's sidecar."""
        from florist_hf.privacy import privacy_summary

        last = self.paths.global_dir(self.rounds_done[-1]) / SIDECAR if self.rounds_done else None
        return privacy_summary(self.recipe, records, self.rounds_done, json.loads(last.read_text()) if last is not None else None)

    def summarize(self, client_sizes: Sequence[int]) -> dict:
        """``run.json``: what ran, what it cost, where the result is."""
        recipe, federation = self.recipe, self.recipe.federation
        records = read_metrics(self.paths.metrics, strict=False)
        rounds = [r for r in records if r["kind"] == "round" and r["round"] in self.rounds_done]
        data_source = recipe.data.source
        return {
            "format": RUN_FORMAT,
            "version": 1,
            "name": recipe.name,
            "method": federation.method,
            "threshold": federation.threshold if federation.method == "florist" else None,
            "rounds": federation.rounds,
            "rounds_completed": len(rounds),
            "num_clients": federation.num_clients,
            "clients_per_round": len(sample_clients(federation.num_clients, federation.clients_per_round, federation.seed, 1)),
            "client_ranks": [recipe.client_rank(k) for k in range(federation.num_clients)],
            "client_samples": list(client_sizes),
            "base_model": self.base_path,
            # A base dequantized from a GGUF file: which file (its source, name and content hash).
            "base_gguf": None if not recipe.model.gguf_file else gguf_provenance(
                self.base_path, source=recipe.model.name_or_path, gguf_file=recipe.model.gguf_file,
                revision=recipe.model.revision),
            # Hub dataset ids only (for the model card); local files and builtin data are not linkable.
            "datasets": [] if data_source.startswith("builtin:") or Path(data_source).exists() else [data_source],
            "data_source": data_source,
            "global_adapter": GLOBAL_ADAPTER,
            "communication": {
                "uplink_bytes_total": sum(r["uplink_bytes_total"] for r in rounds),
                "downlink_bytes_total": sum(r["downlink_bytes_total"] for r in rounds),
                "catch_up_downlink_bytes_total": sum(r.get("catch_up_downlink_bytes", 0) for r in rounds),
                "eff_x1e4": rounds[-1]["eff_x1e4"] if rounds else None,
                "eff_x1e4_per_round": [r["eff_x1e4"] for r in rounds],
            },
            "heldout_loss": [r.get("heldout_loss") for r in rounds],
            "privacy": self.privacy_summary(records),
            "evaluation": None,
            "recipe": recipe.model_dump(mode="json"),
        }

