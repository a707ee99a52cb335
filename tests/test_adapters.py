"""Real PEFT checkpoints in, a real PEFT adapter out: the CLI's aggregate step end to end."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from florist_hf.adapters import ADAPTER_WEIGHTS, CLIENT_INFO, module_scale, read_adapter
from florist_hf.cli import app
from florist_hf.global_state import lora_layers

runner = CliRunner()
TARGETS = ["q_proj", "v_proj"]


def save_client(base_dir, out_dir, *, rank, alpha, seed, num_samples=None, rslora=False, dtype=torch.float32, **config):
    """Train-free client: PEFT LoRA with random B (init_lora_weights=False) saved by save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=TARGETS, use_rslora=rslora, init_lora_weights=False, **config
    )
    peft_model = get_peft_model(model, lora)
    peft_model.to(dtype)
    peft_model.save_pretrained(out_dir)
    if num_samples is not None:
        (out_dir / CLIENT_INFO).write_text(json.dumps({"num_samples": num_samples}))
    return peft_model


def intended_update(peft_models, weights):
    """Σ p_k ΔW_k per module, read from the clients' own PEFT layers (PEFT's scaling, not ours)."""
    total = sum(weights)
    update = {}
    for peft_model, weight in zip(peft_models, weights):
        for name, layer in lora_layers(peft_model).items():
            contribution = weight / total * layer.get_delta_weight("default").double()
            update[name] = update.get(name, 0) + contribution
    return update


@pytest.fixture(scope="module")
def heterogeneous_clients(tiny_base, tmp_path_factory):
    """Three clients with different ranks, alphas and one rsLoRA client."""
    root = tmp_path_factory.mktemp("clients")
    specs = [
        dict(rank=8, alpha=16, seed=1, num_samples=1579),
        dict(rank=4, alpha=4, seed=2, num_samples=685, rslora=True),
        dict(rank=2, alpha=7, seed=3, num_samples=3775),
    ]
    models, dirs = [], []
    for k, spec in enumerate(specs):
        out = root / f"client_{k}"
        models.append(save_client(tiny_base, out, **spec))
        dirs.append(out)
    return dirs, models, [spec["num_samples"] for spec in specs]


def load_global(tiny_base, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapter_dir)


def test_scale_matches_peft_for_patterns_and_rslora(tiny_base, tmp_path):
    cases = [
        dict(rank=8, alpha=16),
        dict(rank=8, alpha=16, rslora=True),
        dict(rank=8, alpha=16, rank_pattern={"layers.0.self_attn.q_proj": 4}, alpha_pattern={"v_proj": 3}),
    ]
    for index, case in enumerate(cases):
        out = tmp_path / f"c{index}"
        peft_model = save_client(tiny_base, out, seed=index, **case)
        adapter = read_adapter(out)
        for name, layer in lora_layers(peft_model).items():
            assert module_scale(adapter.config, name) == pytest.approx(layer.scaling["default"])
            assert adapter.modules[name].rank == layer.r["default"]


@pytest.mark.parametrize("method, threshold, extra", [
    ("florist", 1.0, []), ("florist", 1.0, ["--aggregation", "streaming"]), ("flora", 1.0, []), ("ffa", None, [])])
def test_exact_methods_round_trip_through_peft(tiny_base, tmp_path, heterogeneous_clients, method, threshold, extra):
    dirs, models, weights = heterogeneous_clients
    if method == "ffa":  # FFA-LoRA clients share one frozen A: rebuild them so
        dirs, models = [], []
        for k, (rank, seed) in enumerate([(8, 1), (4, 2)]):
            out = tmp_path / f"ffa_{k}"
            peft_model = save_client(tiny_base, out, rank=rank, alpha=2 * rank, seed=seed, num_samples=weights[k])
            if k == 1:  # copy the first r_k rows of client 0's A
                state = load_file(out / ADAPTER_WEIGHTS)
                first = load_file(dirs[0] / ADAPTER_WEIGHTS)
                for key in state:
                    if ".lora_A." in key:
                        state[key] = first[key][:rank].clone()
                save_file(state, out / ADAPTER_WEIGHTS)
                from peft import PeftModel
                from transformers import AutoModelForCausalLM

                peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out)
            dirs.append(out)
            models.append(peft_model)
        weights = weights[:2]
    out = tmp_path / "global"
    args = ["aggregate", *map(str, dirs), "--method", method, "--out", str(out), *extra]
    if threshold is not None:
        args += ["--threshold", str(threshold)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "total rank" in result.output

    expected = intended_update(models, weights)
    merged = load_global(tiny_base, out)
    for name, layer in lora_layers(merged).items():
        delta = layer.get_delta_weight("default").double()
        assert float((delta - expected[name]).norm() / expected[name].norm()) < 1e-5, name

    # the model's output equals the base model with W + ΔW written into its weights
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_base)
    with torch.no_grad():
        for name, module in reference.named_modules():
            peft_name = f"base_model.model.{name}"
            if peft_name in expected:
                module.weight += expected[peft_name].to(module.weight.dtype)
        tokens = torch.randint(3, 200, (2, 12))
        assert torch.allclose(merged(tokens).logits, reference(tokens).logits, atol=1e-4)

    sidecar = json.loads((out / "aggregation.json").read_text())
    assert sidecar["method"] == method
    assert [c["num_samples"] for c in sidecar["clients"]] == weights
    if extra:  # streaming records what it left out: nothing, at its exact tolerance
        assert sidecar["options"]["aggregation"] == "streaming"
        assert all(m["streaming"]["discarded_energy"] < 1e-20 for m in sidecar["modules"].values())
    assert sidecar["communication"]["uplink_params_total"] > 0


def test_florist_threshold_writes_per_module_ranks_that_peft_honours(tiny_base, tmp_path, heterogeneous_clients):
    dirs, models, weights = heterogeneous_clients
    out = tmp_path / "global"
    result = runner.invoke(app, ["aggregate", *map(str, dirs), "--threshold", "0.7", "--out", str(out)])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((out / "aggregation.json").read_text())
    ranks = {name: info["selected_rank"] for name, info in sidecar["modules"].items()}
    assert max(ranks.values()) < 14  # below the stacked rank 8 + 4 + 2
    merged = load_global(tiny_base, out)
    expected = intended_update(models, weights)
    for name, layer in lora_layers(merged).items():
        assert layer.r["default"] == ranks[name] and layer.scaling["default"] == 1.0
        delta = layer.get_delta_weight("default").double()
        u, sigma, vh = torch.linalg.svd(expected[name], full_matrices=False)
        p = ranks[name]
        truncated = u[:, :p] @ torch.diag(sigma[:p]) @ vh[:p]
        assert float((delta - truncated).norm() / truncated.norm()) < 1e-5
        assert sidecar["modules"][name]["energy_kept"] >= 0.7


def test_flexlora_writes_one_adapter_per_client(tiny_base, tmp_path, heterogeneous_clients):
    dirs, models, weights = heterogeneous_clients
    out = tmp_path / "global"
    result = runner.invoke(app, ["aggregate", *map(str, dirs), "--method", "flexlora", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for k, rank in enumerate([8, 4, 2]):
        client_model = load_global(tiny_base, out / "clients" / f"client_{k}")
        assert {layer.r["default"] for layer in lora_layers(client_model).values()} == {rank}
    assert {layer.r["default"] for layer in lora_layers(load_global(tiny_base, out)).values()} == {8}


def test_bf16_adapters_aggregate_and_stay_bf16(tiny_base, tmp_path):
    dirs = []
    for k in range(2):
        save_client(tiny_base, tmp_path / f"c{k}", rank=4, alpha=8, seed=k, dtype=torch.bfloat16)
        dirs.append(tmp_path / f"c{k}")
    out = tmp_path / "global"
    result = runner.invoke(app, ["aggregate", *map(str, dirs), "--threshold", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {t.dtype for t in load_file(out / ADAPTER_WEIGHTS).values()} == {torch.bfloat16}
    assert json.loads((out / "aggregation.json").read_text())["communication"]["bytes_per_param"] == 2


@pytest.mark.parametrize("method", ["florist", "flora"])
def test_the_outlier_report_of_bf16_clients_equals_the_dense_computation(tiny_base, tmp_path, method):
    """The sidecar's per-module norms and cosines (read off the Gram matrices inside the aggregation)
    equal the dense fp64 ‖s_k·B_k·A_k‖ and cosine to the round's global update as computed."""
    dirs = []
    for k, (rank, alpha) in enumerate([(8, 16), (4, 3), (2, 7)]):
        save_client(tiny_base, tmp_path / f"c{k}", rank=rank, alpha=alpha, seed=k, num_samples=100 * (k + 1), dtype=torch.bfloat16)
        dirs.append(tmp_path / f"c{k}")
    out = tmp_path / "global"
    result = runner.invoke(app, ["aggregate", *map(str, dirs), "--method", method, "--threshold", "0.8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((out / "aggregation.json").read_text())
    from florist_hf.aggregation import get_method

    clients = [read_adapter(d).modules for d in dirs]
    aggregator = get_method(method, threshold=0.8) if method == "florist" else get_method(method)
    computed = aggregator.aggregate(clients, [100, 200, 300]).modules  # fp64, before the cast to bf16
    whole = [{"norm_sq": 0.0, "inner": 0.0} for _ in clients]
    global_sq = 0.0
    for name, module in computed.items():
        update = module.delta_weight
        global_sq += float(update.square().sum())
        for k, (row, client) in enumerate(zip(sidecar["modules"][name]["clients"], clients)):
            dense = client[name].scale * (client[name].lora_b.double() @ client[name].lora_a.double())
            assert row["norm"] == pytest.approx(float(dense.norm()), rel=1e-9)
            assert row["cosine"] == pytest.approx(float((dense * update).sum() / (dense.norm() * update.norm())), abs=1e-9)
            whole[k]["norm_sq"] += float(dense.square().sum())
            whole[k]["inner"] += float((dense * update).sum())
    for row, total in zip(sidecar["clients"], whole):
        assert row["update_norm"] == pytest.approx(math.sqrt(total["norm_sq"]), rel=1e-9)
        assert row["cosine"] == pytest.approx(total["inner"] / math.sqrt(total["norm_sq"] * global_sq), abs=1e-9)


# --- bad input: one line naming the directory and the fix, exit code 2, nothing written -------------


def corrupt_config(client):
    (client / "adapter_config.json").write_text("{not json")


def corrupt_weights(client):
    (client / ADAPTER_WEIGHTS).write_bytes(b"\x00garbage" * 10)


def remove_weights(client):
    (client / ADAPTER_WEIGHTS).unlink()


def inject_nan(client):
    state = load_file(client / ADAPTER_WEIGHTS)
    key = sorted(state)[0]
    state[key][0, 0] = math.nan
    save_file(state, client / ADAPTER_WEIGHTS)


def drop_module(client):
    state = load_file(client / ADAPTER_WEIGHTS)
    save_file({k: v for k, v in state.items() if "layers.1.self_attn.v_proj" not in k}, client / ADAPTER_WEIGHTS)


def reshape_module(client):
    state = load_file(client / ADAPTER_WEIGHTS)
    key = next(k for k in sorted(state) if "lora_A" in k)
    state[key] = torch.zeros(state[key].shape[0], 7)
    save_file(state, client / ADAPTER_WEIGHTS)


@pytest.mark.parametrize(
    "damage, extra_args, expected",
    [
        (corrupt_config, [], "corrupt JSON"),
        (corrupt_weights, [], "not a readable safetensors"),
        (remove_weights, [], "no adapter_model.safetensors"),
        (inject_nan, [], "NaN or Inf"),
        (drop_module, [], "target modules differ"),
        (reshape_module, [], "has shape"),
        (None, ["--weights", "1,2,3"], "--weights has 3 values for 2"),
        (None, ["--threshold", "1.5"], "outside (0, 1]"),
        (None, ["--threshold", "0"], "outside (0, 1]"),
    ],
)
@pytest.mark.parametrize("aggregation", ["stacked", "streaming"])
def test_bad_input_is_one_clear_line(tiny_base, tmp_path, damage, extra_args, expected, aggregation):
    dirs = []
    for k in range(2):
        save_client(tiny_base, tmp_path / f"client_{k}", rank=4, alpha=8, seed=k)
        dirs.append(tmp_path / f"client_{k}")
    if damage is not None:
        damage(dirs[1])
    out = tmp_path / "global"
    result = runner.invoke(app, ["aggregate", *map(str, dirs), "--out", str(out), *extra_args, "--aggregation", aggregation])
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    if damage is not None and damage is not drop_module:
        assert str(dirs[1]) in result.output
    assert not out.exists() and not list(tmp_path.glob(".global*"))


def test_missing_client_directory_and_existing_output(tiny_base, tmp_path):
    save_client(tiny_base, tmp_path / "c0", rank=4, alpha=8, seed=0)
    result = runner.invoke(app, ["aggregate", str(tmp_path / "c0"), str(tmp_path / "nope"), "--out", str(tmp_path / "g")])
    assert result.exit_code == 2 and "nope: adapter directory not found" in result.output
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "keep.txt").write_text("precious")
    result = runner.invoke(app, ["aggregate", str(tmp_path / "c0"), "--out", str(tmp_path / "g")])
    assert result.exit_code == 2 and "--force" in result.output
    assert (tmp_path / "g" / "keep.txt").read_text() == "precious"


def test_mixing_recorded_and_missing_sample_counts_is_an_error(tiny_base, tmp_path):
    save_client(tiny_base, tmp_path / "c0", rank=4, alpha=8, seed=0, num_samples=10)
    save_client(tiny_base, tmp_path / "c1", rank=4, alpha=8, seed=1)
    result = runner.invoke(app, ["aggregate", str(tmp_path / "c0"), str(tmp_path / "c1"), "--out", str(tmp_path / "g")])
    assert result.exit_code == 2 and "c1: no client.json" in result.output


def test_pickled_adapters_load_only_as_plain_tensors(tiny_base, tmp_path):
    client = tmp_path / "c0"
    save_client(tiny_base, client, rank=4, alpha=8, seed=0)
    state = load_file(client / ADAPTER_WEIGHTS)
    (client / ADAPTER_WEIGHTS).unlink()
    torch.save(state, client / "adapter_model.bin")
    assert set(read_adapter(client).modules) == {k.rsplit(".lora_", 1)[0] for k in state}

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Payload()}, client / "adapter_model.bin")
    result = runner.invoke(app, ["aggregate", str(client), "--out", str(tmp_path / "g")])
    assert result.exit_code == 2 and "weights_only=True" in result.output


TINYLLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
    "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4, "vocab_size": 32000,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-05,
}


@pytest.mark.parametrize("method, eff", [("fedit", 14.20), ("flora", 1.78), ("ffa", 28.41)])
def test_comm_reproduces_the_paper_eff_for_tinyllama(tmp_path, method, eff):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINYLLAMA_CONFIG))
    result = runner.invoke(app, ["comm", "--model-config", str(config), "--method", method, "--clients", "8", "--rank", "16", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert round(figures["eff_x1e4"], 2) == eff
    per_client_up = 22 * 16 * ((2048 + 2048) + (256 + 2048)) if method != "ffa" else 22 * 16 * (2048 + 256)
    assert figures["uplink_params_total"] == 8 * per_client_up
    assert figures["uplink_bytes_total"] == 4 * figures["uplink_params_total"]
    assert figures["downlink_params_total"] > 0 and figures["downlink_bytes_total"] == 4 * figures["downlink_params_total"]


def test_comm_uses_a_sidecars_selected_ranks(tiny_base, tmp_path, heterogeneous_clients):
    dirs, _, _ = heterogeneous_clients
    out = tmp_path / "global"
    assert runner.invoke(app, ["aggregate", *map(str, dirs), "--threshold", "0.6", "--out", str(out)]).exit_code == 0
    sidecar = json.loads((out / "aggregation.json").read_text())
    result = runner.invoke(app, [
        "comm", "--model-config", str(tiny_base), "--method", "florist", "--ranks", "8,4,2",
        "--selected-ranks", str(out / "aggregation.json"), "--json",
    ])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["eff_x1e4"] == pytest.approx(1e4 / sidecar["total_rank"])
    assert figures["downlink_params_total"] == sidecar["communication"]["downlink_params_total"]


@pytest.mark.parametrize(
    "module_key",
    ["model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
     "layers.0.self_attn.q_proj", "q_proj", "model.layers.0.mlp.gate_proj"],
)
def test_pattern_key_is_peft_matching_rule(module_key):
    from peft.utils.other import get_pattern_key

    from florist_hf.adapters import pattern_key

    patterns = ["model.layers.1.self_attn.q_proj", "layers.0.self_attn.q_proj", "v_proj", r"layers\.1\d\.self_attn\.q_proj",
                "self_attn.q_proj"]
    for keys in (patterns, patterns[::-1], [], ["gate_proj"]):
        assert pattern_key(keys, module_key) == get_pattern_key(keys, module_key)


def test_aggregate_command_imports_neither_transformers_nor_peft(tiny_base, tmp_path, heterogeneous_clients):
    """The server step is torch math on safetensors files: the CLI loads no model library for it."""
    import subprocess
    import sys

    clients = [str(path) for path in heterogeneous_clients[0]]
    script = (
        "import sys\n"
        "from florist_hf.cli import main\n"
        f"sys.argv = ['florist-hf', 'aggregate', *{clients!r}, '--out', {str(tmp_path / 'global')!r}]\n"
        "try:\n    main()\nexcept SystemExit as stop:\n    assert not stop.code, stop.code\n"
        "print(sorted(name for name in ('transformers', 'peft', 'datasets') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "global" / ADAPTER_WEIGHTS).is_file()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_single_non_finite_entry_anywhere_is_found(dtype, bad):
    """The reader's finiteness check (min/max, no temporary) sees one NaN or ±Inf wherever it sits,
    in contiguous and transposed factors, as isfinite().all() does."""
    from florist_hf.adapters import all_finite

    factor = torch.randn(96, 40).to(dtype)
    assert all_finite(factor) and all_finite(factor.T) and all_finite(factor[:0])
    for row, column in [(0, 0), (95, 39), (50, 17)]:
        damaged = factor.clone()
        damaged[row, column] = bad
        assert not all_finite(damaged) and not all_finite(damaged.T)
        assert all_finite(damaged) == bool(torch.isfinite(damaged).all())
