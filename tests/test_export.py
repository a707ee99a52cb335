"""`florist-hf export`: a uniform-rank adapter any serving engine scales right, and a merged model."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner
from helpers import relative_error

from florist_hf.cli import app
from florist_hf.tiny import PAPER_BASES, build_random_llama, build_tiny_llama, scaled_down_config

runner = CliRunner()


def heterogeneous_adapter(base, out_dir, seed=0):
    """A PEFT-saved adapter with per-module ranks and alphas (patterns) and non-zero B, as FLoRIST writes."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"v_proj": 3}, alpha_pattern={"v_proj": 12}, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    peft_model.save_pretrained(out_dir)
    return out_dir


def updates(base, adapter_dir) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from florist_hf.global_state import lora_layers

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter_dir)
    return {name: layer.get_delta_weight("default").detach().double() for name, layer in lora_layers(model).items()}



@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("base") / "base", num_layers=2, hidden_size=32, intermediate_size=64,
                            num_attention_heads=2, num_key_value_heads=1)


@pytest.mark.parametrize("round_to, rank", [(1, 8), (16, 16)])
def test_uniform_export_is_the_same_update_at_one_rank_with_no_patterns(base, tmp_path, round_to, rank):
    source = heterogeneous_adapter(base, tmp_path / "adapter")
    result = runner.invoke(app, ["export", str(source), "--out", str(tmp_path / "uniform"), "--round-to", str(round_to)])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "uniform" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == rank and not config.get("rank_pattern") and not config.get("alpha_pattern")
    assert config["use_rslora"] is False
    assert {tensor.shape[0 if key.endswith("lora_A.weight") else 1]
            for key, tensor in load_file(tmp_path / "uniform" / "adapter_model.safetensors").items()} == {rank}
    original, exported = updates(base, source), updates(base, tmp_path / "uniform")
    assert original.keys() == exported.keys()
    for name in original:
        assert relative_error(exported[name], original[name]) < 1e-6, name


def test_uniform_export_of_a_run_directory_reads_its_published_adapter(tmp_path):
    from helpers import quiet_console, write_recipe

    from florist_hf.recipe import load_recipe
    from florist_hf.runner import run_federation

    run_dir = run_federation(load_recipe(write_recipe(tmp_path, threshold=0.7, rounds=2)), console=quiet_console())
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "uniform")])
    assert result.exit_code == 0, result.output
    base = run_dir / "base_model"
    original, exported = updates(base, run_dir / "global_adapter"), updates(base, tmp_path / "uniform")
    assert all(relative_error(exported[name], original[name]) < 1e-6 for name in original)


def test_max_rank_truncates_to_the_best_approximation_and_says_what_it_kept(base, tmp_path):
    source = heterogeneous_adapter(base, tmp_path / "adapter")
    result = runner.invoke(app, ["export", str(source), "--out", str(tmp_path / "uniform"), "--max-rank", "2"])
    assert result.exit_code == 0, result.output
    assert "truncated base_model.model.model.layers.0.self_attn.q_proj to rank 2" in result.output and "% of its" in result.output
    original, exported = updates(base, source), updates(base, tmp_path / "uniform")
    for name, delta in original.items():
        u, sigma, vh = torch.linalg.svd(delta)
        best = (u[:, :2] * sigma[:2]) @ vh[:2]
        assert relative_error(exported[name], best) < 1e-6, name
    record = json.loads((tmp_path / "uniform" / "export.json").read_text())
    assert set(record["truncated_modules"]) == set(original)


def test_a_rank_no_engine_takes_is_refused_unless_truncation_is_asked(base, tmp_path, monkeypatch):
    from florist_hf import export

    monkeypatch.setattr(export, "MAX_SERVING_RANK", 4)
    source = heterogeneous_adapter(base, tmp_path / "adapter")
    result = runner.invoke(app, ["export", str(source), "--out", str(tmp_path / "uniform")])
    assert result.exit_code == 2 and "has rank 8, above 4" in result.output and "--max-rank" in result.output
    assert not (tmp_path / "uniform").exists()
    result = runner.invoke(app, ["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "uniform")])
    assert result.exit_code == 2 and "not a finished run directory or a PEFT adapter" in result.output


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_export_is_a_full_model_whose_logits_are_base_plus_adapter(tmp_path, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = scaled_down_config(PAPER_BASES["meta-llama/Llama-3.2-1B"])  # GQA, tied embeddings, llama3 rope
    base = build_random_llama(tmp_path / "base", config, base_name="meta-llama/Llama-3.2-1B", dtype=dtype)
    source = heterogeneous_adapter(base, tmp_path / "adapter")
    result = runner.invoke(app, ["export", str(source), "--format", "merged", "--out", str(tmp_path / "merged"),
                                 "--base-model", str(base)])
    assert result.exit_code == 0, result.output
    merged_dir = tmp_path / "merged"
    assert (merged_dir / "tokenizer.json").exists() and (merged_dir / "config.json").exists()
    assert all(tensor.dtype == getattr(torch, dtype)
               for shard in merged_dir.glob("*.safetensors") for tensor in load_file(shard).values())
    tokens = AutoTokenizer.from_pretrained(merged_dir)("The update is merged.", return_tensors="pt")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), source)
    with torch.no_grad():
        got, expected = merged(**tokens).logits, reference(**tokens).logits
    tolerance = 1e-5 if dtype == "float32" else 2e-2  # bf16: the merged weights are rounded once to bf16
    assert relative_error(got.double(), expected.double()) < tolerance


def test_push_format_uniform_uploads_the_servable_form(base, tmp_path):
    source = heterogeneous_adapter(base, tmp_path / "adapter")
    result = runner.invoke(app, ["push", str(source), "--repo-id", "me/servable", "--format", "uniform",
                                 "--dry-run", str(tmp_path / "upload")])
    assert result.exit_code == 0, result.output
    upload = tmp_path / "upload"
    config = json.loads((upload / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and not config.get("rank_pattern")
    assert "## Serving" in (upload / "README.md").read_text()
    config["base_model_name_or_path"] = str(base)  # the public upload drops the local base path
    (upload / "adapter_config.json").write_text(json.dumps(config))
    original, uploaded = updates(base, source), updates(base, upload)
    assert all(relative_error(uploaded[name], original[name]) < 1e-6 for name in original)
