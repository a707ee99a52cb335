"""Federation-level tracking: one TensorBoard run, read back from its event files."""

import json

from helpers import quiet_console, write_recipe
from typer.testing import CliRunner

from florist_hf.cli import app
from florist_hf.recipe import load_recipe
from florist_hf.runner import run_federation

HELDOUT = {"partition": "dirichlet", "holdout_per_label": 2, "min_client_size": 10, "cutoff_len": 256}


def read_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [run] = {path.parent for path in folder.rglob("events.out.tfevents.*")}  # one tracker run per federation
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return scalars, events.Tags()["images"]


def test_one_tensorboard_run_holds_client_curves_and_round_metrics_on_one_step(tmp_path):
    training = {"max_steps": 3, "logging_steps": 1}
    recipe = load_recipe(write_recipe(tmp_path, rounds=2, data=HELDOUT, training=training),
                         ["tracking.report_to=[tensorboard]"])
    run_dir = run_federation(recipe, console=quiet_console())
    scalars, images = read_events(run_dir / "tracking")

    # Every client's curve: 3 points a round, on the federation's step, never restarting at 0.
    for client in range(3):
        steps = [step for step, _ in scalars[f"train/client_{client}/loss"]]
        assert len(steps) == 6 and steps == sorted(steps) and len(set(steps)) == 6
    clients_in_order = [step for client in range(3) for step, _ in scalars[f"train/client_{client}/loss"][:3]]
    assert clients_in_order == list(range(1, 10))  # round 1: client 0 steps 1-3, client 1 steps 4-6, ...
    assert [step for step, _ in scalars["train/client_0/loss"][3:]] == [10, 11, 12]  # round 2 goes on from 9

    # Per round, at the step the round ended: the server's ranks, Eff, bytes, time and the held-out loss.
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in metrics if r["kind"] == "round"]
    assert [step for step, _ in scalars["train/server/total_selected_rank"]] == [9, 18]
    assert [value for _, value in scalars["train/server/total_selected_rank"]] == [r["total_selected_rank"] for r in rounds]
    assert [round(value, 4) for _, value in scalars["eval/heldout_loss"]] == [round(r["heldout_loss"], 4) for r in rounds]
    for tag in ("eff_x1e4", "uplink_bytes_total", "downlink_bytes_total", "server_seconds", "rank_max"):
        assert len(scalars[f"train/server/{tag}"]) == 2, tag
    assert {"server/selected_ranks", "server/energy"} <= set(images)


def test_report_to_in_the_training_section_is_refused_for_the_federation_level_setting(tmp_path):
    result = CliRunner().invoke(app, ["run", str(write_recipe(tmp_path, training={"report_to": "tensorboard"}))])
    assert result.exit_code == 2 and "use tracking.report_to" in result.output


def test_an_integration_that_is_not_installed_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["run", str(write_recipe(tmp_path, rounds=1)), "--set", "tracking.report_to=[clearml]"])
    assert result.exit_code == 2 and "tracking.report_to" in result.output and "Traceback" not in result.output
