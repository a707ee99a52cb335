"""Bad input as a user types it: one line naming the thing and the fix, a non-zero exit, and a run
directory left exactly as it was.

One table (peft's ``TEST_CASES`` style): a case is the command line, run through the CLI against a
finished run directory (a private copy per case), and what its one line must name. Every file of
that directory is hashed before and after. In the command lines ``{recipe}`` is the recipe the run
was made with, ``{run}`` the run directory, ``{clients}`` its round-1 client adapters, ``{file}`` a
regular file, ``{tmp}`` an empty folder of the case's own, and ``{unlabelled}``, ``{empty}``,
``{flora}`` data files that are wrong in the way their names say, ``{pairs}`` preference pairs (Anthropic/hh-rlhf's
schema) and ``{unpaired}`` the same with a pair that lacks its rejected answer (a YAML brace is written ``{{``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_recipe
from typer.testing import CliRunner

from florist_hf.cli import app

runner = CliRunner()

RUN = ["run", "{recipe}", "--set", "output_dir={run}"]

#: id -> (command line, what its one line must hold)
TEST_CASES: dict[str, tuple[list[str], list[str]]] = {
    # --- values inside training: / client_training:, checked when the recipe loads --------------
    "learning-rate-not-a-number": (
        [*RUN, "--set", "training.learning_rate=fast"],
        ["recipe.yaml: training.learning_rate: got 'fast'", "valid number"]),
    "client-batch-size-not-an-integer": (
        [*RUN, "--set", "client_training={{1: {{per_device_train_batch_size: 2.5}}}}"],
        ["recipe.yaml: client_training.1.per_device_train_batch_size: got 2.5", "valid integer"]),
    "learning-rate-negative": (
        [*RUN, "--set", "training.learning_rate=-1"], ["recipe.yaml: training.learning_rate: got -1", "greater than or equal to 0"]),
    "batch-size-zero": (
        [*RUN, "--set", "training.per_device_train_batch_size=0"],
        ["recipe.yaml: training.per_device_train_batch_size: got 0", "greater than or equal to 1"]),
    "gradient-accumulation-zero": (
        [*RUN, "--set", "training.gradient_accumulation_steps=0"], ["training.gradient_accumulation_steps: got 0"]),
    "adam-beta-one": ([*RUN, "--set", "training.adam_beta2=1"], ["training.adam_beta2: got 1", "less than 1"]),
    "training-key-misspelt": (
        [*RUN, "--set", "training.learnin_rate=1"],
        ["recipe.yaml: training.learnin_rate: not a TrainingArguments field"]),
    "scheduler-unknown": (
        [*RUN, "--set", "training.lr_scheduler_type=sometimes"],
        ["recipe.yaml: training: sometimes is not a valid SchedulerType"]),
    "two-settings-that-conflict": (
        [*RUN, "--set", "training.eval_strategy=steps", "--set", "training.logging_steps=0"],
        ["recipe.yaml: training: evaluation strategy", "logging_steps"]),
    "tracker-per-client": (
        [*RUN, "--set", "training.report_to=wandb"],
        ["recipe.yaml: training.report_to", "use tracking.report_to"]),
    "output-dir-per-client": (
        [*RUN, "--set", "training.output_dir=elsewhere"],
        ["recipe.yaml: training.output_dir: set by florist-hf per client"]),
    # --- the recipe's own schema --------------------------------------------------------------
    "section-key-misspelt": ([*RUN, "--set", "federation.roundz=2"], ["recipe.yaml: federation.roundz: unknown key"]),
    "rounds-not-a-number": ([*RUN, "--set", "federation.rounds=two"], ["recipe.yaml: federation.rounds", "'two'"]),
    "ranks-for-other-clients": ([*RUN, "--set", "lora.ranks=[4, 2]"], ["lora.ranks lists 2 values"]),
    "method-unknown": (
        [*RUN, "--set", "federation.method=fedavg"],
        ["recipe.yaml: federation.method: unknown aggregation method 'fedavg'; choose one of fedex, fedit"]),
    "streaming-for-fedit": (
        [*RUN, "--set", "federation.method=fedit", "--set", "federation.aggregation=streaming"],
        ["aggregation: streaming is FLoRIST's"]),
    "tolerance-without-streaming": (
        [*RUN, "--set", "federation.streaming_tolerance=0.01"], ["streaming_tolerance applies to aggregation: streaming only"]),
    "fedex-with-mixed-ranks": (
        [*RUN, "--set", "federation.method=fedex"], ["fedex keeps the global model exact only when every client continues"]),
    "fedex-sampling-clients": (
        [*RUN, "--set", "federation.method=fedex", "--set", "lora.ranks=[4, 4, 4]", "--set", "federation.clients_per_round=2"],
        ["fedex with federation.clients_per_round is not supported yet"]),
    "evaluation-limit-zero": ([*RUN, "--set", "evaluation={{limit: 0}}"], ["recipe.yaml: evaluation.limit"]),
    "set-without-a-value": ([*RUN, "--set", "federation.rounds"], ["--set 'federation.rounds': expected key=value"]),
    "recipe-not-found": (["run", "{tmp}/missing.yaml"], ["missing.yaml: recipe not found"]),
    "recipe-not-yaml": (["run", "{tmp}/broken.yaml"], ["broken.yaml: not valid YAML at line 2"]),
    # --- the data and the base, read before the run directory is touched -----------------------
    "data-file-missing": ([*RUN, "--set", "data.source=/nonexistent/data.json"], ["/nonexistent/data.json", "not found"]),
    "data-file-empty": ([*RUN, "--set", "data.source={empty}"], ["empty.json"]),
    "labels-missing-for-the-holdout": (
        [*RUN, "--set", "data.source={unlabelled}", "--set", "data.holdout_per_label=2"],
        ["unlabelled.json: 30 record(s) have no label", "data.holdout_per_label: 2 needs every record's label",
         "set data.fields.label", "or data.holdout_per_label: 0"]),
    "labels-missing-for-dirichlet": (
        [*RUN, "--set", "data.source={unlabelled}", "--set", "data.partition=dirichlet"],
        ["unlabelled.json: 30 record(s) have no label", "data.partition: dirichlet needs", "or data.partition: iid"]),
    "clients-too-small-for-dirichlet": (
        [*RUN, "--set", "data.max_samples_per_client=null", "--set", "data.partition=dirichlet",
         "--set", "data.min_client_size=400"], ["cannot give each of 3 clients 400 examples", "lower data.min_client_size"]),
    "flora-folder-one-level-too-deep": (
        [*RUN, "--set", "data.layout=flora", "--set", "data.source={flora}/3"],
        ["no 3-client split in", "set data.source to its parent"]),
    "base-model-folder-missing": (
        [*RUN, "--set", "model.name_or_path={tmp}/models/llama"], ["base model '{tmp}/models/llama': local path not found"]),
    "base-model-folder-holds-no-model": (
        [*RUN, "--set", "model.name_or_path={tmp}"], ["has no config.json, so it is not a saved model"]),
    # --- DPO clients and preference pairs ------------------------------------------------------
    "preference-pair-missing-rejected": (
        [*RUN, "--set", "client.trainer=dpo", "--set", "data.source={unpaired}", "--set", "data.partition=iid"],
        ["unpaired.jsonl: row 3 has no 'rejected' (data.format: preference needs chosen and rejected)"]),
    "dpo-with-dp-sgd": (
        [*RUN, "--set", "client.trainer=dpo", "--set", "privacy={{noise_multiplier: 1.0}}"],
        ["privacy (DP-SGD) cannot train client.trainer: dpo", "remove privacy"]),
    "dpo-trained-on-the-prompt": (
        [*RUN, "--set", "client.trainer=dpo", "--set", "data.train_on_inputs=true"],
        ["data.train_on_inputs does not apply to client.trainer: dpo", "remove it"]),
    "dpo-with-a-template": (
        [*RUN, "--set", "client.trainer=dpo", "--set", "data.template=chat"],
        ["data.template renders instruction records and does not apply to client.trainer: dpo"]),
    "dpo-precomputed-reference": (
        [*RUN, "--set", "client.trainer=dpo", "--set", "training.precompute_ref_log_probs=true"],
        ["training.precompute_ref_log_probs cannot be used with client.trainer: dpo"]),
    "dpo-synced-reference": (
        [*RUN, "--set", "client.trainer=dpo", "--set", "training.sync_ref_model=true"],
        ["training.sync_ref_model cannot be used with client.trainer: dpo"]),
    "dpo-reference-policy-unknown": (
        [*RUN, "--set", "client.trainer=dpo", "--set", "training.reference_policy=initial"],
        ["training.reference_policy: got 'initial'; input should be 'round_start' or 'base'"]),
    "dpo-heldout-loss-of-pairs": (
        [*RUN, "--set", "client.trainer=dpo", "--set", "data.holdout_per_label=1"],
        ["federation.eval_heldout_loss scores the answers of instruction records, not preference pairs"]),
    "dpo-field-on-the-stock-trainer": (
        [*RUN, "--set", "training.beta=0.2"],
        ["training.beta: not a TrainingArguments field (it is a DPOConfig field: set client.trainer: dpo)"]),
    # --- a run directory that holds another run -------------------------------------------------
    "recipe-changed": (
        [*RUN, "--set", "federation.threshold=0.5", "--set", "training.learning_rate=0.02"],
        ["{run}: holds a run of another recipe (federation.threshold: 0.9 -> 0.5; training.learning_rate: 0.01 -> 0.02)",
         "--force"]),
    "force-cannot-change-how-clients-train": (
        [*RUN, "--set", "training.learning_rate=0.02", "--force"],
        ["--force cannot apply training.learning_rate: 0.01 -> 0.02", "use another output_dir"]),
    # --- output directories that cannot be made ------------------------------------------------
    "run-output-under-a-file": (
        ["run", "{recipe}", "--set", "output_dir={file}/run"], ["{file}/run: cannot be made", "set output_dir"]),
    "run-output-is-a-file": (["run", "{recipe}", "--set", "output_dir={file}"], ["{file} is a file", "set output_dir"]),
    "run-output-in-proc": (
        ["run", "{recipe}", "--set", "output_dir=/proc/florist-hf-test/run"], ["/proc/florist-hf-test/run: cannot be made"]),
    "run-output-not-permitted": (
        ["run", "{recipe}", "--set", "output_dir=/sys/florist-hf-test"], ["/sys/florist-hf-test: cannot be made", "set output_dir"]),
    "aggregate-out-under-a-file": (
        ["aggregate", "{clients}", "--out", "{file}/global"], ["{file}/global: cannot be made", "set --out"]),
    "aggregate-out-in-proc": (
        ["aggregate", "{clients}", "--out", "/proc/florist-hf-test"], ["/proc/florist-hf-test: cannot be written", "set --out"]),
    "export-out-under-a-file": (["export", "{run}", "--out", "{file}/uniform"], ["{file}/uniform: cannot be made", "--out"]),
    "export-out-not-permitted": (
        ["export", "{run}", "--out", "/sys/florist-hf-test"], ["/sys/florist-hf-test: cannot be written", "set --out"]),
    "export-merged-out-in-proc": (
        ["export", "{run}", "--format", "merged", "--out", "/proc/florist-hf-test"], ["/proc/florist-hf-test: cannot be written"]),
    "evaluate-out-under-a-file": (
        ["evaluate", "--base", "{run}/base_model", "--out", "{file}/results.json"], ["{file}/results.json: cannot be made"]),
    "push-dry-run-under-a-file": (
        ["push", "{run}", "--repo-id", "alice/tiny", "--dry-run", "{file}/upload"], ["{file}/upload: cannot be made"]),
    # --- other commands -------------------------------------------------------------------------
    "aggregate-out-exists": (
        ["aggregate", "{clients}", "--out", "{run}/global_adapter"], ["{run}/global_adapter", "already exists", "--force"]),
    "aggregate-method-unknown": (["aggregate", "{clients}", "--out", "{tmp}/g", "--method", "fedavg"], ["--method 'fedavg' is unknown"]),
    "aggregate-not-adapters": (["aggregate", "{run}/rounds", "--out", "{tmp}/g"], ["{run}/rounds"]),
    "export-format-unknown": (["export", "{run}", "--out", "{tmp}/e", "--format", "gguf"], ["--format 'gguf'"]),
    "evaluate-limit-zero": (["evaluate", "--base", "{run}/base_model", "--limit", "0"], ["--limit 0", "a count (1 or more)"]),
    "evaluate-adapter-missing": (["evaluate", "--base", "{run}/base_model", "--adapter", "{tmp}/nope"], ["{tmp}/nope"]),
    "report-of-no-run": (["report", "{tmp}"], ["run.json: not found"]),
    "comm-secure-flora": (["comm", "--model-config", "{run}/base_model", "--ranks", "4,2", "--secure", "--method", "flora"],
                          ["--secure: secure_aggregation: flora hands every client every other client's factors"]),
    "comm-secure-one-client": (["comm", "--model-config", "{run}/base_model", "--rank", "4", "--clients", "1", "--secure"],
                               ["--secure needs at least 2 clients"]),
    "comm-sketch-columns-alone": (["comm", "--model-config", "{run}/base_model", "--ranks", "4,2", "--sketch-columns", "4"],
                                  ["--sketch-columns", "add --secure"]),
    "push-repo-id-malformed": (["push", "{run}", "--repo-id", "no slash here", "--dry-run", "{tmp}/upload"], ["no slash here"]),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    """A recipe on the tiny Llama and the run it made (one round, three clients of ranks 4, 2, 2)."""
    root = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(root, rounds=1)
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    return recipe, root / "run"


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (and every folder, as such) with the hash of its bytes."""
    return {
        str(path.relative_to(root)): "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
    }


def case_paths(tmp_path: Path, recipe: Path, run_dir: Path) -> dict[str, str]:
    """The case's own copy of the run, and the bad files the table names."""
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "broken.yaml").write_text("model: {name_or_path: x\nfederation: [\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "a-file").write_text("not a folder\n")
    (data / "empty.json").write_text("")
    rows = [{"instruction": f"Task {k}.", "input": "", "output": f"Answer {k}."} for k in range(30)]
    (data / "unlabelled.json").write_text(json.dumps(rows))
    pairs = [{"chosen": f"\n\nHuman: Task {k}?\n\nAssistant: Answer {k}.", "rejected": f"\n\nHuman: Task {k}?\n\nAssistant: No."}
             for k in range(30)]  # Anthropic/hh-rlhf's schema
    (data / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    unpaired = [pair if k != 3 else {"chosen": pair["chosen"]} for k, pair in enumerate(pairs)]
    (data / "unpaired.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in unpaired))
    flora = data / "flora" / "3"
    flora.mkdir(parents=True)
    for client in range(3):
        (flora / f"local_training_{client}.json").write_text(json.dumps(rows[client * 10:(client + 1) * 10]))
    return {
        "recipe": str(recipe), "run": str(run), "file": str(data / "a-file"), "tmp": str(scratch),
        "empty": str(data / "empty.json"), "unlabelled": str(data / "unlabelled.json"), "flora": str(data / "flora"),
        "pairs": str(data / "pairs.jsonl"), "unpaired": str(data / "unpaired.jsonl"),
        "clients": " ".join(str(path) for path in sorted((run / "rounds" / "1" / "clients").iterdir())),
    }


def command_line(template: list[str], paths: dict[str, str]) -> list[str]:
    argv = []
    for part in template:
        # {clients} is several arguments
        argv += part.format(**paths).split(" ") if part == "{clients}" else [part.format(**paths)]
    return argv


@pytest.mark.parametrize("case", list(TEST_CASES))
def test_bad_input_is_one_line_a_non_zero_exit_and_an_untouched_run(case, finished_run, tmp_path):
    recipe, run_dir = finished_run
    paths = case_paths(tmp_path, recipe, run_dir)
    template, expected = TEST_CASES[case]
    before = tree_digest(Path(paths["run"]))

    result = runner.invoke(app, command_line(template, paths))

    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), (
        f"an uncaught {type(result.exception).__name__}: {result.exception}\n{result.output}")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for text in expected:
        assert text.format(**paths) in lines[0], lines[0]
    assert tree_digest(Path(paths["run"])) == before
    assert not Path("/proc/florist-hf-test").exists() and not Path("/sys/florist-hf-test").exists()


def test_a_failed_start_leaves_a_directory_that_takes_the_corrected_recipe(tmp_path):
    """A client that cannot start (a speed option whose package is missing) fails after the run
    directory is made; the corrected recipe then runs in it, and what the failed start left is
    kept under superseded/."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here, so its setting does not fail")
    recipe = write_recipe(tmp_path, rounds=1)
    failed = runner.invoke(app, ["run", str(recipe), "--set", "training.use_liger_kernel=true"])
    assert failed.exit_code == 2 and "training.use_liger_kernel needs the liger-kernel package" in failed.output
    run_dir = tmp_path / "run"
    assert (run_dir / "recipe.json").exists() and not list(run_dir.glob("rounds/*/clients/client_*"))

    corrected = runner.invoke(app, ["run", str(recipe)])

    assert corrected.exit_code == 0, corrected.output
    assert "trained no client" in corrected.output and "starts afresh" in corrected.output
    recorded = json.loads((run_dir / "recipe.json").read_text())["recipe"]
    assert "use_liger_kernel" not in recorded["training"]
    (set_aside,) = (run_dir / "superseded").iterdir()
    assert json.loads((set_aside / "recipe.json").read_text())["recipe"]["training"]["use_liger_kernel"] is True
    assert (run_dir / "global_adapter" / "adapter_model.safetensors").exists()


def test_a_plain_run_and_evaluation_print_only_our_lines(tmp_path):
    """In a fresh process outside any git repository, as a user starts it: no progress bar, no
    hint for lm-eval's own command line, no git message; stderr stays empty."""
    from conftest import write_sums_task

    recipe = write_recipe(tmp_path, rounds=1, data={"holdout_per_label": 1, "cutoff_len": 256})
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_DEEPSPEED"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    work = tmp_path / "elsewhere"
    work.mkdir()

    def florist_hf(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "florist_hf.cli", *argv], capture_output=True, text=True, env=env,
                              cwd=work, timeout=600)

    run = florist_hf("run", str(recipe))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stderr == "", run.stderr
    write_sums_task(tmp_path / "tasks", count=3)
    run_dir = tmp_path / "run"
    evaluation = florist_hf("evaluate", "--base", str(run_dir / "base_model"), "--adapter", str(run_dir / "global_adapter"),
                            "--tasks", "sums", "--include-path", str(tmp_path / "tasks"), "--device", "cpu")
    assert evaluation.returncode == 0, evaluation.stdout[-2000:] + evaluation.stderr[-2000:]
    assert evaluation.stderr == "", evaluation.stderr
    for output in (run.stdout.lower(), evaluation.stdout.lower()):
        assert "it/s]" not in output and "fatal:" not in output and "--metadata" not in output
        # DeepSpeed and bitsandbytes are installed here (the test extra), as on many users' machines.
        for library in ("deepspeed", "bitsandbytes", "gemm_4bit", "setting accelerator", "kernels-community"):
            assert library not in output, f"{library!r} in a plain run's output:\n{output}"
