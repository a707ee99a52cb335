"""The compact global state of merge-style federations: exact at any round count, bounded in size."""

import json
import math
import shutil

import pytest
import torch

from helpers import relative_error

from florist_hf.aggregation import ClientModule
from florist_hf.aggregation.cumulative import HeldUpdate, accumulate, add_held, dense_is_smaller, published_factors
from florist_hf.errors import FloristError
from florist_hf.global_state import (
    GlobalState,
    attach_global_state,
    detach_global_state,
    fold,
    fold_state,
    held_delta,
    read_global_state,
    record_wire_bytes,
    state_of_adapters,
    write_global_state,
)



def random_update(shape, rank, generator, scale=0.5, dtype=torch.float32) -> ClientModule:
    m, n = shape
    return ClientModule(lora_a=torch.randn(rank, n, generator=generator, dtype=dtype) / math.sqrt(n),
                        lora_b=torch.randn(m, rank, generator=generator, dtype=dtype) * 0.1, scale=scale)


def dense_of(update: ClientModule) -> torch.Tensor:
    return update.scale * update.lora_b.double() @ update.lora_a.double()


def test_accumulate_is_exact_and_low_rank_below_the_break_even():
    generator = torch.Generator().manual_seed(0)
    shape = (48, 40)
    updates = [random_update(shape, 3, generator) for _ in range(3)]
    held = None
    for update in updates:
        held = accumulate(held, [update])
    assert not held.is_dense and held.rank == 9  # 3 rounds of rank 3, nothing cancels
    assert relative_error(held.delta_weight(), sum(dense_of(u) for u in updates)) < 1e-12


def test_a_cancelling_update_lowers_the_held_rank():
    generator = torch.Generator().manual_seed(1)
    update = random_update((32, 24), 4, generator)
    opposite = ClientModule(lora_a=update.lora_a, lora_b=update.lora_b, scale=-update.scale)
    other = random_update((32, 24), 2, generator)
    held = accumulate(accumulate(None, [update, other]), [opposite])
    assert not held.is_dense and held.rank == 2
    assert relative_error(held.delta_weight(), dense_of(other)) < 1e-10


def test_the_held_update_goes_dense_at_the_break_even_and_stays_exact():
    generator = torch.Generator().manual_seed(2)
    shape = (24, 40)  # break-even rank: 24·40 / 64 = 15
    held, updates = None, []
    for _ in range(8):
        updates.append(random_update(shape, 3, generator))
        held = accumulate(held, [updates[-1]])
        if not held.is_dense:
            assert not dense_is_smaller(held.rank, shape)
        assert held.numel <= min(held.rank * sum(shape), shape[0] * shape[1])
    assert held.is_dense and held.dense.shape == shape
    assert relative_error(held.delta_weight(), sum(dense_of(u) for u in updates)) < 1e-12


def test_a_dense_catch_up_adds_to_a_low_rank_state():
    generator = torch.Generator().manual_seed(3)
    shape = (16, 20)
    low = accumulate(None, [random_update(shape, 2, generator)])
    dense = accumulate(None, [random_update(shape, 12, generator)])
    assert not low.is_dense and dense.is_dense
    for total in (add_held(low, dense), add_held(dense, low)):
        assert relative_error(total.delta_weight(), low.delta_weight() + dense.delta_weight()) < 1e-12


def test_fifty_rounds_stay_exact_and_bounded_in_size():
    """The state folded round after round from fp32 round updates: its error stays at round-off
    and does not grow with the rounds; its size is bounded by min(low-rank, dense)."""
    generator = torch.Generator().manual_seed(4)
    shapes = {"base_model.model.q": (64, 64), "base_model.model.v": (16, 64)}
    state, errors, sizes, exact = None, [], [], {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}
    for round_index in range(1, 51):
        updates = {name: random_update(shape, 4, generator) for name, shape in shapes.items()}
        adapter = type("Adapter", (), {"modules": updates, "path": f"round {round_index}"})
        state = fold(state, [adapter], [round_index])
        for name, update in updates.items():
            exact[name] += dense_of(update)
        errors.append(max(relative_error(held.delta_weight(), exact[name]) for name, held in state.modules.items()))
        sizes.append(state.numel)
    assert state.rounds == list(range(1, 51))
    assert max(errors) < 1e-6, errors
    assert errors[-1] < 10 * max(errors[:10]) + 1e-7  # no growth beyond fp32 round-off accumulation
    bound = sum(min(shape[0] * shape[1], 50 * 4 * sum(shape)) for shape in shapes.values())
    assert sizes[-1] <= bound and sizes[-1] == sizes[20]  # flat once every module is dense
    assert all(held.is_dense for held in state.modules.values())


def test_published_factors_are_exact_at_one_and_keep_the_energy_asked_for():
    generator = torch.Generator().manual_seed(5)
    shape = (40, 30)
    low = accumulate(None, [random_update(shape, 5, generator)])
    dense = accumulate(None, [random_update(shape, 25, generator)])
    for held in (low, dense):
        exact = published_factors(held, 1.0)
        assert relative_error(exact.lora_b.double() @ exact.lora_a.double(), held.delta_weight()) < 1e-10
        assert exact.rank == exact.exact_rank == (5 if held is low else 25) and exact.energy_kept == pytest.approx(1.0)
        truncated = published_factors(held, 0.8)
        assert truncated.rank < exact.rank and truncated.energy_kept >= 0.8
        sigma = exact.singular_values
        assert truncated.energy_kept == pytest.approx(float((sigma[:truncated.rank] ** 2).sum() / (sigma ** 2).sum()))


def test_a_state_round_trips_through_its_directory_and_names_what_is_broken(tmp_path):
    generator = torch.Generator().manual_seed(6)
    modules = {"base_model.model.q": accumulate(None, [random_update((12, 8), 2, generator)]),
               "base_model.model.v": accumulate(None, [random_update((6, 8), 7, generator)])}
    state = GlobalState({n: h.to(torch.float32) for n, h in modules.items()}, [1, 2], {"1": "a", "2": "b"})
    write_global_state(state, tmp_path / "state")
    again = read_global_state(tmp_path / "state")
    assert again.rounds == [1, 2] and again.inputs == {"1": "a", "2": "b"}
    for name, held in state.modules.items():
        assert again.modules[name].is_dense == held.is_dense
        assert torch.equal(again.modules[name].delta_weight(), held.delta_weight())
    record = json.loads((tmp_path / "state" / "global_state.json").read_text())
    assert record_wire_bytes(record) == state.wire_bytes == 4 * (2 * 20 + 6 * 8)

    (tmp_path / "state" / "global_state.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FloristError, match="global_state.safetensors: cannot be read"):
        read_global_state(tmp_path / "state")
    with pytest.raises(FloristError, match="not a florist-hf global state"):
        read_global_state(tmp_path / "missing")


def test_a_catch_up_of_several_rounds_gives_the_state_of_the_rounds_one_by_one():
    generator = torch.Generator().manual_seed(7)
    shapes = {"base_model.model.q": (32, 32)}
    adapters = [type("Adapter", (), {"modules": {n: random_update(s, 3, generator) for n, s in shapes.items()}, "path": str(t)})
                for t in range(1, 7)]
    one_by_one = None
    for t, adapter in enumerate(adapters, start=1):
        one_by_one = fold(one_by_one, [adapter], [t])
    held_by_node = fold(fold(None, [adapters[0]], [1]), [adapters[1]], [2])
    catch_up = fold(None, adapters[2:], [3, 4, 5, 6])
    caught_up = fold_state(held_by_node, catch_up)
    assert caught_up.rounds == one_by_one.rounds == [1, 2, 3, 4, 5, 6]
    name = "base_model.model.q"
    assert relative_error(caught_up.modules[name].delta_weight(), one_by_one.modules[name].delta_weight()) < 1e-6
    with pytest.raises(FloristError, match="repeats rounds"):
        fold_state(caught_up, catch_up)


def test_a_state_of_another_shape_is_refused_in_one_line():
    layer = torch.nn.Linear(8, 6)
    model = torch.nn.Sequential()
    model.add_module("q", layer)
    state = GlobalState({"base_model.model.q": HeldUpdate((5, 8), dense=torch.zeros(5, 8))}, [1])
    with pytest.raises(FloristError, match=r"module base_model.model.q is \(5, 8\), the model's layer \(6, 8\)"):
        attach_global_state(model, state)


def test_a_bf16_model_holds_fifty_rounds_at_its_forward_precision(tmp_path):
    """The exactness test at 50 rounds: a bf16 tiny Llama with the state of 50 rounds attached
    gives the logits of the fp64 base + Σ updates to bf16 forward precision, with no error that
    grows with the round count, and the base weights are never touched."""
    from transformers import AutoModelForCausalLM

    from florist_hf.tiny import build_tiny_llama

    base = build_tiny_llama(tmp_path / "base", num_layers=2, hidden_size=64, intermediate_size=128,
                            num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    names = [name for name, module in model.named_modules() if name.endswith(("q_proj", "v_proj"))]
    loaded = {name: dict(model.named_modules())[name].weight.detach().clone() for name in names}
    shapes = {f"base_model.model.{name}": tuple(dict(model.named_modules())[name].weight.shape) for name in names}
    generator = torch.Generator().manual_seed(8)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=generator)
    state, exact, errors = None, {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}, []
    for round_index in range(1, 51):
        updates = {name: random_update(shape, 4, generator, scale=0.2) for name, shape in shapes.items()}
        state = fold(state, [type("Adapter", (), {"modules": updates, "path": str(round_index)})], [round_index])
        for name, update in updates.items():
            exact[name] += dense_of(update)
        if round_index not in (1, 10, 25, 50):
            continue
        attach_global_state(model, state)
        for name in names:
            layer = dict(model.named_modules())[name]
            assert torch.equal(layer.weight, loaded[name])
            assert relative_error(held_delta(layer), exact[f"base_model.model.{name}"]) < 1e-6
        with torch.no_grad():
            logits = model.eval()(input_ids=input_ids).logits.double()
        detach_global_state(model)
        reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
        modules = dict(reference.named_modules())
        with torch.no_grad():
            for name in names:
                modules[name].weight += exact[f"base_model.model.{name}"]
            expected = reference.eval()(input_ids=input_ids).logits
        errors.append(relative_error(logits, expected))
    assert max(errors) < 2e-2, errors  # bf16 forward precision
    assert errors[-1] < 1.5 * errors[0] + 1e-3, errors  # no growth with the round count


def test_state_of_adapters_folds_round_global_adapters(tmp_path):
    from florist_hf.adapters import save_adapter_files

    generator = torch.Generator().manual_seed(9)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"], "base_model_name_or_path": "x"}
    dirs, expected = [], torch.zeros(6, 5, dtype=torch.float64)
    for t in range(3):
        b, a = torch.randn(6, 2, generator=generator), torch.randn(2, 5, generator=generator)
        save_adapter_files(tmp_path / f"g{t}", {"base_model.model.q": (b, a)}, config_template=config, dtype=torch.float32)
        dirs.append(tmp_path / f"g{t}")
        expected += b.double() @ a.double()  # save_adapter_files writes scale 1 (alpha = r)
    state = state_of_adapters(dirs)
    assert state.rounds == [1, 2, 3]
    assert relative_error(state.modules["base_model.model.q"].delta_weight(), expected) < 1e-6


# --- the state in a federation: run, resume, publishing, catch-up --------------------------------


def long_federation(tmp_path, rounds=6, **sections):
    from helpers import quiet_console, write_recipe

    from florist_hf.recipe import load_recipe
    from florist_hf.runner import run_federation

    recipe = load_recipe(write_recipe(
        tmp_path, ranks=(4, 4, 4, 4), rounds=rounds, federation={"clients_per_round": 1, "eval_heldout_loss": False},
        training={"max_steps": 1, "per_device_train_batch_size": 8, "learning_rate": 5e-2}, **sections))
    return recipe, run_federation(recipe, console=quiet_console())


def round_updates(run_dir, rounds):
    from helpers import delta_weights

    updates = [delta_weights(run_dir / "rounds" / str(t) / "global") for t in rounds]
    return {name: sum(update[name] for update in updates) for name in updates[0]}


def test_a_long_partial_federation_holds_one_compact_state_and_counts_compacted_catch_ups(tmp_path):
    """1 of 4 clients per round for 6 rounds on the tiny model (q, v: 32×32 and 16×32): the held
    update goes dense where that is smaller, only the two newest states are kept, a client that sat
    out several rounds is counted one compacted update, and the published adapter is the exact sum."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from florist_hf.global_state import lora_layers
    from florist_hf.rounds import missed_rounds
    from florist_hf.rundir import RunPaths

    recipe, run_dir = long_federation(tmp_path)
    paths = RunPaths(run_dir)
    kept = sorted(int(p.parent.name) for p in run_dir.glob("rounds/*/global_state"))
    assert kept == [5, 6]
    state = read_global_state(paths.global_state_dir(6))
    assert state.rounds == [1, 2, 3, 4, 5, 6]
    expected = round_updates(run_dir, range(1, 7))
    for name, held in state.modules.items():
        assert relative_error(held.delta_weight(), expected[name]) < 1e-6
        assert held.numel <= min(held.shape[0] * held.shape[1], held.rank * sum(held.shape))

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = {r["round"]: r for r in records if r["kind"] == "round"}
    for t in range(2, 7):
        missed = missed_rounds(paths, t)
        (client, lacking), = missed.items()
        if len(lacking) >= 2:  # one compacted update: never more than the rounds one by one, nor the whole state
            one_by_one = sum(rounds[s]["downlink_bytes_total"] for s in lacking)
            assert 0 < rounds[t]["catch_up_downlink_bytes"] <= one_by_one
        elif not lacking:
            assert rounds[t]["catch_up_downlink_bytes"] == 0

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "base_model"), run_dir / "global_adapter")
    for name, layer in lora_layers(model).items():
        assert relative_error(layer.get_delta_weight("default").detach().double(), expected[name]) < 1e-5
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["published"]["publish_threshold"] is None
    sidecar = json.loads((run_dir / "global_adapter" / "aggregation.json").read_text())
    assert sidecar["high_rank_modules"] == summary["published"]["high_rank_modules"]
    assert set(sidecar["high_rank_modules"]) <= set(sidecar["modules"])
    for name, module in sidecar["modules"].items():  # exact rank above a quarter of min(m, n), and only those
        assert (name in sidecar["high_rank_modules"]) == (module["exact_rank"] > min(module["shape"]) / 4)

    # Six rounds of rank 4 on 32×32 and 16×32 layers: no longer low-rank, and the model card says so.
    from florist_hf.hub import build_upload_folder

    assert sidecar["high_rank_modules"]
    card = (build_upload_folder(run_dir, tmp_path / "upload", repo_id="someone/long-federation") / "README.md").read_text()
    assert "cumulative update is no longer low-rank" in card and "florist-hf export --format merged" in card


def test_a_lost_or_stale_state_is_rebuilt_to_the_same_result_and_publish_threshold_republishes(tmp_path):
    from helpers import quiet_console

    from florist_hf.rundir import RunPaths
    from florist_hf.recipe import load_recipe
    from florist_hf.runner import run_federation

    recipe, run_dir = long_federation(tmp_path, rounds=4)
    paths = RunPaths(run_dir)
    published = (run_dir / "global_adapter" / "adapter_model.safetensors").read_bytes()
    state = read_global_state(paths.global_state_dir(4))
    for t in (3, 4):
        shutil.rmtree(paths.global_state_dir(t))
    run_federation(recipe, console=quiet_console())  # nothing to train: the state comes back from the globals
    rebuilt = read_global_state(paths.global_state_dir(4))
    for name, held in state.modules.items():
        assert torch.equal(rebuilt.modules[name].delta_weight(), held.delta_weight())
    assert (run_dir / "global_adapter" / "adapter_model.safetensors").read_bytes() == published

    compact = load_recipe(run_dir.parent / "recipe.yaml", ["publish.threshold=0.5"])
    run_federation(compact, console=quiet_console())  # a publish setting: no --force, nothing retrained
    sidecar = json.loads((run_dir / "global_adapter" / "aggregation.json").read_text())
    assert sidecar["publish_threshold"] == 0.5
    for module in sidecar["modules"].values():
        assert module["energy_kept"] >= 0.5 and module["selected_rank"] <= module["exact_rank"]
    assert sum(m["selected_rank"] for m in sidecar["modules"].values()) < sum(m["exact_rank"] for m in sidecar["modules"].values())
    clients = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "client"]
    assert len(clients) == 4


def test_publish_threshold_is_refused_for_a_method_that_publishes_its_last_factors(tmp_path):
    from helpers import write_recipe

    from florist_hf.recipe import load_recipe

    with pytest.raises(FloristError, match="publish.threshold truncates the cumulative update of florist, flora or fedex"):
        load_recipe(write_recipe(tmp_path, method="fedit", publish={"threshold": 0.9}))
