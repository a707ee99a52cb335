"""QLoRA clients: the base in 4 bit (bitsandbytes, NF4 with double quantisation) on the CPU."""

import json

import pytest
import torch
from helpers import delta_weights, quiet_console, record_client_base_layers, relative_error, write_recipe

from florist_hf.recipe import load_recipe
from florist_hf.runner import run_federation

pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install bitsandbytes)")

QUANTIZATION = "model.quantization={bits: 4, quant_type: nf4, double_quant: true, compute_dtype: float32}"
TINY = {"num_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}


@pytest.mark.parametrize("method", ["florist", "fedit"])
def test_qlora_clients_train_on_the_4bit_base_and_publish_a_peft_adapter(tmp_path, monkeypatch, method):
    from bitsandbytes.nn import Linear4bit

    seen = record_client_base_layers(monkeypatch)
    data = {"partition": "dirichlet", "holdout_per_label": 2, "min_client_size": 10, "cutoff_len": 256}
    recipe = load_recipe(write_recipe(tmp_path, method=method, rounds=2, data=data, model={"tiny": TINY}), [QUANTIZATION])
    run_dir = run_federation(recipe, console=quiet_console())
    clients = seen[1:] if method == "fedit" else seen  # FedIT's round-0 shared LoRA init needs only the shapes
    assert len(clients) == 2 * 3 and set(clients) == {Linear4bit}  # every client trained on the quantized base

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["finite"] for r in records if r["kind"] == "client")
    assert all(r["heldout_loss"] > 0 for r in records if r["kind"] == "round")
    # The published adapter is an ordinary PEFT adapter of the unquantized base: it holds the run's update.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from florist_hf.global_state import lora_layers

    expected_dirs = ["rounds/1/global", "rounds/2/global"] if method == "florist" else ["rounds/2/global"]
    rounds = [delta_weights(run_dir / d) for d in expected_dirs]
    expected = {name: sum(r[name] for r in rounds) for name in rounds[0]}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "base_model"), run_dir / "global_adapter")
    for name, layer in lora_layers(model).items():
        assert relative_error(layer.get_delta_weight("default").detach().double(), expected[name]) < 1e-5


def test_global_updates_ride_beside_the_4bit_weights_exactly(tmp_path):
    """Merge-style: the 4-bit weights are never changed; the held updates add exactly B_g·A_g·x."""
    from florist_hf.global_state import attach_global_state, detach_global_state, state_of_adapters
    from florist_hf.loading import load_causal_lm
    from florist_hf.recipe import QuantizationSection

    run_dir = run_federation(load_recipe(write_recipe(tmp_path, rounds=1, model={"tiny": TINY}), [QUANTIZATION]),
                             console=quiet_console())
    quantization = QuantizationSection(compute_dtype="float32")
    model = load_causal_lm(str(run_dir / "base_model"), quantization=quantization)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features)
    plain = layer(x)
    packed = layer.weight.data.clone()  # after the first forward: bitsandbytes' CPU path repacks the weight then
    attach_global_state(model, state_of_adapters([run_dir / "rounds/1/global"]))
    update = delta_weights(run_dir / "rounds/1/global")["base_model.model.model.layers.0.self_attn.q_proj"]
    assert relative_error((layer(x) - plain).double(), x.double() @ update.T) < 1e-5
    assert torch.equal(layer.weight.data, packed)
    detach_global_state(model)
    assert torch.equal(layer(x), plain)


def test_gradients_through_the_4bit_base_stay_exact_after_an_evaluation(tmp_path):
    """A held-out evaluation (eval mode, no grad) must not leave the 4-bit weights in bitsandbytes'
    CPU inference layout, whose kernel has no backward: the next client's gradients would be wrong."""
    from bitsandbytes.functional import dequantize_4bit

    from florist_hf.loading import load_causal_lm
    from florist_hf.recipe import QuantizationSection
    from florist_hf.tiny import build_tiny_llama

    base = build_tiny_llama(tmp_path / "base", **{"num_layers": 2, **{k: v for k, v in TINY.items() if k != "num_layers"}})
    model = load_causal_lm(str(base), quantization=QuantizationSection(compute_dtype="float32"))
    model.eval()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]))  # what the held-out loss does between rounds
    model.train()
    layer = model.model.layers[1].self_attn.q_proj
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert torch.allclose(x.grad, torch.ones(2, 5, layer.out_features) @ weight, atol=1e-5)
