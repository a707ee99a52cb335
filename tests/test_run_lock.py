"""One process per run directory: a second `florist-hf run` on the same output_dir stops at once."""

import json
import os
import signal
import subprocess
import sys
import time

from helpers import write_recipe
from typer.testing import CliRunner

from florist_hf.cli import app
from florist_hf.rundir import RUN_LOCK

runner = CliRunner()


def wait_for(condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.1)


def test_a_second_run_on_the_same_directory_stops_with_one_line_and_the_first_finishes_alone(tmp_path):
    recipe_file = write_recipe(tmp_path, rounds=3)
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen([sys.executable, "-m", "florist_hf", "run", str(recipe_file)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (run_dir / RUN_LOCK).is_file() and (run_dir / RUN_LOCK).read_text().strip())
        second = runner.invoke(app, ["run", str(recipe_file)])
        assert second.exit_code == 2, second.output
        message = " ".join(second.output.split())
        assert f"{run_dir}: in use by florist-hf process {first.pid}" in message, second.output
        assert "use another output_dir" in message
    finally:
        output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["kind"], r["round"], r.get("client")) for r in records]
    assert len(keys) == len(set(keys))  # no client trained twice
    assert json.loads((run_dir / "run.json").read_text())["rounds_completed"] == 3


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    recipe_file = write_recipe(tmp_path, rounds=1)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from florist_hf.rundir import RunDirectoryLock; "
        f"lock = RunDirectoryLock(Path({str(run_dir)!r})); lock.acquire(); print('locked', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    assert runner.invoke(app, ["run", str(recipe_file)]).exit_code == 2
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    result = runner.invoke(app, ["run", str(recipe_file)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "global_adapter").is_dir()
