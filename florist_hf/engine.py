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
and trained again. A change to how clients train is refused (see `recipe.client_training_changes`).

The engine decides; others own the pieces it calls: the run directory's layout and lock
(`rundir`), the global model after each round, its state, catch-up and published adapter
(`global_history`), a round's records and the run's summary (`rounds`), the server step (`server`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from florist_hf.adapters import SIDECAR
from florist_hf.aggregation import SKETCH_SUMS
from florist_hf.aggregation.sketch import participation_free_columns
from florist_hf.errors import FloristError
from florist_hf.global_history import GlobalHistory
from florist_hf.io_utils import append_jsonl, retire_directory, writable_directory, write_json_atomic, write_jsonl_atomic
from florist_hf.loading import prepare_base_model
from florist_hf.recipe import client_training_changes, method_of, recipe_changes, sample_clients
from florist_hf.rounds import adapter_digest, describe_outliers, describe_round, round_record, run_summary
from florist_hf.rundir import (
    GLOBAL_ADAPTER,
    METRICS_FILE,
    RECIPE_RECORD,
    ROUND_INPUTS,
    RUN_LOCK,
    RUN_SUMMARY,
    SUPERSEDED_DIR,
    RunDirectoryLock,
    RunPaths,
    read_metrics,
)
from florist_hf.server import ServerStep, StreamingServerRound, UpdateBounding, aggregate_adapters


@dataclass
class RoundPlan:
    """One round as the engine planned it: the sampled clients and what each one receives."""

    round: int
    selected: list[int]
    #: One plan per selected client (empty when the round is complete).
    clients: list = field(default_factory=list)
    #: Its global adapter exists: nothing to train or aggregate.
    complete: bool = False


def _listed(changes: list[str]) -> str:
    """The first few of ``changes`` (``key: old -> new``), and how many more there are."""
    if not changes:
        return "no setting this version can name differs"
    shown = "; ".join(changes[:3])
    return shown + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")


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
        #: the global model after each round done (`global_history.GlobalHistory`)
        self.history = GlobalHistory(self.paths, self.method, main=main)
        self._superseded: Path | None = None
        #: the recipe's tracker run (`tracking.FederationTracker`), main process only
        self.tracker = None
        #: the run directory's lock, held by the main process from `open` to `close`
        self._lock: RunDirectoryLock | None = None
        #: the one-line note that secure aggregation has no per-client outlier report, printed once
        self._secure_noted = False

    @property
    def rounds_done(self) -> list[int]:
        """The rounds whose global adapter exists, in order."""
        return self.history.rounds_done

    @property
    def round_indices(self) -> range:
        return range(1, self.recipe.federation.rounds + 1)

    # --- opening a run directory ----------------------------------------------------------------

    def open(self, *, force: bool = False) -> str:
        """Check the run directory against the recipe (main process), make or find the base
        model, and read what is logged; returns the base model's path or Hub id."""
        writable_directory(self.paths.root, key="output_dir")
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
        """Refuse a run directory that holds another recipe unless ``force``, naming the settings
        that differ; with ``force``, refuse still a change to how clients train (their kept
        adapters were trained without it) and accept the rest: server settings re-aggregate, new
        rounds extend the run. A directory in which no client finished (a start that failed) takes
        the new recipe: what that start left is set aside under superseded/."""
        record_file = self.paths.recipe_record
        fingerprint = self.recipe.fingerprint()
        if record_file.exists():
            stored = self._stored_record(record_file)
            if stored is None or stored.get("fingerprint") != fingerprint:
                if not self.trained_any_client():
                    self._set_aside_failed_start()
                elif (recorded := self._recorded_recipe(stored)) is None:
                    raise FloristError(f"{record_file}: cannot be read by this version of florist-hf, so the run it "
                                       "records cannot be continued; use another output_dir")
                elif not force:
                    raise FloristError(
                        f"{self.paths.root}: holds a run of another recipe ({_listed(recipe_changes(recorded, self.recipe))}); "
                        "use another output_dir, or --force to continue it with the new recipe"
                    )
                elif changes := client_training_changes(recorded, self.recipe):
                    raise FloristError(
                        f"{self.paths.root}: --force cannot apply {_listed(changes)}: it changes how the clients train, "
                        "and the kept client adapters were trained without it; use another output_dir"
                    )
        write_json_atomic(record_file, {"fingerprint": fingerprint, **self.recipe.record()})

    @staticmethod
    def _stored_record(record_file: Path) -> dict | None:
        """recipe.json as stored (its fingerprint and recipe), or None where it is not a JSON object."""
        try:
            stored = json.loads(record_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return stored if isinstance(stored, dict) else None

    @staticmethod
    def _recorded_recipe(stored: dict | None):
        """The recipe of a stored record, or None where this version cannot read it."""
        from pydantic import ValidationError

        from florist_hf.recipe import Recipe

        try:
            return Recipe.from_record(stored)
        except (KeyError, TypeError, ValidationError):
            return None

    def trained_any_client(self) -> bool:
        """Whether a client finished a round in this run directory: its adapter was exported, or a
        round was aggregated (round 0's global is the clients' shared init, not a result)."""
        return (any(self.paths.root.glob("rounds/*/clients/client_*"))
                or any(path.parent.name != "0" for path in self.paths.root.glob("rounds/*/global")))

    def _set_aside_failed_start(self) -> None:
        """Move what a start that trained nothing left (its recipe, base model, initial adapter,
        checkpoints of unfinished clients) under superseded/, so that the new recipe starts clean."""
        left = sorted(path for path in self.paths.root.iterdir() if path.name not in (RUN_LOCK, SUPERSEDED_DIR, RECIPE_RECORD))
        if left:  # a recipe record alone (a start that failed at the base model) is simply replaced
            for path in [*left, self.paths.recipe_record]:
                if path.exists():
                    retire_directory(path, self._superseded_dir() / path.name)
            self.console.print(f"[yellow]{self.paths.root}: its last start, of another recipe, trained no client; what it "
                               f"left is set aside under {self._superseded_dir()}, and this recipe starts afresh[/]")

    def describe(self, client_sizes: Sequence[int], where: str = "") -> str:
        recipe, federation = self.recipe, self.recipe.federation
        return (
            f"[bold]{recipe.name}[/]{where}: {federation.method}"
            + (f" (τ = {federation.threshold})" if "threshold" in self.method.settings else "")
            + (" under secure aggregation" if federation.secure() is not None else "")
            + f", {federation.num_clients} clients {list(client_sizes)} samples, ranks "
            f"{[recipe.client_rank(k) for k in range(federation.num_clients)]}, {federation.rounds} rounds -> {self.paths.root}"
        )

    def ensure_initial_adapter(self) -> None:
        """Round 0's global adapter (the clients' shared init, `client.write_initial_adapter`) for
        continue-style methods, once."""
        from florist_hf.clients.run import write_initial_adapter

        if self.main and not self.method.merges_into_base and not self.paths.global_dir(0).exists():
            write_initial_adapter(self.recipe, self.base_path, self.paths.global_dir(0))

    # --- one round --------------------------------------------------------------------------------

    def plan_round(self, round_index: int, client_sizes: Sequence[int]) -> RoundPlan:
        """The round's clients and what each receives; a complete round is reused as it is.

        A round whose clients trained on global updates that have since changed (a --force
        re-aggregation of an earlier round) is set aside and planned afresh; a round aggregated
        with other server settings keeps its client adapters and is aggregated again.
        """
        from florist_hf.clients.callback import ClientRound

        federation = self.recipe.federation
        selected = sample_clients(federation.num_clients, federation.clients_per_round, federation.seed, round_index)
        history = self.history
        self._retire_if_stale(round_index, history.received())
        round_plan = RoundPlan(round_index, selected, complete=self.paths.global_dir(round_index).exists())
        if round_plan.complete:
            history.rounds_done.append(round_index)
            history.global_state_dir(round_index)  # rebuilt here if a stop came before it was written
            return round_plan
        state_dir = history.global_state_dir(history.rounds_done[-1]) if history.rounds_done else None
        for client_id in selected:
            round_plan.clients.append(
                ClientRound(
                    client_id=client_id,
                    round=round_index,
                    rank=self.recipe.client_rank(client_id),
                    num_samples=client_sizes[client_id],
                    export_dir=self.paths.client_dir(round_index, client_id),
                    global_state=state_dir,
                    init_adapter=None if self.method.merges_into_base else history.continued(),
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
            secure = None
            if self.recipe.federation.secure() is not None:
                from florist_hf.secure.server_step import secure_record

                secure = secure_record(self.secure_round(round_index))  # as the round's sidecar records it
            current = (self.method.name, json.loads(json.dumps(self.method.options())),
                       None if bounding is None else bounding.clip, None if bounding is None else bounding.noise_multiplier,
                       secure)
            recorded_bound = sidecar.get("bounding") or {}
            recorded = (sidecar.get("method"), sidecar.get("options"), recorded_bound.get("clip_update_norm"),
                        (recorded_bound.get("central_dp") or {}).get("noise_multiplier"),
                        (sidecar.get("secure_aggregation") or {}).get("settings"))
            if recorded != current:
                self._supersede(round_index, global_dir, f"aggregated with {sidecar.get('method')} {sidecar.get('options')}"
                                + (f", clip_update_norm {recorded[2]}" if recorded[2] is not None else "")
                                + (f", secure_aggregation {recorded[4]}" if recorded[4] != current[4] else ""))
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
        from florist_hf.clients.callback import read_client_info

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

    def aggregate(self, round_plan: RoundPlan, trained: Sequence, streamed: StreamingServerRound | None = None,
                  secure_sums=None) -> ServerStep | None:
        """The server step of one round, weighted by sample counts (main process; None elsewhere).

        ``streamed``: the trained clients already folded in as they arrived (streaming aggregation),
        used when it holds exactly ``trained``, in order; otherwise they are read from disk.
        ``secure_sums``: under secure aggregation, how the secure sums reach clients that kept their
        adapters (a `secure.server_step.SumRunner` over ``trained``, in order; each plan's export
        directory then holds its adapter's layout only); None: the clients' adapters are on disk here.
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
            if self.recipe.federation.secure() is not None:
                from florist_hf.secure.server_step import OUTLIER_NOTE, secure_aggregate, secure_aggregate_adapters

                weights = [plan.num_samples for plan in trained]
                if secure_sums is not None:
                    from florist_hf.adapters import read_adapter_layout

                    step = secure_aggregate([read_adapter_layout(plan.export_dir) for plan in trained], secure_sums,
                                            self.method, global_dir, self.secure_round(round_plan.round),
                                            weights=weights, client_names=names)
                else:
                    step = secure_aggregate_adapters([plan.export_dir for plan in trained], self.method, global_dir,
                                                     self.secure_round(round_plan.round), weights=weights,
                                                     client_names=names)
                if not self._secure_noted:
                    self.console.print(f"  [dim]secure aggregation: the per-client outlier report is {OUTLIER_NOTE}[/]")
                    self._secure_noted = True
            elif streamed is not None and [Path(a.path) for a in streamed.adapters] == [plan.export_dir for plan in trained]:
                step = streamed.write(global_dir, client_names=names)
            else:
                step = aggregate_adapters(
                    [plan.export_dir for plan in trained], self.method, global_dir,
                    weights=[plan.num_samples for plan in trained], overwrite=False, client_names=names,
                    bounding=self.update_bounding(round_plan.round),
                )
            for line in describe_outliers(step.sidecar, step.out_dir / SIDECAR):
                self.console.print(line)
            shutil.rmtree(self.paths.round_dir(round_plan.round) / "work", ignore_errors=True)  # the clients' checkpoints
        self.history.rounds_done.append(round_plan.round)
        self.history.global_state_dir(round_plan.round)
        return step

    def secure_round(self, round_index: int):
        """Round ``round_index``'s public secure-aggregation parameters (`secure.server_step.SecureRound`):
        the sketch seed follows from the recipe's seed, so a resumed round sketches alike."""
        from florist_hf.secure.server_step import SecureRound

        federation = self.recipe.federation
        secure = federation.secure()
        reference = None if self.method.merges_into_base else self.history.continued(before=round_index)
        central_dp = self.update_bounding(round_index) if federation.central_dp is not None else None
        columns = secure.sketch_columns
        if central_dp is not None and SKETCH_SUMS in self.method.client_needs():  # one width, whoever takes part
            columns = participation_free_columns([self.recipe.client_rank(k) for k in range(federation.num_clients)],
                                                 federation.clients_sampled())
        return SecureRound(secure.settings(), seed=federation.seed * 1_000_003 + round_index,
                           sketch_columns=columns, reference=reference, clip=federation.clip_update_norm,
                           central_dp=central_dp)

    def update_bounding(self, round_index: int) -> UpdateBounding | None:
        """How the server bounds round ``round_index``'s client updates, and noises their mean
        (`server.round_bounding`); None when it does not."""
        from florist_hf.server import round_bounding

        # Continue-style clients start from the last global (round 0: the shared init); their update is the change since.
        reference = None if self.method.merges_into_base else self.history.continued(before=round_index)
        return round_bounding(self.recipe.federation, round_index, reference=reference, secret_dir=self.paths.root)

    def heldout_loss(self, round_index: int, tokenizer, test_records, *, base_cache=None) -> float | None:
        """The held-out loss (response tokens) of the global model after ``round_index``."""
        from florist_hf.heldout import global_heldout_loss

        state, adapter = self.history.global_model(round_index)
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
            published = self.history.publish(round_index, self.paths.round_dir(round_index) / "published",
                                             threshold=self.recipe.publish.threshold)
            self.evaluate(published, round_index)
        self.console.print(describe_round(record))
        return record

    # --- the end of a run ------------------------------------------------------------------------

    def evaluate(self, adapter_dir: Path, round_index: int) -> dict:
        """The recipe's lm-eval evaluation of an adapter published after ``round_index``, once;
        later resumes reuse its file."""
        from florist_hf import distributed
        from florist_hf.evaluation import evaluate_recipe, read_evaluation

        out_file = self.paths.round_dir(round_index) / "evaluation.json"
        evaluation = read_evaluation(out_file, self.recipe.evaluation)
        if evaluation is None:
            with distributed.single_process():  # lm-eval on the main process alone
                evaluation = evaluate_recipe(self.recipe, self.base_path, adapter_dir, out_file, self.console)
            self.logged.discard(("evaluation", round_index, None))
        if ("evaluation", round_index, None) not in self.logged:
            append_jsonl(self.paths.metrics, {"kind": "evaluation", "round": round_index, **evaluation})
            self.logged.add(("evaluation", round_index, None))
        return evaluation

    def finish(self, client_sizes: Sequence[int], *, runtime: dict | None = None) -> Path:
        """Publish the final global adapter, evaluate it, write run.json and push if the recipe
        says so (main process); returns the published adapter's directory."""
        final_dir = self.history.publish(self.rounds_done[-1], self.paths.root / GLOBAL_ADAPTER,
                                         threshold=self.recipe.publish.threshold)
        evaluation = self.evaluate(final_dir, self.rounds_done[-1]) if self.recipe.evaluation is not None else None
        summary = run_summary(self.recipe, self.paths, self.rounds_done, client_sizes, self.base_path)
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
