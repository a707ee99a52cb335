"""The precision clients train in where the recipe leaves it open (`florist_hf.clients.precision`): bf16
autocast on a CPU that computes bf16 natively, fp32 on one that does not (the rest of the suite's path:
conftest sets FLORIST_HF_CPU_BF16=0), the recipe's own training.bf16 / fp16 winning, DP-SGD and QLoRA
clients kept as they were; one console line says which and why, and what is exported and published stays fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODEL, quiet_console, write_recipe
from typer.testing import CliRunner

from florist_hf.cli import app
from florist_hf.clients import precision
from florist_hf.clients.config import client_training, precision_lines, training_arguments
from florist_hf.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

pytestmark = pytest.mark.skipif(torch.accelerator.is_available(), reason="the CPU's precision; on a GPU the recipe decides")

#: The shipped recipes that train on a CPU (no precision set in them).
CPU_RECIPES = ["smollm2_135m_demo", "smollm2_135m_dolly_heter", "tiny_cpu_demo", "flowertune_shape"]

NATIVE_LINE = "clients train in bf16 autocast: this CPU computes bf16 natively (avx512_bf16); training.bf16: false trains in fp32"
FP32_LINE = "clients train in fp32: this CPU has no native bf16 (AMX or AVX512-BF16)"


@pytest.fixture
def native_bf16(monkeypatch):
    """This CPU as one with AVX512-BF16, whatever it is (bf16 autocast runs on any CPU, emulated or not)."""
    monkeypatch.delenv(precision.NO_NATIVE_BF16_ENV, raising=False)
    monkeypatch.setattr(precision, "_hardware_bf16", lambda: "avx512_bf16")


@pytest.mark.parametrize("name", CPU_RECIPES)
@pytest.mark.parametrize("trainer", ["trainer", "sft"])
def test_the_cpu_recipes_train_in_bf16_where_the_cpu_has_it_and_in_fp32_where_not(name, trainer, monkeypatch, native_bf16, tmp_path):
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml", [f"client.trainer={trainer}"])
    assert not {"bf16", "fp16"} & set(recipe.training)  # the recipe leaves it open
    args = training_arguments(_config_class(trainer), client_training(recipe, 0, 1), tmp_path, seed=0)
    assert (args.bf16, args.use_cpu, args.fp16) == (True, True, False)
    assert precision_lines(recipe) == [NATIVE_LINE]

    monkeypatch.setenv(precision.NO_NATIVE_BF16_ENV, "0")  # the seam: this CPU has no native bf16
    args = training_arguments(_config_class(trainer), client_training(recipe, 0, 1), tmp_path, seed=0)
    assert (args.bf16, args.use_cpu, args.fp16) == (False, False, False)
    assert precision_lines(recipe) == [FP32_LINE]


def _config_class(trainer):
    from florist_hf.clients.registry import trainer_kind

    return trainer_kind(trainer).config_class()


def test_the_recipe_decides_where_it_sets_the_precision(native_bf16, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, ranks=(4, 2, 2), training={"bf16": False}))
    assert client_training(recipe, 0, 1)["bf16"] is False and "use_cpu" not in client_training(recipe, 0, 1)
    assert precision_lines(recipe) == ["clients train in fp32: set by training.bf16: false"]

    recipe = load_recipe(write_recipe(tmp_path, ranks=(4, 2, 2), training={"bf16": True, "use_cpu": True}))
    assert precision_lines(recipe) == ["clients train in bf16 autocast on the CPU: set by training.bf16"]

    # One client set apart (clients on different hardware): one line per precision.
    recipe = load_recipe(write_recipe(tmp_path, ranks=(4, 2, 2), client_training={1: {"bf16": False}}))
    assert [client_training(recipe, k, 1)["bf16"] for k in range(3)] == [True, False, True]
    assert precision_lines(recipe) == [NATIVE_LINE.replace("clients train", "clients 0, 2 train"),
                                       "clients 1 train in fp32: set by training.bf16: false"]


def test_dp_sgd_and_qlora_clients_keep_their_precision_on_a_native_bf16_cpu(native_bf16, tmp_path):
    # DP-SGD: Opacus would clip every record's gradient by a norm it rounds to bf16 under autocast, so a
    # clipped gradient could exceed max_grad_norm, which the accounted ε takes as a bound.
    recipe = load_recipe(REPO / "recipes" / "smollm2_135m_dolly_dp.yaml")
    assert client_training(recipe, 0, 1)["bf16"] is False
    assert precision_lines(recipe) == ["clients train in fp32: under DP-SGD Opacus would clip by norms rounded to bf16 "
                                       "(training.bf16: true overrides)"]
    recipe = load_recipe(write_recipe(tmp_path, model={"quantization": {"bits": 4, "compute_dtype": "bfloat16"}}))
    assert client_training(recipe, 0, 1)["bf16"] is False
    assert precision_lines(recipe) == ["clients train in fp32 LoRA factors: a QLoRA base computes in "
                                       "model.quantization.compute_dtype"]


def test_a_float64_base_trains_in_fp64_on_a_native_bf16_cpu(native_bf16, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, model={"dtype": "float64"}))
    assert client_training(recipe, 0, 1)["bf16"] is False
    assert precision_lines(recipe) == ["clients train in fp64: model.dtype is float64 (no mixed precision)"]
    recipe = load_recipe(write_recipe(tmp_path, model={"dtype": "float64"}, training={"bf16": True, "use_cpu": True}))
    assert precision_lines(recipe) == ["clients train in bf16 autocast on the CPU: set by training.bf16"]


def test_native_bf16_clients_train_under_autocast_and_publish_fp32_adapters(native_bf16, tmp_path, monkeypatch):
    """Through the CLI on the tiny Llama: the line, the q/v LoRA layers' products in bf16 while the
    clients train, and fp32 client and global adapters (the server aggregates what it did before)."""
    from safetensors import safe_open

    from florist_hf.adapters import ADAPTER_WEIGHTS
    from florist_hf.clients import run as client_run

    seen: set = set()
    build = client_run.build_lora_model

    def recording(*args, **kwargs):
        model = build(*args, **kwargs)
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        layer.register_forward_hook(lambda module, inputs, output: seen.add((module.training, output.dtype)))
        return model

    monkeypatch.setattr(client_run, "build_lora_model", recording)
    for method in ("florist", "fedit"):
        out = tmp_path / method
        recipe = write_recipe(out, method=method, ranks=(4, 2), rounds=2)
        result = runner.invoke(app, ["run", str(recipe)])
        assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
        assert NATIVE_LINE in " ".join(result.output.split())
        assert (True, torch.bfloat16) in seen and (True, torch.float32) not in seen  # training products in bf16
        run_dir = out / "run"
        clients = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert all(record["finite"] for record in clients if record["kind"] == "client")
        exported = [*run_dir.glob("rounds/*/clients/*/" + ADAPTER_WEIGHTS), run_dir / "global_adapter" / ADAPTER_WEIGHTS]
        assert len(exported) == 5
        for path in exported:
            with safe_open(str(path), "pt") as tensors:
                assert {tensors.get_tensor(key).dtype for key in tensors.keys()} == {torch.float32}, path


def test_a_bad_cpu_bf16_setting_is_one_line_before_the_run_directory(monkeypatch, tmp_path):
    monkeypatch.setenv(precision.NO_NATIVE_BF16_ENV, "yes")
    result = runner.invoke(app, ["run", str(write_recipe(tmp_path))])
    assert result.exit_code == 2
    assert "FLORIST_HF_CPU_BF16='yes': 0 makes clients on this CPU train in fp32" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


def test_the_cpuinfo_flags_name_native_bf16(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n\nprocessor\t: 1\n")
    assert precision._cpuinfo_bf16_flag(cpuinfo) == "avx512_bf16"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile avx512_bf16\n")
    assert precision._cpuinfo_bf16_flag(cpuinfo) == "amx_bf16"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n")
    assert precision._cpuinfo_bf16_flag(cpuinfo) is None
    assert precision._cpuinfo_bf16_flag(tmp_path / "absent") is None


@pytest.mark.slow
def test_a_real_smollm2_client_trains_in_bf16_on_this_cpus_own_bf16(smollm2_base, monkeypatch, tmp_path):
    """On the real SmolLM2 (GQA, tied embeddings) where this machine's CPU has native bf16 (detected,
    not forced): a client round under autocast, its loss finite and its adapter fp32."""
    from florist_hf.adapters import read_adapter
    from florist_hf.clients.callback import ClientRound
    from florist_hf.clients.run import prepare_shard, run_client_round
    from florist_hf.loading import load_tokenizer

    monkeypatch.delenv(precision.NO_NATIVE_BF16_ENV, raising=False)
    if precision.native_cpu_bf16() is None:
        pytest.skip("this CPU has no native bf16")
    recipe = load_recipe(REPO / "recipes" / "smollm2_135m_dolly_heter.yaml", [
        "data.source=builtin:demo", "data.cutoff_len=64", "training.max_steps=2", "training.per_device_train_batch_size=2",
        f"output_dir={tmp_path / 'run'}"])
    training = client_training(recipe, 0, 1)
    assert training["bf16"] is True and training["use_cpu"] is True
    from florist_hf.data import demo_records

    tokenizer = load_tokenizer(str(smollm2_base))
    dataset = prepare_shard(recipe, tokenizer, demo_records()[:8])
    plan = ClientRound(client_id=0, round=1, rank=8, num_samples=len(dataset), export_dir=tmp_path / "export")
    metrics = run_client_round(recipe, plan, str(smollm2_base), tokenizer, dataset, tmp_path / "work", quiet_console())
    assert metrics["finite"] and metrics["loss"] > 0
    adapter = read_adapter(plan.export_dir)
    assert len(adapter.modules) == 60  # q and v of the 30 layers
    assert all(m.lora_a.dtype == torch.float32 and m.lora_b.dtype == torch.float32 for m in adapter.modules.values())
    assert any(float(m.lora_b.abs().sum()) > 0 for m in adapter.modules.values())
