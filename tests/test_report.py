"""Run reports: headless PNG figures that read back, a summary table, and clear errors for missing records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.image
import pytest
from fake_run import write_run_dir

from florist_hf.errors import FloristError
from florist_hf.report import format_bytes, load_run, write_report

FIGURES = ["loss.png", "selected_ranks.png", "energy.png", "bytes.png"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_base) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    evaluation = {"tasks": {"mmlu": {"acc,none": 0.31, "acc_stderr,none": 0.01, "alias": "mmlu"}}}
    return {
        "florist": write_run_dir(root / "florist", tiny_base, evaluation=evaluation),
        "fedit": write_run_dir(root / "fedit", tiny_base, method="fedit", threshold=None, seed=1),
    }


@pytest.fixture
def run_dir(runs, tmp_path) -> Path:
    """A private copy, so a test may delete records without affecting the others."""
    return Path(shutil.copytree(runs["florist"], tmp_path / "run"))


def _assert_readable_png(path: Path) -> None:
    assert path.stat().st_size > 0
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.shape[2] in (3, 4)


def test_report_writes_figures_that_read_back_and_a_summary(run_dir):
    written = write_report(run_dir)

    report_dir = run_dir / "report"
    assert written == [report_dir / name for name in FIGURES] + [report_dir / "summary.md"]
    for figure in FIGURES:
        _assert_readable_png(report_dir / figure)
    summary = (report_dir / "summary.md").read_text()
    run = json.loads((run_dir / "run.json").read_text())
    final_total_rank = json.loads((run_dir / "global_adapter" / "aggregation.json").read_text())["total_rank"]
    assert "| dolly-florist | florist | 0.9 | 3/3 | 3/3 | 4, 4, 4 |" in summary
    assert f"| {final_total_rank} |" in summary
    assert format_bytes(run["communication"]["uplink_bytes_total"]) in summary
    assert "mmlu/acc |" in summary and "0.3100" in summary
    assert all(f"]({figure})" in summary for figure in FIGURES)


def test_report_compares_runs_in_the_traffic_figure_and_table(runs, run_dir):
    written = write_report(run_dir, compare=[runs["fedit"]])

    _assert_readable_png(run_dir / "report" / "bytes.png")
    summary = (run_dir / "report" / "summary.md").read_text()
    assert "| dolly-florist | florist |" in summary and "| dolly-fedit | fedit | – |" in summary
    assert len(written) == 5
    assert not (runs["fedit"] / "report").exists(), "compared runs are read, never written"


def test_report_replaces_a_previous_report(run_dir):
    write_report(run_dir)
    (run_dir / "report" / "stale.txt").write_text("from an older report")

    write_report(run_dir)

    assert sorted(path.name for path in (run_dir / "report").iterdir()) == sorted(FIGURES + ["summary.md"])


def test_method_without_singular_values_gets_no_energy_figure(runs, tmp_path):
    run_dir = Path(shutil.copytree(runs["fedit"], tmp_path / "fedit"))

    written = write_report(run_dir)

    assert [path.name for path in written] == ["loss.png", "selected_ranks.png", "bytes.png", "summary.md"]
    assert "no energy figure" in (run_dir / "report" / "summary.md").read_text()


def test_last_round_sidecar_is_used_when_the_global_adapter_has_none(run_dir):
    (run_dir / "global_adapter" / "aggregation.json").unlink()

    record = load_run(run_dir)
    written = write_report(run_dir)

    assert record.sidecar_path == run_dir / "rounds" / "3" / "global" / "aggregation.json"
    assert record.sidecar_origin == "round 3"
    assert run_dir / "report" / "selected_ranks.png" in written


@pytest.mark.parametrize("missing", ["run.json", "metrics.jsonl"])
def test_missing_run_record_is_a_florist_error_naming_the_file(run_dir, missing):
    (run_dir / missing).unlink()

    with pytest.raises(FloristError, match=rf"{missing}: not found"):
        write_report(run_dir)
    assert not (run_dir / "report").exists()


def test_corrupt_metrics_line_is_a_florist_error_naming_the_line(run_dir):
    with open(run_dir / "metrics.jsonl", "a") as metrics:
        metrics.write('{"kind": "client", "round": 4\n')

    with pytest.raises(FloristError, match=r"metrics\.jsonl:13: corrupt JSON line"):
        write_report(run_dir)


@pytest.fixture(scope="module")
def one_round_runs(tmp_path_factory) -> list[Path]:
    """The same one-round recipe, with held-out records, run into two directories (as a user would
    run it twice to compare)."""
    from helpers import write_recipe
    from typer.testing import CliRunner

    from florist_hf.cli import app

    root = tmp_path_factory.mktemp("one-round")
    recipe = write_recipe(root, rounds=1, data={"holdout_per_label": 1, "cutoff_len": 256})
    runs = []
    for name in ("first", "second"):
        result = CliRunner().invoke(app, ["run", str(recipe), "--set", f"output_dir={root / name}"])
        assert result.exit_code == 0, result.output
        runs.append(root / name)
    return runs


def test_one_round_loss_figure_has_a_tick_per_round_visible_points_and_the_heldout_loss(one_round_runs):
    from florist_hf.report import loss_figure

    record = load_run(one_round_runs[0])
    heldout = record.round_records()[0]["heldout_loss"]
    axes = loss_figure(record).axes[0]
    assert list(axes.get_xticks()) == [1]
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert {"client 0", "client 1", "client 2", "clients' mean", "held-out (global model)"} <= set(lines)
    assert all(line.get_marker() not in (None, "None", "") and line.get_markersize() >= 5 for line in lines.values())
    assert list(lines["held-out (global model)"].get_ydata()) == [heldout]
    client_x = [x for name, line in lines.items() if name.startswith("client ") for x in line.get_xdata()]
    assert len(set(client_x)) == 3 and all(0.5 < x < 1.5 for x in client_x)  # side by side, within round 1


def test_summary_holds_the_heldout_loss_and_compare_names_runs_of_one_recipe_apart(one_round_runs):
    first, second = one_round_runs
    write_report(first, compare=[second])
    summary = (first / "report" / "summary.md").read_text()
    heldout = load_run(first).round_records()[0]["heldout_loss"]
    assert "| held-out loss |" in summary and f"| {heldout:.4f} |" in summary
    assert "| first | florist |" in summary and "| second | florist |" in summary
    assert f"| 1 | " in summary and summary.count(f"{heldout:.4f}") >= 2  # the per-round table too
