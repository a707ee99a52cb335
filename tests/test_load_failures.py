"""A base model, tokenizer or dataset that cannot be loaded stops `florist-hf run` with one line
naming the id, the cause and the fix, exit code 2, and no run directory made.

The Hub cases run the real CLI in a subprocess against a loopback server that refuses the way the
Hub does (huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import RefusingHubServer
from typer.testing import CliRunner

from florist_hf.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def run_cli(recipe: str, *overrides: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`florist-hf run` as a user runs it, with a Hugging Face cache of its own (empty)."""
    command = [sys.executable, "-m", "florist_hf", "run", str(REPO / recipe)]
    for override in overrides:
        command += ["--set", override]
    return subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=180, cwd=REPO)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_line_failure(result, out_dir: Path, *expected: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert not out_dir.exists()  # the base and the data are read before the run directory is made


def test_design_card_command_offline_with_nothing_cached_is_one_line(tmp_path):
    out_dir = tmp_path / "run"
    result = run_cli(
        "recipes/llama7b_dolly_heter.yaml", f"output_dir={out_dir}",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert_one_line_failure(
        result, out_dir, "'huggyllama/llama-7b'", "HF_HUB_OFFLINE=1", "unset HF_HUB_OFFLINE",
        "hf download huggyllama/llama-7b", "model.name_or_path at a local directory",
    )


HUB_REFUSALS = {
    "gated-without-token": (401, "GatedRepo", {}, ("gated repository", "no Hub token", "accept the licence on "
                            "https://huggingface.co/meta-llama/Llama-3.2-1B", "hf auth login")),
    "gated-without-licence": (403, "GatedRepo", {"HF_TOKEN": "hf_test_token_without_access"},
                              ("gated repository", "token has no access", "accept the licence")),
    "repository-not-found": (404, "RepoNotFound", {}, ("no such repository", "check model.name_or_path")),
    "revision-not-found": (404, "RevisionNotFound", {}, ("no revision 'v9'", "set model.revision")),
}


@pytest.mark.parametrize("case", list(HUB_REFUSALS))
def test_hub_refusals_are_one_line_naming_the_fix(case, tmp_path):
    status, error_code, extra_env, expected = HUB_REFUSALS[case]
    out_dir = tmp_path / "run"
    env = {"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"), "NO_PROXY": "127.0.0.1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_ETAG_TIMEOUT": "5", "HF_TOKEN": "", **extra_env}
    with RefusingHubServer(status, error_code) as url:
        result = run_cli(
            "recipes/llama32_1b_dolly_heter.yaml", f"output_dir={out_dir}", "model.revision=v9",
            env={**env, "HF_ENDPOINT": url},
        )
    assert_one_line_failure(result, out_dir, "'meta-llama/Llama-3.2-1B'", *expected)


def test_uncached_hub_dataset_offline_is_one_line(tmp_path, tiny_base):
    out_dir = tmp_path / "run"
    result = run_cli(
        "recipes/tinyllama_alpaca_heter.yaml", f"output_dir={out_dir}", f"model.name_or_path={tiny_base}",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert_one_line_failure(
        result, out_dir, "dataset 'tatsu-lab/alpaca'", "unset HF_HUB_OFFLINE",
        "hf download tatsu-lab/alpaca --repo-type dataset", "data.source at a local file or folder",
    )


def test_model_folder_without_a_tokenizer_is_one_line(tmp_path, tiny_base):
    import shutil

    model_only = tmp_path / "model-only"
    model_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_base / name, model_only / name)
    out_dir = tmp_path / "run"
    result = runner.invoke(app, ["run", str(REPO / "recipes/tinyllama_alpaca_heter.yaml"),
                                 "--set", f"output_dir={out_dir}", "--set", f"model.name_or_path={model_only}"])
    assert result.exit_code == 2, result.output
    assert f"tokenizer of '{model_only}': cannot be read" in result.output
    assert not out_dir.exists()
