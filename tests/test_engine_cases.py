"""The round engine's state machine, fast: a table of cases (method × ranks × participation ×
aggregation × where a stop comes) driven with a fake client that writes each client's adapter
straight into its plan's export directory, as a trained client would. The real-Trainer tests in
test_federation.py stay; these check what the engine does with whatever the clients send, in
well under a second per case."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import delta_weights, quiet_console, relative_error, write_recipe

from florist_hf.adapters import read_adapter, save_adapter_files
from florist_hf.aggregation import get_method
from florist_hf.engine import Federation
from florist_hf.rundir import RunPaths
from florist_hf.global_state import read_global_state
from florist_hf.recipe import load_recipe

#: Module shapes of test_federation's tiny Llama (q_proj 32×32, v_proj 16×32).
SHAPES = {"base_model.model.model.layers.0.self_attn.q_proj": (32, 32), "base_model.model.model.layers.0.self_attn.v_proj": (16, 32)}


def fake_client(plan, base_path: str) -> None:
    """A client's adapter as training would leave it: random factors at its rank (continuing
    methods keep the global A where the method freezes it), and its client.json."""
    generator = torch.Generator().manual_seed(1000 * plan.round + plan.client_id)
    init = read_adapter(plan.init_adapter) if plan.init_adapter is not None else None
    factors = {}
    for name, (m, n) in SHAPES.items():
        lora_a = torch.randn(plan.rank, n, generator=generator) / n**0.5
        if plan.freeze_lora_a:
            lora_a = init.modules[name].lora_a[: plan.rank].float().clone()
        factors[name] = (torch.randn(m, plan.rank, generator=generator) * 0.05, lora_a)
    template = {"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": base_path,
                "task_type": "CAUSAL_LM"}
    save_adapter_files(plan.export_dir, factors, config_template=template, dtype=torch.float32,
                       client_info={"client": plan.client_id, "round": plan.round, "rank": plan.rank,
                                    "num_samples": plan.num_samples, "loss": 1.0, "steps": 1, "train_seconds": 0.0})


def drive(recipe, client_sizes, *, stop_after_clients: int | None = None, client=fake_client, console=None) -> Path:
    """`runner.run_federation`'s round loop with fake clients (``client(plan, base_path)``);
    ``stop_after_clients``: raise after that many clients have been written in all (a stop inside a round)."""
    federation = Federation(recipe, console=console or quiet_console())
    written = 0
    try:
        base_path = federation.open()
        federation.ensure_initial_adapter()
        for round_index in federation.round_indices:
            round_plan = federation.plan_round(round_index, client_sizes)
            if not round_plan.complete:
                trained = []
                for plan in round_plan.clients:
                    if not plan.export_dir.exists():
                        if stop_after_clients is not None and written == stop_after_clients:
                            raise KeyboardInterrupt
                        client(plan, base_path)
                        written += 1
                    if federation.accept(plan):
                        trained.append(plan)
                federation.aggregate(round_plan, trained)
            if not federation.is_recorded(round_index):
                federation.record_round(round_index, None)
        federation.finish(client_sizes)
    finally:
        federation.close()
    return federation.paths.root


CASES = [
    # method, ranks, clients per round, aggregation, rounds
    ("florist", (4, 2, 2), None, "stacked", 3),
    ("florist", (4, 4, 4, 4), 1, "stacked", 5),
    ("florist", (4, 2, 2), 2, "streaming", 4),
    ("flora", (4, 2, 2), None, "stacked", 3),
    ("flora", (2, 2, 2, 2), 2, "stacked", 5),
    ("fedit", (4, 2, 2), None, "stacked", 3),
    ("ffa", (4, 4, 4), 2, "stacked", 3),
    ("flexlora", (4, 2, 2), None, "stacked", 3),
    ("fedsvd", (4, 4, 2), None, "stacked", 3),
    ("fedsvd", (4, 4, 4), 1, "stacked", 4),
    ("fedex", (4, 4, 4), None, "stacked", 4),
]


def case_recipe(tmp_path, method, ranks, per_round, aggregation, rounds, out="run"):
    federation = {"clients_per_round": per_round, "eval_heldout_loss": False}
    if aggregation == "streaming":
        federation["aggregation"] = "streaming"
    return load_recipe(write_recipe(tmp_path, method=method, ranks=ranks, rounds=rounds, federation=federation),
                       [f"output_dir={tmp_path / out}"])


def test_partial_participation_with_mixed_ranks_is_refused_for_methods_that_continue_the_global_factors(tmp_path):
    from florist_hf.errors import FloristError

    with pytest.raises(FloristError, match="ffa continues the global factors at the largest rank of the round's clients"):
        case_recipe(tmp_path, "ffa", (4, 2, 2), 2, "stacked", 2)
    case_recipe(tmp_path, "florist", (4, 2, 2), 2, "stacked", 2)  # merge-style: any ranks
    case_recipe(tmp_path, "fedit", (4, 2, 2), None, "stacked", 2)  # every client every round


@pytest.mark.parametrize("method, ranks, per_round, aggregation, rounds", CASES,
                         ids=[f"{c[0]}-{len(c[1])}c-{c[2] or 'all'}-{c[3]}-{c[4]}r" for c in CASES])
def test_the_engine_publishes_what_its_rounds_aggregated_and_a_stop_anywhere_resumes_to_the_same(
        tmp_path, method, ranks, per_round, aggregation, rounds):
    recipe = case_recipe(tmp_path, method, ranks, per_round, aggregation, rounds)
    sizes = [16] * len(ranks)
    run_dir = drive(recipe, sizes)
    paths = RunPaths(run_dir)
    aggregator = get_method(method, threshold=0.9, aggregation=aggregation) if method == "florist" else get_method(method)

    # Each round's global is the method's aggregation of that round's client adapters, which
    # trained on what the round's plan gave them.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    round_lines = [r for r in records if r["kind"] == "round"]
    assert [r["round"] for r in round_lines] == list(range(1, rounds + 1))
    for line in round_lines:
        clients = [read_adapter(paths.client_dir(line["round"], k)) for k in line["clients"]]
        expected = aggregator.aggregate([c.modules for c in clients], [c.num_samples for c in clients])
        written = delta_weights(paths.global_dir(line["round"]))
        for name, module in expected.modules.items():
            assert relative_error(written[name], module.delta_weight) < 1e-5
    assert sum(r["kind"] == "client" for r in records) == sum(len(r["clients"]) for r in round_lines)

    published = delta_weights(run_dir / "global_adapter")
    if aggregator.holds_residual:  # the earlier rounds' residuals plus the last round's whole global
        residuals = [delta_weights(paths.global_dir(t) / "residual") for t in range(1, rounds)]
        last = delta_weights(paths.global_dir(rounds))
        for name in SHAPES:
            assert relative_error(published[name], last[name] + sum(r[name] for r in residuals)) < 1e-5
        state = read_global_state(paths.global_state_dir(rounds))
        assert state.rounds == list(range(1, rounds + 1))
    elif aggregator.merges_into_base:
        total = {name: sum(delta_weights(paths.global_dir(t))[name] for t in range(1, rounds + 1)) for name in SHAPES}
        state = read_global_state(paths.global_state_dir(rounds))
        assert state.rounds == list(range(1, rounds + 1))
        for name in SHAPES:
            assert relative_error(state.modules[name].delta_weight(), total[name]) < 1e-6
            assert relative_error(published[name], total[name]) < 1e-5
        if per_round is None:
            assert all(r["catch_up_downlink_bytes"] == 0 for r in round_lines)
    else:
        last = delta_weights(paths.global_dir(rounds))
        for name in SHAPES:
            assert relative_error(published[name], last[name]) < 1e-6
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["rounds_completed"] == rounds

    # A stop inside round 2 (after its first client), then the same call: the same run.
    first_round_clients = len(round_lines[0]["clients"])
    stopped = case_recipe(tmp_path, method, ranks, per_round, aggregation, rounds, out="stopped")
    with pytest.raises(KeyboardInterrupt):
        drive(stopped, sizes, stop_after_clients=first_round_clients + 1)
    resumed = drive(stopped, sizes)
    assert_same_run(resumed, run_dir, rounds)

    # A stop between a round's aggregation and its line: the line is rebuilt from the sidecar.
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    resumed_lines = [json.loads(line) for line in lines if json.loads(line)["kind"] == "round"]
    cut = next(i for i, line in enumerate(lines) if json.loads(line) == resumed_lines[-1])
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:cut]))
    shutil.rmtree(resumed / "global_adapter")
    for state_dir in resumed.glob("rounds/*/global_state"):
        shutil.rmtree(state_dir)  # and the states: rebuilt from the kept globals
    drive(stopped, sizes)
    assert_same_run(resumed, run_dir, rounds)
    rebuilt = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rebuilt if r["kind"] == "round"] == resumed_lines


def assert_same_run(run_dir: Path, reference: Path, rounds: int) -> None:
    for t in range(1, rounds + 1):
        got, expected = delta_weights(RunPaths(run_dir).global_dir(t)), delta_weights(RunPaths(reference).global_dir(t))
        for name in expected:
            assert relative_error(got[name], expected[name]) < 1e-6, (t, name)
    got, expected = delta_weights(run_dir / "global_adapter"), delta_weights(reference / "global_adapter")
    for name in expected:
        assert relative_error(got[name], expected[name]) < 1e-6, name


def test_client_seeds_are_distinct_for_thousands_of_clients_and_keep_the_original_scheme_below_1000():
    from florist_hf.clients.run import client_seed

    seeds = [client_seed(42, client, round_index) for client in range(3000) for round_index in range(1, 6)]
    assert len(set(seeds)) == len(seeds)
    assert client_seed(42, 7, 3) == 42 + 2000 + 7  # earlier runs reproduce
