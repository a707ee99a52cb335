"""A FlowerTune user's path: ``recipes/flowertune_general_nlp.yaml`` is FlowerTune LLM's general-NLP setting (the
README's "Coming from FlowerTune" table), it takes every aggregation method, and it federates on SFTTrainer
clients with a method other than its FedAvg (the conformance test runs it as shipped, on both trainers)."""

from __future__ import annotations

import json
import math

import pytest
from test_recipes import REPO, conformance_overrides, run_recipe, stand_ins  # noqa: F401 - the stand-ins fixture

from florist_hf.errors import FloristError
from florist_hf.recipe import load_recipe, sample_clients

RECIPE = REPO / "recipes" / "flowertune_general_nlp.yaml"
LINEAR_LAYERS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_the_flowertune_recipe_is_flowertunes_general_nlp_setting_and_takes_every_method(tmp_path):
    from florist_hf.aggregation import METHODS
    from florist_hf.clients.config import client_training, training_arguments
    from florist_hf.clients.registry import trainer_kind

    recipe = load_recipe(RECIPE)
    data, lora, federation = recipe.data, recipe.lora, recipe.federation
    assert (data.source, data.format, data.partition, data.cutoff_len, data.train_on_inputs) == (
        "vicgalle/alpaca-gpt4", "alpaca", "iid", 512, False)
    assert (lora.ranks, lora.alphas, lora.dropout, set(lora.target_modules)) == (32, 64, 0.075, LINEAR_LAYERS)
    assert (federation.method, federation.rounds, federation.num_clients) == ("fedit", 100, 20)
    # strategy.fraction-fit 0.1 of 20 nodes: 2 clients a round, a fresh draw each round
    draws = [sample_clients(20, federation.clients_per_round, federation.seed, t) for t in range(1, 101)]
    assert {len(draw) for draw in draws} == {2} and len({tuple(draw) for draw in draws}) > 50
    # learning-rate-max in round 1, annealed by a cosine to learning-rate-min in the last round, constant within a round
    rates = [client_training(recipe, 0, t)["learning_rate"] for t in (1, 50, 100)]
    assert rates[0] == 5e-5 and rates[2] == pytest.approx(1e-6) and rates[0] > rates[1] > rates[2]
    assert rates[1] == pytest.approx(1e-6 + 0.5 * (5e-5 - 1e-6) * (1 + math.cos(math.pi * 49 / 99)))
    # TRL's SFTTrainer clients, their SFTConfig built as a client builds it
    assert recipe.client.trainer == "sft"
    args = training_arguments(trainer_kind("sft").config_class(), client_training(recipe, 3, 1), tmp_path, seed=0)
    assert type(args).__name__ == "SFTConfig"
    assert (args.max_length, args.completion_only_loss, args.max_steps, args.per_device_train_batch_size,
            args.gradient_accumulation_steps, args.lr_scheduler_type) == (512, True, 10, 16, 1, "constant")
    # every method takes the setting but FedEx-LoRA, whose clients cannot sit out rounds yet: it says so in one line
    for method in METHODS:
        if method == "fedex":
            with pytest.raises(FloristError, match="fedex with federation.clients_per_round is not supported yet"):
                load_recipe(RECIPE, [f"federation.method={method}"])
            load_recipe(RECIPE, [f"federation.method={method}", "federation.clients_per_round=null"])
        else:
            assert load_recipe(RECIPE, [f"federation.method={method}"]).federation.method == method


@pytest.mark.slow
def test_the_flowertune_recipe_federates_on_sft_clients_with_florist(tmp_path, stand_ins):
    """Two rounds of the recipe on the real SmolLM2 and data in alpaca-gpt4's schema, with FLoRIST: 2 of the 20
    clients train each round, and the published adapter holds every linear layer of every block."""
    from florist_hf.adapters import read_adapter

    overrides = [*conformance_overrides(RECIPE, tmp_path / "run", stand_ins), "federation.rounds=2",
                 "federation.method=florist", "federation.threshold=0.9"]
    result = run_recipe(RECIPE, overrides)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"

    run_dir = tmp_path / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    clients = [record for record in records if record["kind"] == "client"]
    assert sorted((record["round"], record["client"]) for record in clients) == sorted(
        (t, k) for t in (1, 2) for k in sample_clients(20, 0.1, 42, t))
    assert all(record["finite"] and record["steps"] == 1 for record in clients)
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["method"] == "florist"
    adapter = read_adapter(run_dir / "global_adapter")
    assert {name.rsplit(".", 1)[-1] for name in adapter.modules} == LINEAR_LAYERS
    assert len(adapter.modules) == 7 * 30  # SmolLM2-135M's 30 blocks
