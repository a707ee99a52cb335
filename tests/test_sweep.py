"""`florist-hf sweep`: every τ from one round-1 training, each branch a standalone run, O and E chosen."""

import json

import pytest
from helpers import delta_weights, quiet_console, relative_error, write_recipe
from typer.testing import CliRunner

from florist_hf.cli import app
from florist_hf.errors import FloristError
from florist_hf.recipe import load_recipe
from florist_hf.runner import run_federation
from florist_hf.sweep import parse_thresholds, run_sweep, select_variants

runner = CliRunner()
HELDOUT = {"partition": "dirichlet", "holdout_per_label": 2, "min_client_size": 10, "cutoff_len": 256}


def count_client_trainings(monkeypatch) -> list:
    from florist_hf.clients import run as client

    trained = []
    original = client.run_client_round

    def counted(recipe, plan, *args, **kwargs):
        trained.append((recipe.name, plan.round, plan.client_id))
        return original(recipe, plan, *args, **kwargs)

    monkeypatch.setattr(client, "run_client_round", counted)
    return trained


def test_sweep_trains_round_one_once_and_each_branch_is_the_standalone_run(tmp_path, monkeypatch):
    trained = count_client_trainings(monkeypatch)
    recipe_file = write_recipe(tmp_path, ranks=(4, 2), rounds=2, data=HELDOUT)
    recipe = load_recipe(recipe_file, [f"output_dir={tmp_path / 'sweep'}"])
    sweep_dir = run_sweep(recipe, [0.9, 0.5], baselines=["flora"], console=quiet_console())

    # Round 1: the 2 clients once for all three branches; round 2: each branch its own 2.
    assert sorted(r for _, r, _ in trained) == [1] * 2 + [2] * 6
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert [row["branch"] for row in record["rows"]] == ["tau_0.5", "tau_0.9", "flora"]
    for row in record["rows"]:
        assert {"threshold", "metric", "downlink_bytes_total", "uplink_bytes_total", "total_selected_rank", "eff_x1e4"} <= set(row)
        assert row["metric"] > 0 and row["downlink_bytes_total"] > 0
    assert record["optimal"] in (0.5, 0.9) and record["efficient"] in (0.5, 0.9)
    assert record["criterion"] == "heldout_loss" and record["lower_is_better"] is True
    assert "FLoRIST-O" in (sweep_dir / "sweep.md").read_text()
    assert (sweep_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The τ = 0.5 branch is what `run` at τ = 0.5 gives on its own, round 1 included.
    standalone = run_federation(
        load_recipe(recipe_file, ["federation.threshold=0.5", f"output_dir={tmp_path / 'alone'}"]), console=quiet_console()
    )
    for adapter in ("rounds/1/global", "global_adapter"):
        expected, got = delta_weights(standalone / adapter), delta_weights(sweep_dir / "tau_0.5" / adapter)
        assert all(relative_error(got[name], expected[name]) < 1e-6 for name in expected), adapter
    alone = [json.loads(line) for line in (standalone / "metrics.jsonl").read_text().splitlines()]
    assert record["rows"][0]["metric"] == pytest.approx([r for r in alone if r["kind"] == "round"][-1]["heldout_loss"], rel=1e-6)

    # A second call resumes everything: nothing trains again, the same choice is made.
    trained.clear()
    run_sweep(recipe, [0.9, 0.5], baselines=["flora"], console=quiet_console())
    assert trained == [] and json.loads((sweep_dir / "sweep.json").read_text()) == record

    result = runner.invoke(app, ["push", str(sweep_dir), "--repo-id", "me/pick", "--pick", "efficient",
                                 "--dry-run", str(tmp_path / "upload")])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "upload" / "README.md").read_text()
    assert f"FLoRIST-E: τ = {record['efficient']:g}, chosen from a sweep of τ ∈ {{0.5, 0.9}} by heldout_loss" in card


def test_sweep_shares_round_one_only_between_methods_whose_clients_train_alike(tmp_path, monkeypatch):
    trained = count_client_trainings(monkeypatch)
    recipe = load_recipe(write_recipe(tmp_path, ranks=(4, 2), rounds=1, data=HELDOUT), [f"output_dir={tmp_path / 'sweep'}"])
    run_sweep(recipe, [0.8], baselines=["fedit", "flexlora", "ffa"], console=quiet_console())
    # FLoRIST trains round 1 once; FedIT and FlexLoRA (both continue the shared init) once; FFA-LoRA once.
    assert len(trained) == 3 * 2


def test_fedsvd_shares_round_one_with_ffa_whose_clients_also_freeze_the_shared_init(tmp_path, monkeypatch):
    trained = count_client_trainings(monkeypatch)
    recipe = load_recipe(write_recipe(tmp_path, ranks=(4, 2), rounds=1, data=HELDOUT), [f"output_dir={tmp_path / 'sweep'}"])
    root = run_sweep(recipe, [0.8], baselines=["ffa", "fedsvd"], console=quiet_console())
    assert len(trained) == 2 * 2  # FLoRIST once; FFA-LoRA and FedSVD once for both
    record = json.loads((root / "sweep.json").read_text())
    assert [r["method"] for r in record["rows"]] == ["florist", "ffa", "fedsvd"]


def test_fedex_shares_round_one_with_fedit_whose_clients_train_alike(tmp_path, monkeypatch):
    trained = count_client_trainings(monkeypatch)
    recipe = load_recipe(write_recipe(tmp_path, ranks=(4, 4), rounds=1, data=HELDOUT), [f"output_dir={tmp_path / 'sweep'}"])
    root = run_sweep(recipe, [0.8], baselines=["fedit", "fedex"], console=quiet_console())
    assert len(trained) == 2 * 2  # FLoRIST once; FedIT and FedEx-LoRA once for both
    rows = {r["method"]: r for r in json.loads((root / "sweep.json").read_text())["rows"]}
    assert rows["fedex"]["downlink_bytes_total"] > rows["fedit"]["downlink_bytes_total"]  # + the residual's factors


def row(threshold, metric, downlink, method="florist", lower=True):
    return {"branch": f"tau_{threshold}", "method": method, "threshold": threshold, "metric": metric,
            "downlink_bytes_total": downlink, "lower_is_better": lower}


def test_optimal_is_the_best_value_and_efficient_the_least_downlink_within_the_tolerance():
    rows = [row(0.8, 1.215, 100), row(0.85, 1.205, 150), row(0.9, 1.200, 200), row(0.95, 1.201, 300),
            row(None, 1.100, 900, method="flora")]  # baselines are listed, never chosen
    optimal, efficient = select_variants(rows, tolerance=0.01)
    assert optimal["threshold"] == 0.9 and efficient["threshold"] == 0.85
    assert select_variants(rows, tolerance=0.02)[1]["threshold"] == 0.8
    assert select_variants(rows, tolerance=0.0)[1]["threshold"] == 0.9  # E falls back to O
    accuracy = [row(0.8, 0.40, 100, lower=False), row(0.87, 0.45, 180, lower=False), row(0.9, 0.44, 200, lower=False)]
    optimal, efficient = select_variants(accuracy, tolerance=0.05)
    assert optimal["threshold"] == 0.87 and efficient["threshold"] == 0.8


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--thresholds", "0.8,1.2"], "τ = 1.2 is outside (0, 1]"),
        (["--thresholds", "0"], "τ = 0 is outside (0, 1]"),
        (["--thresholds", " , "], "--thresholds: empty"),
        (["--thresholds", "0.8,high"], "'high' is not a number"),
        (["--thresholds", "0.8", "--criterion", "mmlu:acc"], "the recipe has no evaluation section"),
        (["--thresholds", "0.8", "--criterion", "mmlu:acc", "--set", "evaluation.tasks=[sums]"],
         "task 'mmlu' is not evaluated by the recipe"),
        (["--thresholds", "0.8", "--criterion", "accuracy"], "expected heldout_loss or TASK:METRIC"),
        (["--thresholds", "0.8", "--baselines", "fedavg"], "unknown method 'fedavg'"),
        (["--thresholds", "0.8"], "the recipe's data has no held-out records"),  # iid, no hold-out
    ],
)
def test_bad_sweep_arguments_are_one_line_errors_before_any_training(tmp_path, args, expected):
    recipe_file = write_recipe(tmp_path, rounds=1)
    result = runner.invoke(app, ["sweep", str(recipe_file), *args])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_thresholds_parse_sorted_and_distinct():
    assert parse_thresholds("0.95, 0.8,0.85,0.8") == [0.8, 0.85, 0.95]
    with pytest.raises(FloristError, match="empty"):
        parse_thresholds([])


def test_a_streaming_recipe_sweeps_its_thresholds_streaming_and_its_baselines_stacked(tmp_path):
    from florist_hf.recipe import Recipe
    from florist_hf.sweep import sweep_branches

    recipe = load_recipe(write_recipe(tmp_path), ["federation.aggregation=streaming", "federation.streaming_tolerance=0.001"])
    branches = {branch.name: branch.recipe for branch in sweep_branches(recipe, [0.8, 0.9], baselines=["fedit", "flora"])}
    assert {name: r.federation.aggregation for name, r in branches.items()} == {
        "tau_0.8": "streaming", "tau_0.9": "streaming", "fedit": "stacked", "flora": "stacked"}
    for branch in branches.values():  # each branch's recipe.json reads back as a valid recipe
        assert Recipe.model_validate(json.loads(branch.model_dump_json())) == branch
