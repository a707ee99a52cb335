"""The whole data flow through the CLI on one real run: recipe -> run -> report -> evaluate -> push."""

import json

import pytest
from conftest import write_sums_task
from huggingface_hub import ModelCard
from helpers import write_recipe
from typer.testing import CliRunner

from florist_hf.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    result = runner.invoke(app, ["run", str(write_recipe(root, method="florist", threshold=0.9, data={"holdout_per_label": 2, "cutoff_len": 256}))])
    assert result.exit_code == 0, result.output
    assert "global adapter:" in result.output
    return root / "run"


def test_run_records_heldout_loss_per_round(run_dir):
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["heldout_loss"] for r in rounds if r["kind"] == "round"]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)


def test_report_command_writes_plots(run_dir):
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    for name in ("loss.png", "selected_ranks.png", "energy.png", "bytes.png", "summary.md"):
        assert (run_dir / "report" / name).stat().st_size > 0


def test_push_dry_run_builds_a_loadable_model_card(run_dir, tmp_path):
    out = tmp_path / "upload"
    result = runner.invoke(app, ["push", str(run_dir), "--repo-id", "alice/tiny-florist", "--dry-run", str(out)])
    assert result.exit_code == 0, result.output
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and "florist" in card.data.tags
    assert (out / "adapter_model.safetensors").read_bytes() == (run_dir / "global_adapter" / "adapter_model.safetensors").read_bytes()


def test_evaluate_command_on_the_published_adapter(run_dir, tmp_path):
    write_sums_task(tmp_path, count=3)
    out = tmp_path / "results.json"
    result = runner.invoke(app, [
        "evaluate", "--base", str(run_dir / "base_model"), "--adapter", str(run_dir / "global_adapter"),
        "--tasks", "sums", "--include-path", str(tmp_path), "--device", "cpu", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    assert 0.0 <= json.loads(out.read_text())["results"]["sums"]["acc,none"] <= 1.0
