"""Run reports: loss, selected-rank, energy and traffic figures plus a Markdown summary of a run directory.

Figures are drawn on matplotlib ``Figure`` objects with the Agg canvas directly, never through
pyplot, so reports render headless and leave no global figure state behind.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from florist_hf.errors import FloristError
from florist_hf.io_utils import atomic_directory
from florist_hf.rundir import METRICS_FILE, ROUNDS_DIR, RUN_SUMMARY, final_sidecar_path, read_json, read_metrics

REPORT_DIR = "report"

LOSS_PLOT = "loss.png"
RANKS_PLOT = "selected_ranks.png"
ENERGY_PLOT = "energy.png"
BYTES_PLOT = "bytes.png"
SUMMARY = "summary.md"

#: Sidecar module names are full PEFT names such as ``base_model.model.model.layers.3.self_attn.q_proj``.
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_DPI = 120
_MAX_LEGEND_CLIENTS = 10


@dataclass
class RunRecord:
    """What a run directory holds, read once: the run record, the metric log and the final sidecar."""

    run_dir: Path
    run: dict
    metrics: list[dict]
    #: The sidecar of the final global adapter, or of the last aggregated round; None before round 1 ends.
    sidecar: dict | None
    sidecar_path: Path | None
    #: What the report calls the run: the recipe's name, or where runs share one, their directories (`distinct_names`).
    name: str = ""

    @property
    def sidecar_origin(self) -> str:
        """Where the sidecar was read: ``round <t>`` for rounds/<t>/global/, else ``final adapter``."""
        round_dir = self.sidecar_path.parent.parent
        return f"round {round_dir.name}" if round_dir.parent.name == ROUNDS_DIR else "final adapter"

    @property
    def label(self) -> str:
        return f"{self.run.get('method', '?')} ({self.name or self.run.get('name') or self.run_dir.name})"

    def client_records(self) -> list[dict]:
        return [record for record in self.metrics if record.get("kind") == "client"]

    def round_records(self) -> list[dict]:
        return sorted((r for r in self.metrics if r.get("kind") == "round"), key=lambda r: r["round"])


def load_run(run_dir: str | os.PathLike) -> RunRecord:
    run_dir = Path(run_dir)
    run = read_json(run_dir / RUN_SUMMARY)
    metrics = read_metrics(run_dir / METRICS_FILE)
    sidecar_path = final_sidecar_path(run_dir, run)
    sidecar = read_json(sidecar_path) if sidecar_path is not None else None
    return RunRecord(run_dir, run, metrics, sidecar, sidecar_path)


def distinct_names(records: Sequence[RunRecord]) -> None:
    """Name every run by its recipe's name; where several runs share one (the same recipe run
    twice), by its run directory's name, or by its whole path where those are shared too."""
    namers = (lambda r: r.run.get("name") or r.run_dir.name, lambda r: r.run_dir.name, lambda r: str(r.run_dir))
    for namer in namers:
        names = [namer(record) for record in records]
        if len(set(names)) == len(names):
            break
    for record, name in zip(records, names):
        record.name = name


def module_position(module_name: str, source: Path) -> tuple[int, str]:
    """(layer index, short module name) of a sidecar module, e.g. (3, "q_proj")."""
    match = _LAYER_INDEX.search(module_name)
    if match is None:
        raise FloristError(f"{source}: module {module_name!r} has no 'layers.<i>.' in its name; re-run the aggregation")
    return int(match[1]), module_name.rsplit(".", 1)[-1]


def selected_ranks(sidecar: Mapping) -> dict[str, int]:
    return {name: int(module["selected_rank"]) for name, module in sidecar["modules"].items()}


def rank_summary_by_module(ranks: Mapping[str, int], source: Path) -> dict[str, dict]:
    """min / median / max / total selected rank per short module name across layers, plus ``all``."""
    grouped: dict[str, list[int]] = {}
    for name, rank in ranks.items():
        grouped.setdefault(module_position(name, source)[1], []).append(rank)
    grouped["all"] = list(ranks.values())
    return {
        short_name: {"min": min(values), "median": statistics.median(values), "max": max(values), "total": sum(values)}
        for short_name, values in grouped.items()
    }


def _byte_scale(largest: float) -> tuple[float, str]:
    """Decimal units, as network traffic is usually quoted: 1.5 MB = 1.5e6 bytes."""
    exponent = min(int(math.log10(largest) // 3), 3) if largest >= 1 else 0
    return 1000.0**exponent, ("B", "kB", "MB", "GB")[exponent]


def format_bytes(num_bytes: float) -> str:
    scale, unit = _byte_scale(num_bytes)
    return f"{num_bytes:.0f} B" if unit == "B" else f"{num_bytes / scale:.2f} {unit}"


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_selected_ranks(ranks: Mapping[str, int], source: Path, out_path: Path, *, title: str) -> Path:
    """Heatmap of the selected rank per layer (rows) and module (columns), each cell annotated."""
    positions = {name: module_position(name, source) for name in ranks}
    layers = sorted({layer for layer, _ in positions.values()})
    module_names = sorted({short for _, short in positions.values()})
    grid = np.full((len(layers), len(module_names)), np.nan)
    for name, (layer, short) in positions.items():
        grid[layers.index(layer), module_names.index(short)] = ranks[name]

    figure = _new_figure(max(5.0, 1.6 + 1.1 * len(module_names)), 1.8 + 0.32 * len(layers))
    axes = figure.subplots()
    image = axes.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    for row, column in zip(*np.nonzero(~np.isnan(grid))):
        value = grid[row, column]
        text_color = "white" if value < 0.6 * np.nanmax(grid) else "black"
        axes.text(column, row, f"{value:.0f}", ha="center", va="center", fontsize=7, color=text_color)
    axes.set_xticks(range(len(module_names)), module_names, rotation=30, ha="right")
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set_xlabel("module")
    axes.set_ylabel("layer")
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label="selected rank")
    figure.savefig(out_path)
    return out_path


def plot_loss(record: RunRecord, out_path: Path) -> Path:
    loss_figure(record).savefig(out_path)
    return out_path


def loss_figure(record: RunRecord) -> Figure:
    """Each client's training loss per round (dots, side by side), their mean, and the global model's
    held-out loss after each round; one tick per round, so that a one-round run reads as well."""
    by_client: dict[int, list[tuple[int, float]]] = {}
    for client_record in record.client_records():
        by_client.setdefault(int(client_record["client"]), []).append((client_record["round"], client_record["loss"]))
    heldout = [(r["round"], r["heldout_loss"]) for r in record.round_records() if r.get("heldout_loss") is not None]

    figure = _new_figure(6.4, 4.0)
    axes = figure.subplots()
    clients = sorted(by_client)
    # The clients of a round side by side within ±0.2 of its tick, so that none hides another.
    spread = 0.4 / max(len(clients), 1)
    for position, client in enumerate(clients):
        rounds, losses = zip(*sorted(by_client[client]))
        offset = (position - (len(clients) - 1) / 2) * spread
        axes.plot([r + offset for r in rounds], losses, marker="o", markersize=5, linewidth=0.8, alpha=0.75,
                  label=f"client {client}")
    by_round: dict[int, list[float]] = {}
    for points in by_client.values():
        for round_index, loss in points:
            by_round.setdefault(round_index, []).append(loss)
    if by_round:
        rounds = sorted(by_round)
        axes.plot(rounds, [statistics.fmean(by_round[r]) for r in rounds], color="black", linewidth=2, marker="_",
                  markersize=22, markeredgewidth=2.5, label="clients' mean")
    if heldout:
        rounds, losses = zip(*heldout)
        axes.plot(rounds, losses, color="crimson", linestyle="--", linewidth=1.5, marker="D", markersize=7,
                  label="held-out (global model)")
    # A legend with dozens of clients would hide the curves.
    if len(by_client) <= _MAX_LEGEND_CLIENTS:
        axes.legend(fontsize=7)
    every_round = sorted(set(by_round) | {r for r, _ in heldout})
    if every_round:
        axes.set_xlim(every_round[0] - 0.5, every_round[-1] + 0.5)
        if len(every_round) <= 20:
            axes.set_xticks(every_round)
        else:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("round")
    axes.set_ylabel("loss (cross-entropy per token)")
    axes.set_title(f"Loss per round: {record.label}")
    axes.grid(alpha=0.3)
    return figure


def plot_energy(sidecar: Mapping, threshold: float | None, source: Path, out_path: Path, *, title: str) -> Path:
    """Energy E(j) = cumsum(σ²)/sum(σ²) per module, coloured by module type, with τ and the selected ranks."""
    figure = _new_figure(6.4, 4.0)
    axes = figure.subplots()
    colors: dict[str, str] = {}
    for name, module in sorted(sidecar["modules"].items()):
        if not module.get("singular_values"):
            continue
        squared = np.asarray(module["singular_values"], dtype=float) ** 2
        # A streaming tolerance's dropped energy counts in the total, as when τ selected the rank.
        dropped = (module.get("streaming") or {}).get("discarded_energy", 0.0)
        total = squared.sum() * (1.0 + dropped)
        energy = np.cumsum(squared) / total if total > 0 else np.ones_like(squared)
        short_name = module_position(name, source)[1]
        color = colors.setdefault(short_name, f"C{len(colors) % 10}")
        components = np.arange(1, energy.size + 1)
        axes.plot(components, energy, color=color, linewidth=0.8, alpha=0.5)
        selected = min(int(module["selected_rank"]), energy.size)
        axes.plot(selected, energy[selected - 1], "o", color=color, markersize=3)
    for short_name, color in colors.items():
        axes.plot([], [], color=color, label=short_name)
    if threshold is not None:
        axes.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"τ = {threshold:g}")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("component j (dots: selected rank)")
    axes.set_ylabel("energy kept E(j)")
    axes.set_ylim(0, 1.02)
    axes.set_title(title)
    axes.legend(fontsize=7, loc="lower right")
    axes.grid(alpha=0.3)
    figure.savefig(out_path)
    return out_path


def communication_totals(record: RunRecord) -> dict:
    """Uplink / downlink bytes and Eff of the whole run: run.json's totals, else summed from the round log."""
    communication = record.run.get("communication")
    if communication:
        return communication
    rounds = record.round_records()
    return {
        "uplink_bytes_total": sum(r.get("uplink_bytes_total", 0) for r in rounds),
        "downlink_bytes_total": sum(r.get("downlink_bytes_total", 0) for r in rounds),
        # Eff describes one broadcast; the last round's is the final global adapter's.
        "eff_x1e4": rounds[-1].get("eff_x1e4") if rounds else None,
    }


def plot_bytes(records: Sequence[RunRecord], out_path: Path) -> Path:
    """One run: uplink/downlink bars per round. Several runs: one bar group (run totals) per method."""
    figure = _new_figure(6.4, 4.0)
    axes = figure.subplots()
    if len(records) == 1:
        rounds = records[0].round_records()
        group_labels = [str(r["round"]) for r in rounds]
        uplink = [r.get("uplink_bytes_total", 0) for r in rounds]
        downlink = [r.get("downlink_bytes_total", 0) for r in rounds]
        axes.set_xlabel("round")
        axes.set_title(f"Traffic per round: {records[0].label}")
    else:
        totals = [communication_totals(record) for record in records]
        group_labels = [record.label.replace(" (", "\n(") for record in records]
        uplink = [total.get("uplink_bytes_total", 0) for total in totals]
        downlink = [total.get("downlink_bytes_total", 0) for total in totals]
        axes.set_title("Total traffic per method")
    scale, unit = _byte_scale(max(uplink + downlink, default=0))
    positions = np.arange(len(group_labels))
    bar_width = 0.38
    axes.bar(positions - bar_width / 2, np.asarray(uplink) / scale, bar_width, label="uplink (clients → server)")
    axes.bar(positions + bar_width / 2, np.asarray(downlink) / scale, bar_width, label="downlink (server → clients)")
    axes.set_xticks(positions, group_labels, fontsize=8)
    axes.set_ylabel(unit)
    axes.legend(fontsize=7)
    axes.grid(axis="y", alpha=0.3)
    figure.savefig(out_path)
    return out_path


@dataclass(frozen=True)
class EvaluationRow:
    task: str
    metric: str
    #: lm-eval's filter (``acc,none`` is metric ``acc``, filter ``none``); "" when the key has none.
    filter_name: str
    value: float
    stderr: float | None

    @property
    def label(self) -> str:
        """The metric's name, with any filter other than lm-eval's default ``none`` in brackets."""
        return self.metric if self.filter_name in ("", "none") else f"{self.metric} ({self.filter_name})"


def evaluation_rows(run: Mapping) -> list[EvaluationRow]:
    """One row per numeric metric of run.json's evaluation, paired with its ``<metric>_stderr``."""
    rows = []
    for task, metrics in ((run.get("evaluation") or {}).get("tasks") or {}).items():
        for key, value in metrics.items():
            if "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, separator, filter_name = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr{separator}{filter_name}")
            stderr = float(stderr) if isinstance(stderr, (int, float)) else None
            rows.append(EvaluationRow(task, metric, filter_name, float(value), stderr))
    return rows


def _evaluation_columns(run: Mapping) -> dict[str, float]:
    return {f"{row.task}/{row.label}": row.value for row in evaluation_rows(run)}


def _summary_row(record: RunRecord, eval_columns: Sequence[str]) -> list[str]:
    run = record.run
    totals = communication_totals(record)
    rounds = record.round_records()
    last_round = max((r["round"] for r in record.client_records()), default=None)
    last_losses = [r["loss"] for r in record.client_records() if r["round"] == last_round]
    if record.sidecar is not None:
        total_rank = str(record.sidecar.get("total_rank", sum(selected_ranks(record.sidecar).values())))
    elif rounds:
        total_rank = str(rounds[-1].get("total_selected_rank", "–"))
    else:
        total_rank = "–"
    threshold = run.get("threshold")
    eff = totals.get("eff_x1e4")
    evaluation = _evaluation_columns(run)
    heldout = [r["heldout_loss"] for r in rounds if r.get("heldout_loss") is not None]
    return [
        record.name or str(run.get("name") or record.run_dir.name),
        str(run.get("method", "?")),
        "–" if threshold is None else f"{threshold:g}",
        f"{run.get('rounds_completed', len(rounds))}/{run.get('rounds', '?')}",
        f"{run.get('clients_per_round', '?')}/{run.get('num_clients', '?')}",
        ", ".join(str(rank) for rank in run.get("client_ranks", [])) or "–",
        total_rank,
        f"{statistics.fmean(last_losses):.4f}" if last_losses else "–",
        f"{heldout[-1]:.4f}" if heldout else "–",
        format_bytes(totals.get("uplink_bytes_total", 0)),
        format_bytes(totals.get("downlink_bytes_total", 0)),
        "–" if eff is None else f"{eff:.3f}",
        *(f"{evaluation[column]:.4f}" if column in evaluation else "–" for column in eval_columns),
    ]


def _summary_markdown(records: Sequence[RunRecord], figures: Sequence[Path], notes: Sequence[str]) -> str:
    eval_columns = sorted({column for record in records for column in _evaluation_columns(record.run)})
    header = [
        "run", "method", "τ", "rounds", "clients per round/total", "client ranks", "total rank",
        "final loss", "held-out loss", "uplink", "downlink", "Eff (×10⁻⁴)", *eval_columns,
    ]
    lines = [
        f"# Run report: {records[0].name or records[0].run.get('name') or records[0].run_dir.name}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(_summary_row(record, eval_columns)) + " |" for record in records),
        "",
        "`final loss` is the mean client training loss of the last round; `held-out loss` is the global model's"
        " loss on the held-out test records after the last round (– where the run holds none out); `total rank`"
        " sums the selected rank of every module of the final global adapter.",
        "",
        *_per_round_markdown(records[0]),
        "## Figures",
        "",
        *(f"![{figure.stem}]({figure.name})" for figure in figures),
    ]
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _per_round_markdown(record: RunRecord) -> list[str]:
    """The run's losses round by round: its clients' mean training loss and the global model's held-out loss."""
    by_round: dict[int, list[float]] = {}
    for client_record in record.client_records():
        by_round.setdefault(client_record["round"], []).append(client_record["loss"])
    heldout = {r["round"]: r.get("heldout_loss") for r in record.round_records()}
    rounds = sorted(set(by_round) | set(heldout))
    if not rounds:
        return []
    return [
        f"## Loss per round: {record.name or record.run_dir.name}",
        "",
        "| round | clients' mean training loss | held-out loss |",
        "|---|---|---|",
        *(f"| {r} | {_number(statistics.fmean(by_round[r]) if r in by_round else None)} | {_number(heldout.get(r))} |"
          for r in rounds),
        "",
    ]


def write_report(run_dir: str | os.PathLike, *, compare: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Write RUN_DIR/report/ (figures + summary.md) atomically and return the written paths.

    ``compare`` adds other run directories to the traffic figure and the summary table, e.g. the
    same federation aggregated with FedIT and FLoRA.
    """
    record = load_run(run_dir)
    records = [record, *(load_run(other) for other in compare)]
    distinct_names(records)
    report_dir = record.run_dir / REPORT_DIR
    notes = []
    with atomic_directory(report_dir, overwrite=True) as staging:
        figures = [plot_loss(record, staging / LOSS_PLOT)]
        if record.sidecar is None:
            notes.append("No aggregation sidecar yet (no round has finished), so no rank or energy figure.")
        else:
            round_title = f"{record.label}, {record.sidecar_origin}"
            figures.append(
                plot_selected_ranks(
                    selected_ranks(record.sidecar), record.sidecar_path, staging / RANKS_PLOT,
                    title=f"Selected rank: {round_title}",
                )
            )
            if any(module.get("singular_values") for module in record.sidecar["modules"].values()):
                figures.append(
                    plot_energy(
                        record.sidecar, record.sidecar.get("threshold", record.run.get("threshold")),
                        record.sidecar_path, staging / ENERGY_PLOT, title=f"Singular-value energy: {round_title}",
                    )
                )
            else:
                notes.append(f"{record.sidecar.get('method', 'This method')} records no singular values, so no energy figure.")
        figures.append(plot_bytes(records, staging / BYTES_PLOT))
        (staging / SUMMARY).write_text(_summary_markdown(records, figures, notes))
    return [report_dir / figure.name for figure in figures] + [report_dir / SUMMARY]
