"""The GPU speed options a user sets in a recipe (run when a CUDA device is present; skipped here):
bf16 clients with padding-free batches on sdpa and, where installed, FlashAttention-2, Liger
kernels and torch.compile, each a full 2-client round through the CLI, padding-free equal to padded."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from florist_hf.cli import app

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the speed options are GPU options)")
DEMO = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu_demo.yaml"
runner = CliRunner()

OPTIONS = {
    "sdpa": [],
    "flash_attention_2": ["model.attn_implementation=flash_attention_2"],
    "liger": ["training.use_liger_kernel=true"],
    "compile": ["training.torch_compile=true"],
}
NEEDS = {"flash_attention_2": "flash_attn", "liger": "liger_kernel"}


def _round(tmp_path: Path, name: str, batching: str, extra: list[str]) -> dict:
    run_dir = tmp_path / f"{name}-{batching}"
    overrides = [f"output_dir={run_dir}", "federation.rounds=1", "federation.num_clients=2", "lora.ranks=4",
                 "training.max_steps=3", "training.bf16=true", "model.dtype=bfloat16", f"data.batching={batching}", *extra]
    result = runner.invoke(app, ["run", str(DEMO), *[item for o in overrides for item in ("--set", o)]])
    assert result.exit_code == 0, f"{name}/{batching}:\n{result.output}\n{result.exception!r}"
    return json.loads((run_dir / "run.json").read_text())


@pytest.mark.parametrize("name", list(OPTIONS))
def test_gpu_speed_options_train_and_padding_free_matches_padded(tmp_path, name):
    if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
        pytest.skip(f"{NEEDS[name]} is not installed")
    padded = _round(tmp_path, name, "padded", OPTIONS[name])
    free = _round(tmp_path, name, "padding_free", OPTIONS[name])
    assert padded["rounds_completed"] == free["rounds_completed"] == 1
    # bf16 on a GPU: the two layouts sum in different orders, so equal to bf16 tolerance only.
    assert free["heldout_loss"][0] == pytest.approx(padded["heldout_loss"][0], rel=2e-2)
