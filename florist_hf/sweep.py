"""The τ sweep: one federation per threshold (and per baseline), round 1's clients trained once
for all of them, and the choice of FLoRIST-O and FLoRIST-E.

Every branch is an ordinary run directory under the sweep's (``tau_0.85/``, ``flora/``, ...) made
by `runner.run_federation`, so each resumes like any run. Branches whose clients train alike
(`recipe.client_training_view`: every FLoRIST τ, FLoRA; FedIT with FlexLoRA) share round 1: its
client adapters, trained in the first such branch, are linked into the others before they run,
and the engine reuses them as finished clients. From round 2 on a branch's clients train on its
own global model, so each branch trains its own rounds.

Selection (only among the FLoRIST branches):

- **FLoRIST-O**: the τ with the best criterion value (the held-out loss, lowest; or an lm-eval
  ``TASK:METRIC``, highest unless lm-eval says lower is better);
- **FLoRIST-E**: among the τ whose value is within ``tolerance`` of O's (absolute, in the
  criterion's unit), the one with the least downlink traffic (ties: the lower τ). The paper names
  E "a low τ with far higher communication efficiency that stays competitive" but gives no rule;
  this is ours.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from florist_hf.aggregation import METHODS
from florist_hf.aggregation.florist import FloristOptions
from florist_hf.errors import FloristError
from florist_hf.io_utils import atomic_directory, write_json_atomic, write_text_atomic
from florist_hf.recipe import Recipe

SWEEP_FORMAT = "florist-hf/sweep"
SWEEP_RECORD = "sweep.json"
SWEEP_TABLE = "sweep.md"
SWEEP_PLOT = "sweep.png"
HELDOUT_LOSS = "heldout_loss"
#: The method a sweep varies τ for; every other registered method can run beside it as a baseline.
SWEPT = "florist"
DEFAULT_TOLERANCE = 0.01
#: lm-eval metrics for which lower is better when the results file does not say.
LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte", "ppl")


@dataclass(frozen=True)
class Criterion:
    """What a branch is judged by: the held-out loss, or one lm-eval task metric."""

    task: str | None
    metric: str

    @property
    def name(self) -> str:
        return HELDOUT_LOSS if self.task is None else f"{self.task}:{self.metric}"


@dataclass
class Branch:
    """One federation of the sweep."""

    name: str
    method: str
    threshold: float | None
    recipe: object

    @property
    def run_dir(self) -> Path:
        return Path(self.recipe.output_dir)


def parse_thresholds(text: str | Sequence[float]) -> list[float]:
    """``"0.80,0.85,0.9"`` -> sorted distinct thresholds in (0, 1]; anything else is a one-line error."""
    parts = [part.strip() for part in text.split(",")] if isinstance(text, str) else list(text)
    parts = [part for part in parts if part != ""]
    if not parts:
        raise FloristError("--thresholds: empty; give τ values in (0, 1], e.g. --thresholds 0.80,0.85,0.90,0.95")
    thresholds = []
    for part in parts:
        try:
            value = float(part)
        except (TypeError, ValueError):
            raise FloristError(f"--thresholds: {part!r} is not a number; e.g. --thresholds 0.80,0.85,0.90,0.95") from None
        try:
            FloristOptions(threshold=value)
        except ValueError as error:
            raise FloristError(f"--thresholds: {error}") from None
        thresholds.append(value)
    return sorted(set(thresholds))


def parse_baselines(text: str | Sequence[str] | None) -> list[str]:
    names = [part.strip() for part in text.split(",")] if isinstance(text, str) else list(text or [])
    names = [name for name in names if name]
    baselines = sorted(set(METHODS) - {SWEPT})
    for name in names:
        if name not in baselines:
            raise FloristError(f"--baselines: unknown method {name!r}; choose from {', '.join(baselines)}")
    return list(dict.fromkeys(names))


def parse_criterion(text: str, recipe) -> Criterion:
    """``heldout_loss`` or ``TASK:METRIC`` of a task the recipe's evaluation runs."""
    text = text.strip()
    if text == HELDOUT_LOSS:
        if not recipe.federation.eval_heldout_loss:
            raise FloristError("--criterion heldout_loss: the recipe sets federation.eval_heldout_loss=false; "
                               "enable it or pick --criterion TASK:METRIC")
        return Criterion(None, HELDOUT_LOSS)
    task, _, metric = text.partition(":")
    if not task or not metric:
        raise FloristError(f"--criterion {text!r}: expected heldout_loss or TASK:METRIC, e.g. mmlu:acc")
    evaluation = recipe.evaluation
    if evaluation is None:
        raise FloristError(
            f"--criterion {text}: the recipe has no evaluation section; add one (e.g. --set evaluation.tasks=[{task}]) "
            "or use --criterion heldout_loss"
        )
    from florist_hf.evaluation import recipe_evaluation_plan

    tasks, _ = recipe_evaluation_plan(evaluation)
    if task not in tasks:
        raise FloristError(f"--criterion {text}: task {task!r} is not evaluated by the recipe (evaluation runs {tasks})")
    return Criterion(task, metric)


def sweep_branches(recipe, thresholds: Sequence[float], baselines: Sequence[str] = ()) -> list[Branch]:
    """A recipe per τ (FLoRIST) and per baseline, each writing under the sweep's output_dir."""
    root = Path(recipe.output_dir)

    def variant(name: str, method: str, threshold: float | None) -> Branch:
        settings = {"method": method, **({"threshold": threshold} if threshold else {})}
        if not METHODS[method].can_stream:  # a baseline that cannot stream aggregates stacked
            settings.update(aggregation="stacked", streaming_tolerance=0.0)
        tree = recipe.model_dump(mode="json")
        tree["federation"].update(settings)
        tree.update(output_dir=str(root / name), name=f"{recipe.name}-{name}")
        try:  # validated as a recipe of its own: a setting of the sweep's recipe may not hold for a baseline
            branch = Recipe.model_validate(tree)
        except ValidationError as error:
            reason = error.errors()[0]["msg"].removeprefix("Value error, ")
            raise FloristError(f"sweep branch {name}: {reason}") from None
        return Branch(name, method, threshold, branch)

    branches = [variant(f"tau_{threshold!r}", SWEPT, threshold) for threshold in thresholds]  # repr: distinct τ, distinct names
    return branches + [variant(method, method, None) for method in baselines]


def share_round_one(source: Path, target: Path) -> int:
    """Link the round-1 client adapters of run ``source`` into run ``target`` (those it lacks);
    returns how many. Hard links where the filesystem allows, copies elsewhere."""
    from florist_hf.rundir import RunPaths

    shared = 0
    initial = RunPaths(source).global_dir(0)  # continue-style methods: the round-0 init the clients started from
    if initial.is_dir() and not RunPaths(target).global_dir(0).exists():
        _link_tree(initial, RunPaths(target).global_dir(0))
    for client in RunPaths(source).client_dirs(1):
        destination = RunPaths(target).round_dir(1) / "clients" / client.name
        if not destination.exists():
            _link_tree(client, destination)
            shared += 1
    return shared


def _link_tree(source: Path, destination: Path) -> None:
    """``source`` under ``destination``, whole or not at all (hard links where possible)."""
    with atomic_directory(destination) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True, copy_function=_link_or_copy)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _metric_direction(evaluation: dict, criterion: Criterion) -> bool:
    """Whether lower is better for an lm-eval metric: lm-eval's own record, else by its name."""
    try:
        results = json.loads(Path(evaluation["results_file"]).read_text())
        higher = results["higher_is_better"][criterion.task][criterion.metric]
        return not higher
    except (KeyError, OSError, TypeError, json.JSONDecodeError):
        return any(word in criterion.metric for word in LOWER_IS_BETTER)


def branch_row(branch: Branch, criterion: Criterion) -> dict:
    """One line of sweep.json from a finished branch's run.json and metrics.jsonl."""
    from florist_hf.rundir import RunPaths, read_json, read_metrics

    paths = RunPaths(branch.run_dir)
    run = read_json(paths.run_record)
    rounds = [record for record in read_metrics(paths.metrics)
              if record["kind"] == "round" and record["round"] <= branch.recipe.federation.rounds]
    last = max(rounds, key=lambda record: record["round"])
    if criterion.task is None:
        value, lower_is_better = last.get("heldout_loss"), True
        if value is None:
            raise FloristError(
                f"{branch.run_dir}: no held-out loss (the data has no held-out records); set data.holdout_per_label "
                "above 0 or pick --criterion TASK:METRIC"
            )
    else:
        tasks = (run.get("evaluation") or {}).get("tasks", {})
        if criterion.metric not in tasks.get(criterion.task, {}):
            available = [f"{task}:{metric}" for task, metrics in tasks.items() for metric in metrics if not metric.endswith("_stderr")]
            raise FloristError(f"--criterion {criterion.name}: not in {branch.name}'s evaluation; it has {available}")
        value = tasks[criterion.task][criterion.metric]
        lower_is_better = _metric_direction(run["evaluation"], criterion)
    communication = run["communication"]
    return {
        "branch": branch.name,
        "method": branch.method,
        "threshold": branch.threshold,
        "metric": value,
        "lower_is_better": lower_is_better,
        "downlink_bytes_total": communication["downlink_bytes_total"],
        "uplink_bytes_total": communication["uplink_bytes_total"],
        "total_selected_rank": last["total_selected_rank"],
        "eff_x1e4": communication["eff_x1e4"],
        "run_dir": branch.name,
    }


def select_variants(rows: Sequence[dict], tolerance: float) -> tuple[dict, dict]:
    """(FLoRIST-O, FLoRIST-E) among the FLoRIST rows; see the module docstring for the rule."""
    florist = [row for row in rows if row["method"] == SWEPT]
    if not florist:
        raise FloristError("the sweep has no FLoRIST branch to choose from")
    sign = 1.0 if florist[0]["lower_is_better"] else -1.0
    optimal = min(florist, key=lambda row: (sign * row["metric"], row["downlink_bytes_total"], row["threshold"]))
    competitive = [row for row in florist if sign * (row["metric"] - optimal["metric"]) <= tolerance + 1e-12]
    efficient = min(competitive, key=lambda row: (row["downlink_bytes_total"], row["threshold"]))
    return optimal, efficient


def run_sweep(recipe, thresholds: Sequence[float], *, baselines: Sequence[str] = (), criterion: str = HELDOUT_LOSS,
              tolerance: float = DEFAULT_TOLERANCE, force: bool = False, console=None) -> Path:
    """Run (or resume) every branch, then choose FLoRIST-O and FLoRIST-E; returns the sweep directory."""
    from rich.console import Console

    from florist_hf import distributed
    from florist_hf.recipe import client_training_view
    from florist_hf.runner import run_federation

    console = console or Console()
    thresholds = parse_thresholds(list(thresholds))
    baselines = parse_baselines(baselines)
    chosen = parse_criterion(criterion, recipe)
    if not (tolerance >= 0):
        raise FloristError(f"--tolerance {tolerance}: must be ≥ 0 (in the criterion's unit)")
    if chosen.task is None:
        from florist_hf.data import prepare_client_data

        if not prepare_client_data(recipe)[1]:  # known before any branch trains
            raise FloristError(
                "--criterion heldout_loss: the recipe's data has no held-out records; set data.holdout_per_label above 0 "
                "(or a layout with a test file), or pick --criterion TASK:METRIC"
            )
    root = Path(recipe.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    branches = sweep_branches(recipe, thresholds, baselines)
    console.print(
        f"[bold]sweep[/] of {recipe.name}: τ ∈ {{{', '.join(f'{t:g}' for t in thresholds)}}}"
        + (f" and {', '.join(baselines)}" if baselines else "") + f", {len(branches)} branches -> {root}"
    )
    trained_round_one: dict[str, Path] = {}  # client-training view -> the branch that trains round 1
    rows = []
    main = distributed.is_main_process()  # under accelerate launch every process runs the sweep
    for branch in branches:
        view = json.dumps(client_training_view(branch.recipe), sort_keys=True)
        source = trained_round_one.setdefault(view, branch.run_dir)
        if source != branch.run_dir and main:
            shared = share_round_one(source, branch.run_dir)
            if shared:
                console.print(f"{branch.name}: round 1's {shared} client adapters shared from {source.name}")
        distributed.wait_for_everyone()  # the links are in place before any process plans round 1
        console.rule(branch.name)
        run_federation(branch.recipe, force=force, console=console)
        rows.append(branch_row(branch, chosen))
    if not main:
        return root
    optimal, efficient = select_variants(rows, tolerance)
    record = {
        "format": SWEEP_FORMAT,
        "version": 1,
        "name": recipe.name,
        "criterion": chosen.name,
        "lower_is_better": rows[0]["lower_is_better"],
        "tolerance": tolerance,
        "thresholds": thresholds,
        "baselines": baselines,
        "rows": rows,
        "optimal": optimal["threshold"],
        "efficient": efficient["threshold"],
        "branches": {"optimal": optimal["branch"], "efficient": efficient["branch"]},
        "rule": (
            f"optimal: the best {chosen.name}; efficient: the least downlink among the τ within {tolerance:g} "
            "of the optimal value (ties: the lower τ)"
        ),
    }
    write_json_atomic(root / SWEEP_RECORD, record)
    write_text_atomic(root / SWEEP_TABLE, sweep_table(record))
    plot_sweep(record, root / SWEEP_PLOT)
    console.print(sweep_table(record), markup=False, highlight=False)
    return root


def sweep_table(record: dict) -> str:
    """sweep.md: the paper's table shape (the criterion and Eff per τ), O and E marked."""
    criterion = record["criterion"]
    lines = [
        f"# τ sweep: {record['name']}",
        "",
        f"Criterion: {criterion} ({'lower' if record['lower_is_better'] else 'higher'} is better). "
        f"FLoRIST-O: τ = {record['optimal']:g}; FLoRIST-E: τ = {record['efficient']:g} ({record['rule']}).",
        "",
        f"| method | τ | {criterion} | Eff (×10⁻⁴) | total selected rank | downlink bytes | uplink bytes | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        marks = []
        if row["branch"] == record["branches"]["optimal"]:
            marks.append("FLoRIST-O")
        if row["branch"] == record["branches"]["efficient"]:
            marks.append("FLoRIST-E")
        threshold = "" if row["threshold"] is None else f"{row['threshold']:g}"
        lines.append(
            f"| {row['method']} | {threshold} | {row['metric']:.4f} | {row['eff_x1e4']:.2f} | {row['total_selected_rank']} "
            f"| {row['downlink_bytes_total']:,} | {row['uplink_bytes_total']:,} | {' '.join(marks)} |"
        )
    return "\n".join(lines) + "\n"


def plot_sweep(record: dict, out_file: Path) -> None:
    """The criterion against downlink bytes, one point per branch, O and E marked."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    florist = [row for row in record["rows"] if row["method"] == SWEPT]
    axes.plot([row["downlink_bytes_total"] for row in florist], [row["metric"] for row in florist], "o-", label="FLoRIST")
    for row in florist:
        axes.annotate(f"τ={row['threshold']:g}", (row["downlink_bytes_total"], row["metric"]), textcoords="offset points",
                      xytext=(4, 4), fontsize=8)
    for row in record["rows"]:
        if row["method"] != SWEPT:
            axes.plot(row["downlink_bytes_total"], row["metric"], "s", label=row["method"])
    for key, marker, label in (("optimal", "*", "FLoRIST-O"), ("efficient", "D", "FLoRIST-E")):
        row = next(row for row in record["rows"] if row["branch"] == record["branches"][key])
        axes.plot(row["downlink_bytes_total"], row["metric"], marker, markersize=14, fillstyle="none", label=label)
    axes.set_xlabel("downlink bytes, all rounds")
    axes.set_ylabel(record["criterion"])
    axes.set_title(f"τ sweep: {record['name']}")
    axes.legend(fontsize=8)
    figure.tight_layout()
    fd, temp_name = tempfile.mkstemp(prefix=f".{out_file.name}.", suffix=".png", dir=out_file.parent)
    os.close(fd)
    try:
        figure.savefig(temp_name, dpi=120)
        os.replace(temp_name, out_file)
    finally:
        plt.close(figure)
        Path(temp_name).unlink(missing_ok=True)


def picked_branch(sweep_dir: Path, pick: str) -> tuple[Path, dict]:
    """The run directory of the sweep's ``optimal`` or ``efficient`` branch, and how it was chosen."""
    record_file = Path(sweep_dir) / SWEEP_RECORD
    if not record_file.is_file():
        raise FloristError(f"{sweep_dir}: no {SWEEP_RECORD}; --pick takes the directory of a finished `florist-hf sweep`")
    if pick not in ("optimal", "efficient"):
        raise FloristError(f"--pick {pick!r}: choose optimal or efficient")
    record = json.loads(record_file.read_text())
    branch = record["branches"][pick]
    row = next(row for row in record["rows"] if row["branch"] == branch)
    variant = "FLoRIST-O" if pick == "optimal" else "FLoRIST-E"
    others = ", ".join(f"{t:g}" for t in record["thresholds"])
    selection = {
        "variant": variant,
        "threshold": row["threshold"],
        "criterion": record["criterion"],
        "value": row["metric"],
        "thresholds": record["thresholds"],
        "rule": record["rule"],
        "text": (
            f"{variant}: τ = {row['threshold']:g}, chosen from a sweep of τ ∈ {{{others}}} by {record['criterion']} "
            f"({row['metric']:.4f}); rule: {record['rule']}."
        ),
    }
    return Path(sweep_dir) / row["run_dir"], selection
