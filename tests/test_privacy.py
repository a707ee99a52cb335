"""Differential privacy and robust aggregation: DP-SGD clients and their accounting, client-level
update bounding, central DP for the linear methods, robust statistics and the outlier report."""

import io
import json
import math

import numpy as np
import pytest
import torch
from rich.console import Console
from test_engine_cases import SHAPES, drive, fake_client
from helpers import delta_weights, quiet_console, record_client_base_layers, relative_error, write_recipe

from florist_hf.adapters import read_adapter, save_adapter_files
from florist_hf.aggregation import ClientModule, get_method
from florist_hf.aggregation.bounding import bound_client, low_rank_inner, low_rank_norm, robust_combine, update_norm
from florist_hf.rundir import RunPaths
from florist_hf.errors import FloristError
from florist_hf.recipe import load_recipe

# --- factor-space norms ---------------------------------------------------------------------------


def test_factor_space_norms_and_inner_products_equal_the_dense_ones():
    generator = torch.Generator().manual_seed(0)
    b1, a1 = torch.randn(300, 7, generator=generator, dtype=torch.float64), torch.randn(7, 200, generator=generator, dtype=torch.float64)
    b2, a2 = torch.randn(300, 3, generator=generator, dtype=torch.float64), torch.randn(3, 200, generator=generator, dtype=torch.float64)
    dense1, dense2 = b1 @ a1, b2 @ a2
    assert low_rank_norm(b1, a1) == pytest.approx(float(dense1.norm()), rel=1e-10)
    assert low_rank_inner(b1, a1, b2, a2) == pytest.approx(float((dense1 * dense2).sum()), rel=1e-10)

    # A whole adapter: the norm over every module of s·B·A; a continued client: of its factors' change.
    modules = {"q": ClientModule(a1.float(), b1.float(), 0.5), "v": ClientModule(a2.float(), b2.float(), 2.0)}
    dense = math.sqrt(sum((m.scale * m.lora_b.double() @ m.lora_a.double()).square().sum() for m in modules.values()))
    assert update_norm(modules) == pytest.approx(dense, rel=1e-10)
    reference = {"q": ClientModule(a1.float() + 1, b1.float() * 3, 1.0), "v": ClientModule(a2.float(), b2.float(), 1.0)}
    change = sum(float((m.scale * m.lora_b.double() - reference[n].lora_b.double()).square().sum()
                       + (m.lora_a.double() - reference[n].lora_a.double()).square().sum()) for n, m in modules.items())
    assert update_norm(modules, reference) == pytest.approx(math.sqrt(change), rel=1e-10)


def test_a_bounded_client_has_the_clip_norm_and_an_unbounded_one_is_left_as_it_is():
    generator = torch.Generator().manual_seed(1)
    modules = {"q": ClientModule(torch.randn(4, 32, generator=generator), torch.randn(32, 4, generator=generator) * 1e6, 2.0)}
    bounded, bound = bound_client(modules, 0.5)
    assert bound.norm > 1e6 and bound.factor == pytest.approx(0.5 / bound.norm)
    assert update_norm(bounded) == pytest.approx(0.5, rel=1e-9)
    same, untouched = bound_client(modules, 1e12)
    assert untouched.factor == 1.0 and same["q"] is modules["q"]
    reference = {"q": ClientModule(torch.zeros(4, 32), torch.zeros(32, 4), 1.0)}
    continued, _ = bound_client(modules, 0.5, reference=reference)
    assert update_norm(continued, reference) == pytest.approx(0.5, rel=1e-9)


def test_robust_statistics_combine_each_component_over_the_clients_that_have_it():
    generator = torch.Generator().manual_seed(2)
    tensors = [torch.randn(5, rank, generator=generator) for rank in (4, 2, 2, 3, 4)]
    median = robust_combine(tensors, 4, 1, "median")
    trimmed = robust_combine(tensors, 4, 1, "trimmed_mean", trim_fraction=0.2)
    for j in range(4):
        column = np.stack([t[:, j].double().numpy() for t in tensors if t.shape[1] > j])
        np.testing.assert_allclose(median[:, j].numpy(), np.median(column, axis=0), rtol=1e-12)
        ordered = np.sort(column, axis=0)
        cut = int(0.2 * len(column))
        np.testing.assert_allclose(trimmed[:, j].numpy(), ordered[cut:len(column) - cut].mean(axis=0), rtol=1e-12)


# --- the server: bounding, outliers, central DP, robust ---------------------------------------------


def poisoning_client(poisoned: int, factor: float = 1e6):
    """Fake clients (`test_engine_cases.fake_client`), one of which sends its update ``factor`` times larger."""

    def client(plan, base_path):
        fake_client(plan, base_path)
        if plan.client_id == poisoned:
            adapter = read_adapter(plan.export_dir)
            factors = {name: (m.scale * m.lora_b * factor, m.lora_a) for name, m in adapter.modules.items()}
            info = json.loads((plan.export_dir / "client.json").read_text())
            save_adapter_files(plan.export_dir, factors, config_template=adapter.config, client_info=info)

    return client


def engine_recipe(tmp_path, method, ranks=(4, 2, 2), rounds=2, out="run", **federation):
    return load_recipe(write_recipe(tmp_path, method=method, ranks=ranks, rounds=rounds,
                                    federation={"eval_heldout_loss": False, **federation}), [f"output_dir={tmp_path / out}"])


def test_a_client_sending_a_million_fold_update_is_bounded_and_florist_aggregates_the_clipped_updates(tmp_path):
    clip = 0.05
    log = io.StringIO()
    run_dir = drive(engine_recipe(tmp_path, "florist", clip_update_norm=clip), [16, 16, 16], client=poisoning_client(1),
                    console=Console(file=log, width=300))
    paths = RunPaths(run_dir)
    florist = get_method("florist", threshold=0.9)
    for round_index in (1, 2):
        clients = [read_adapter(paths.client_dir(round_index, k)) for k in range(3)]
        clipped = []
        for client in clients:
            scale = min(1.0, clip / update_norm(client.modules))
            clipped.append({name: ClientModule(m.lora_a, m.lora_b, m.scale * scale) for name, m in client.modules.items()})
        expected = florist.aggregate(clipped, [16, 16, 16])
        written = delta_weights(paths.global_dir(round_index))
        for name, module in expected.modules.items():
            assert relative_error(written[name], module.delta_weight) < 1e-5
        # The global update is a weighted mean of updates of norm ≤ C, truncated: its norm is ≤ C.
        assert math.sqrt(sum(float(w.square().sum()) for w in written.values())) <= clip * (1 + 1e-6)
        sidecar = json.loads((paths.global_dir(round_index) / "aggregation.json").read_text())
        poisoned = sidecar["clients"][1]
        assert poisoned["clipped"] and poisoned["update_norm"] > 1e4 and poisoned["clip_factor"] < 1e-4
        assert sidecar["outliers"] == ["client_1"]
        assert len(sidecar["modules"][next(iter(SHAPES))]["clients"]) == 3  # per module: norm and cosine
        assert all(-1 <= row["cosine"] <= 1 for row in sidecar["modules"][next(iter(SHAPES))]["clients"])
        # The report's per-module norms (taken from the bound) are those of the updates as sent.
        for name, rows in sidecar["modules"].items():
            for row, client in zip(rows["clients"], clients):
                module = client.modules[name]
                dense = module.scale * (module.lora_b.double() @ module.lora_a.double())
                assert row["norm"] == pytest.approx(float(dense.norm()), rel=1e-9)
    assert "client_1: update norm" in log.getvalue() and "the round's median" in log.getvalue()

    # Without the bound the poisoned client owns the global update; the report still names it.
    unbounded = drive(engine_recipe(tmp_path, "florist", out="unbounded"), [16, 16, 16], client=poisoning_client(1))
    sidecar = json.loads((RunPaths(unbounded).global_dir(1) / "aggregation.json").read_text())
    assert sidecar["outliers"] == ["client_1"] and "bounding" not in sidecar
    assert sum(float(w.square().sum()) for w in delta_weights(RunPaths(unbounded).global_dir(1)).values()) > 1e6


def test_clipping_a_continued_client_bounds_the_change_of_its_factors(tmp_path):
    clip = 0.1
    run_dir = drive(engine_recipe(tmp_path, "fedit", ranks=(4, 4, 4), clip_update_norm=clip), [16, 16, 16], client=poisoning_client(2))
    paths = RunPaths(run_dir)
    for round_index in (1, 2):
        sent = read_adapter(paths.global_dir(round_index - 1)).modules
        result = read_adapter(paths.global_dir(round_index)).modules
        # FedIT averages with weights summing to 1: the global's change is a mean of changes of norm ≤ C.
        assert update_norm({n: ClientModule(m.lora_a, m.lora_b, m.scale) for n, m in result.items()}, sent) <= clip * (1 + 1e-6)
        sidecar = json.loads((paths.global_dir(round_index) / "aggregation.json").read_text())
        assert sidecar["bounding"]["bounded"].startswith("the factors' change")
        assert sidecar["clients"][2]["clipped"]


def test_central_dp_adds_calibrated_noise_to_the_clipped_mean_and_accounts_it_over_rounds(tmp_path):
    from opacus.accountants import RDPAccountant

    clip, sigma = 0.1, 0.8
    recipe = engine_recipe(tmp_path, "ffa", ranks=(4, 4, 4, 4), rounds=3, clients_per_round=2, clip_update_norm=clip,
                           central_dp={"noise_multiplier": sigma, "delta": 1e-3})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "privacy-seed").write_text("ab" * 32)  # a fixed secret: the same noise on every test run
    run_dir = drive(recipe, [16] * 4)
    paths = RunPaths(run_dir)
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if r["kind"] == "round"]
    noises = []
    for line in rounds:
        t = line["round"]
        sent = read_adapter(paths.global_dir(t - 1)).modules
        clients = [read_adapter(paths.client_dir(t, k)).modules for k in line["clients"]]
        bounded = [bound_client(c, clip, reference=sent, freezes_lora_a=True)[0] for c in clients]
        # The noiseless mean with the fixed denominator (the 2 clients sampled), each client alike.
        result = read_adapter(paths.global_dir(t)).modules
        residuals = []
        for name, module in result.items():
            mean_b = sum(c[name].scale * c[name].lora_b.double() for c in bounded) / 2
            residuals.append((module.lora_b.double() - mean_b).flatten())
            assert torch.equal(module.lora_a, sent[name].lora_a)  # FFA's frozen A: no noise on it
        noises.append(torch.cat(residuals))
        accountant = RDPAccountant()
        accountant.history = [(sigma, 2 / 4, t)]
        sidecar = json.loads((paths.global_dir(t) / "aggregation.json").read_text())
        assert sidecar["bounding"]["central_dp"]["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-3), rel=1e-9)
        assert line["central_epsilon"] == sidecar["bounding"]["central_dp"]["epsilon"]
        assert all(client["weight"] == pytest.approx(0.5) for client in sidecar["clients"])
    # 576 draws of N(0, (σ·C/n)²): their spread is within 4 standard errors (3 % each) of σ·C/n, their mean near 0.
    noise = torch.cat(noises)
    assert float(noise.std()) == pytest.approx(sigma * clip / 2, rel=0.12)
    assert abs(float(noise.mean())) < 4 * sigma * clip / 2 / noise.numel() ** 0.5
    epsilons = [r["central_epsilon"] for r in rounds]
    assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]
    summary = json.loads((run_dir / "run.json").read_text())["privacy"]
    assert summary["client_level"]["epsilon"] == epsilons[-1]

    # The noise is drawn from the run directory's secret, not the recipe: re-aggregating the same round
    # in the same directory gives the same bits; another directory's secret gives other noise.
    first = read_adapter(paths.global_dir(1))
    again = drive(engine_recipe(tmp_path, "ffa", ranks=(4, 4, 4, 4), rounds=3, clients_per_round=2, clip_update_norm=clip,
                                central_dp={"noise_multiplier": sigma, "delta": 1e-3}, out="other"), [16] * 4)
    other = read_adapter(RunPaths(again).global_dir(1))
    name = next(iter(first.modules))
    assert not torch.equal(first.modules[name].lora_b, other.modules[name].lora_b)
    assert oct((again / "privacy-seed").stat().st_mode & 0o777) == "0o600"  # made by the run: its owner alone reads it


def test_central_dp_calibrates_its_noise_to_a_target_epsilon(tmp_path):
    run_dir = drive(engine_recipe(tmp_path, "fedit", ranks=(4, 4, 4), rounds=2, clip_update_norm=0.1,
                                  central_dp={"target_epsilon": 4.0, "delta": 1e-3}), [16, 16, 16])
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rounds if r["kind"] == "round"][-1]
    assert 3.9 <= last["central_epsilon"] <= 4.0


@pytest.mark.parametrize("method", ["fedit", "ffa"])
def test_central_dp_on_a_mean_of_factors_refuses_uneven_client_ranks_in_one_line(tmp_path, method):
    path = write_recipe(tmp_path, method=method, ranks=(4, 2, 2),
                        federation={"clip_update_norm": 0.1, "central_dp": {"noise_multiplier": 1.0}})
    with pytest.raises(FloristError) as error:
        load_recipe(path)
    assert "central_dp on a mean of factors needs one LoRA rank for every client (got [2, 4])" in str(error.value)
    assert "\n" not in str(error.value)


def test_a_robust_median_keeps_a_poisoned_client_from_moving_the_factors(tmp_path):
    run_dir = drive(engine_recipe(tmp_path, "fedit", ranks=(4, 4, 4), rounds=1, robust="median"), [16, 16, 16],
                    client=poisoning_client(0))
    paths = RunPaths(run_dir)
    clients = [read_adapter(paths.client_dir(1, k)).modules for k in range(3)]
    result = read_adapter(paths.global_dir(1)).modules
    for name, module in result.items():
        stacked = torch.stack([c[name].scale * c[name].lora_b.double() for c in clients])
        torch.testing.assert_close(module.lora_b.double(), stacked.median(dim=0).values, rtol=1e-6, atol=1e-7)
        assert float(module.lora_b.abs().max()) < 10  # the poisoned client's B is ~1e5
    sidecar = json.loads((paths.global_dir(1) / "aggregation.json").read_text())
    assert sidecar["options"] == {"robust": "median"}


# --- recipes: what breaks a guarantee is refused in one line ------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"privacy": {"max_grad_norm": 1.0}}, "give privacy one of target_epsilon"),
    ({"privacy": {"target_epsilon": 3, "noise_multiplier": 1.0}}, "give privacy one of target_epsilon"),
    ({"privacy": {"target_epsilon": 3}, "training": {"gradient_accumulation_steps": 2}}, "training.gradient_accumulation_steps cannot"),
    ({"privacy": {"target_epsilon": 3}, "training": {"deepspeed": "ds.json"}}, "training.deepspeed cannot be used with privacy"),
    ({"privacy": {"target_epsilon": 3}, "training": {"gradient_checkpointing": True}}, "training.gradient_checkpointing cannot"),
    # transformers 5's own name for it (gradient_checkpointing its deprecated alias): a traceback from Opacus before
    ({"privacy": {"target_epsilon": 3}, "training": {"activation_checkpointing": True}}, "training.activation_checkpointing cannot"),
    ({"privacy": {"target_epsilon": 3}, "training": {"max_grad_norm": 1.0}}, "privacy.max_grad_norm"),
    ({"privacy": {"target_epsilon": 3}, "client_training": {1: {"save_steps": 1}}}, "client_training.1.save_steps cannot"),
    ({"privacy": {"target_epsilon": 3}, "training": {"train_sampling_strategy": "group_by_length"}},
     "training.train_sampling_strategy cannot"),
    ({"privacy": {"target_epsilon": -1}}, "privacy.target_epsilon: Input should be greater than 0"),
    ({"federation": {"method": "flora", "central_dp": {"noise_multiplier": 1.0}, "clip_update_norm": 1.0}},
     "central_dp needs an aggregation the server can noise (fedit, ffa, florist); flora needs each client's factors"),
    ({"federation": {"central_dp": {"noise_multiplier": 1.0}, "clip_update_norm": 1.0}},
     "central_dp with florist noises the two sketch sums of the clients' bounded updates, which secure aggregation computes"),
    ({"federation": {"central_dp": {"noise_multiplier": 1.0}, "clip_update_norm": 1.0,
                     "secure_aggregation": {"enabled": True, "sketch_columns": 4}}},
     "central_dp with a narrower sketch: its error-check sum is not noised"),
    ({"federation": {"method": "fedit", "central_dp": {"noise_multiplier": 1.0}}}, "calibrates its noise to federation.clip_update_norm"),
    ({"federation": {"robust": "median"}}, "robust combines factors coordinate by coordinate"),
    ({"federation": {"method": "flexlora", "clip_update_norm": 1.0}}, "flexlora aggregates each client's whole product"),
    ({"federation": {"method": "fedit", "clip_update_norm": 1.0, "robust": "median", "central_dp": {"target_epsilon": 1}}},
     "use one of them"),
    ({"federation": {"clip_update_norm": 0}}, "clip_update_norm: Input should be greater than 0"),
])
def test_settings_that_break_a_guarantee_are_refused_in_one_line(tmp_path, change, message):
    path = write_recipe(tmp_path, ranks=(4, 4, 4), **change)
    with pytest.raises(FloristError) as error:
        load_recipe(path)
    assert message in str(error.value) and "\n" not in str(error.value)


# --- DP-SGD clients ---------------------------------------------------------------------------------


def tiny_dp_setup(tmp_path, records=6, quantization=None, model_shape=None):
    from florist_hf.clients.run import build_lora_model
    from florist_hf.data import tokenize_records
    from florist_hf.loading import load_tokenizer
    from florist_hf.tiny import build_tiny_llama
    from helpers import TINY_MODEL

    base = build_tiny_llama(tmp_path / "base", **(model_shape or TINY_MODEL))
    tokenizer = load_tokenizer(str(base))
    data = [{"instruction": f"Say {word} {i} times.", "input": "", "output": f"{word} " * (i + 1)}
            for i, word in enumerate(["one", "two", "three", "four", "five", "six", "seven", "eight"][:records])]
    dataset = tokenize_records(data, tokenizer, cutoff_len=256, train_on_inputs=False)  # byte tokens: the prompt is ~170
    model = build_lora_model(str(base), rank=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.0, use_rslora=False, seed=3,
                             quantization=quantization)
    return tokenizer, dataset, model


#: QLoRA's base: NF4 with double quantisation, LoRA in fp32 (bitsandbytes' 4-bit blocks need widths of 64).
QLORA_SHAPE = {"num_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}


def qlora(bits=4):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install bitsandbytes)")
    from florist_hf.recipe import QuantizationSection

    return QuantizationSection(bits=bits, quant_type="nf4", double_quant=True, compute_dtype="float32")


def per_record_gradients(model, tokenizer, dataset):
    """Each record's gradient of its own mean token loss on the LoRA factors, one record at a time."""
    from florist_hf.data import make_collator

    collate = make_collator(tokenizer, "padded")
    trainable = [p for p in model.parameters() if p.requires_grad]
    gradients = []
    for index in range(len(dataset)):
        batch = collate([dataset[index]])
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        loss = losses.sum() / (targets != -100).sum()
        gradients.append([g.detach().clone() for g in torch.autograd.grad(loss, trainable)])
    return gradients


@pytest.mark.parametrize("base", ["full", "4bit"])
def test_a_dp_sgd_step_is_the_mean_of_each_records_clipped_gradient_plus_noise(tmp_path, base):
    """On a full-precision base and on QLoRA's 4-bit one (the per-record gradients of the LoRA factors
    flow back through bitsandbytes' dequantizing matmuls; Opacus sees only the LoRA layers)."""
    from florist_hf.clients.run import build_client_trainer
    from florist_hf.clients.dp_sgd import ClientPrivacy

    if base == "4bit":
        from bitsandbytes.nn import Linear4bit

        tokenizer, dataset, model = tiny_dp_setup(tmp_path, quantization=qlora(), model_shape=QLORA_SHAPE)
        assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    else:
        tokenizer, dataset, model = tiny_dp_setup(tmp_path)
    model.train()
    clip = 0.05
    gradients = per_record_gradients(model, tokenizer, dataset)
    norms = [math.sqrt(sum(float(g.square().sum()) for g in record)) for record in gradients]
    assert min(norms) > clip  # every record is clipped: the test sees the clipping, not only the mean
    expected = [sum(min(1.0, clip / (n + 1e-6)) * record[i] for record, n in zip(gradients, norms)) / len(dataset)
                for i in range(len(gradients[0]))]
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    def one_step(noise_multiplier, work):
        # q = 1: every record in the one step; plain SGD at lr 1 moves the factors by minus the gradient.
        privacy = ClientPrivacy(noise_multiplier=noise_multiplier, max_grad_norm=clip, sample_rate=1.0,
                                num_samples=len(dataset), steps=1, delta=1e-3, accountant="rdp",
                                rounds_planned=1, rounds_so_far=1)
        for parameter, start in zip((p for p in model.parameters() if p.requires_grad), before):
            parameter.data.copy_(start)
        trainer = build_client_trainer(
            model, tokenizer, dataset, work_dir=tmp_path / work, seed=0, privacy=privacy, noise_seed=11,
            training={"max_steps": 1, "per_device_train_batch_size": len(dataset), "learning_rate": 1.0, "optim": "sgd",
                      "lr_scheduler_type": "constant", "weight_decay": 0.0, "use_cpu": True})
        trainer.train()
        return [start - p.detach() for p, start in zip((p for p in model.parameters() if p.requires_grad), before)]

    stepped = one_step(0.0, "noiseless")
    for got, want in zip(stepped, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    noisy = one_step(1.0, "noisy")
    spread = torch.cat([(got - want).flatten() for got, want in zip(noisy, expected)])
    assert float(spread.std()) == pytest.approx(1.0 * clip / len(dataset), rel=0.1)  # σ·C / expected batch
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())  # Opacus' hooks and attributes are gone


def dp_recipe(tmp_path, rounds=3, per_round=2, target=5.0, dtype="float32", federation=None, **training):
    return load_recipe(write_recipe(
        tmp_path, ranks=(4, 2, 2), rounds=rounds, federation={"clients_per_round": per_round, **(federation or {})},
        model={"dtype": dtype},
        training={"max_steps": -1, "num_train_epochs": 1, "per_device_train_batch_size": 4, **training},
        privacy={"target_epsilon": target, "max_grad_norm": 1.0, "delta": 1e-3, "accountant": "rdp"}))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_dp_sgd_federation_records_each_clients_epsilon_composed_over_its_rounds(tmp_path, dtype):
    from opacus.accountants import RDPAccountant

    from florist_hf.recipe import sample_clients
    from florist_hf.runner import run_federation

    recipe = dp_recipe(tmp_path, dtype=dtype, **({"bf16": True, "use_cpu": True} if dtype == "bfloat16" else {}))
    run_dir = run_federation(recipe, console=quiet_console())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in records if r["kind"] == "client"]
    assert clients and all("epsilon" in r for r in clients)
    for client in range(3):
        rounds = [t for t in (1, 2, 3) if client in sample_clients(3, 2, recipe.federation.seed, t)]
        lines = [r for r in clients if r["client"] == client]
        assert [r["round"] for r in lines] == rounds
        for count, line in enumerate(lines, start=1):
            privacy = line["privacy"]
            assert privacy["sample_rate"] == pytest.approx(4 / line["num_samples"])
            assert privacy["steps"] == line["steps"] == int(1 / privacy["sample_rate"])
            accountant = RDPAccountant()
            accountant.history = [(privacy["noise_multiplier"], privacy["sample_rate"], privacy["steps"] * count)]
            assert line["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-3), rel=1e-9)
            single = RDPAccountant()
            single.history = [(privacy["noise_multiplier"], privacy["sample_rate"], privacy["steps"])]
            assert line["epsilon_round"] == pytest.approx(single.get_epsilon(delta=1e-3), rel=1e-9)
        # The noise was calibrated so that the client's planned rounds spend the target, and no more.
        assert 5.0 - 0.1 <= lines[-1]["epsilon"] <= 5.0
        assert all(line["finite"] for line in lines)
    summary = json.loads((run_dir / "run.json").read_text())["privacy"]["record_level"]
    assert summary["epsilon_max"] == max(r["epsilon"] for r in clients if r["round"] == max(
        l["round"] for l in clients if l["client"] == r["client"]))

    from florist_hf.hub import build_upload_folder

    upload = build_upload_folder(run_dir, tmp_path / "upload", repo_id="org/dp")
    card = (upload / "README.md").read_text()
    assert "per client, record-level" in card and f"{summary['epsilon_max']:.2f}" in card
    # Each client's (ε, δ) gives away its record count (δ = 1/N): private unless client details are included.
    public = json.loads((upload / "run.json").read_text())["privacy"]["record_level"]
    assert "per_client" not in public and public["epsilon_max"] == summary["epsilon_max"]
    public_sidecar = json.loads((upload / "aggregation.json").read_text())
    assert "outliers" not in public_sidecar and all("clients" not in m for m in public_sidecar["modules"].values())


def test_dp_sgd_qlora_clients_train_on_the_4bit_base_spend_their_budget_and_publish_a_peft_adapter(tmp_path, monkeypatch):
    from bitsandbytes.nn import Linear4bit
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from florist_hf.global_state import lora_layers
    from florist_hf.runner import run_federation

    quantization = qlora()
    seen = record_client_base_layers(monkeypatch)
    recipe = load_recipe(write_recipe(
        tmp_path, ranks=(4, 2, 2), rounds=2, model={"tiny": QLORA_SHAPE, "quantization": quantization.model_dump()},
        training={"max_steps": -1, "num_train_epochs": 1, "per_device_train_batch_size": 4},
        privacy={"target_epsilon": 5.0, "max_grad_norm": 1.0, "delta": 1e-3, "accountant": "rdp"}))
    run_dir = run_federation(recipe, console=quiet_console())
    assert len(seen) == 6 and set(seen) == {Linear4bit}  # every client trained on the quantized base
    clients = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "client"]
    assert len(clients) == 6 and all(r["finite"] for r in clients)
    assert all(5.0 - 0.1 <= r["epsilon"] <= 5.0 for r in clients if r["round"] == 2)
    # Published on the unquantized base as an ordinary PEFT adapter holding the run's update (both rounds' sum).
    updates = [delta_weights(RunPaths(run_dir).global_dir(t)) for t in (1, 2)]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "base_model"), run_dir / "global_adapter")
    for name, layer in lora_layers(model).items():
        assert relative_error(layer.get_delta_weight("default").detach().double(), updates[0][name] + updates[1][name]) < 1e-5


def test_dp_sgd_clients_under_secure_aggregation_train_and_spend_as_in_a_plain_run(tmp_path):
    """DP-SGD composes with secure aggregation unchanged: with the same secret, every client of a secure run
    records the same ε as in the plain run and trains the same adapter (to the bit in round 1; after it, on
    a base that differs by the secure sums' round-off), and the globals agree within that round-off."""
    from florist_hf.runner import run_federation

    runs = {}
    for name, federation in (("plain", {}), ("secure", {"secure_aggregation": {"enabled": True}})):
        (tmp_path / name / "run").mkdir(parents=True)
        (tmp_path / name / "run" / "privacy-seed").write_text("9c" * 32)
        runs[name] = run_federation(dp_recipe(tmp_path / name, rounds=2, federation=federation), console=quiet_console())
    lines = {name: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for name, run in runs.items()}
    clients = {name: [(r["round"], r["client"], r["epsilon"]) for r in records if r["kind"] == "client"]
               for name, records in lines.items()}
    assert clients["secure"] == clients["plain"] and len(clients["plain"]) == 4
    plain, secure = RunPaths(runs["plain"]), RunPaths(runs["secure"])
    for t, k, _ in clients["plain"]:
        ours, theirs = read_adapter(secure.client_dir(t, k)).modules, read_adapter(plain.client_dir(t, k)).modules
        for n, module in theirs.items():
            for got, want in ((ours[n].lora_b, module.lora_b), (ours[n].lora_a, module.lora_a)):
                if t == 1:  # the same base, the same records, the same noise: the same bits
                    assert torch.equal(got, want)
                else:  # on a base merged with round 1's globals, which differ by the secure sums' round-off
                    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())
    for t in (1, 2):
        ours, theirs = delta_weights(secure.global_dir(t)), delta_weights(plain.global_dir(t))
        assert all(relative_error(ours[m], theirs[m]) < 1e-5 for m in theirs)
        assert "secure_aggregation" in json.loads((secure.global_dir(t) / "aggregation.json").read_text())


def test_a_dp_sgd_client_still_learns_and_reruns_to_the_same_adapter(tmp_path):
    from florist_hf.clients.callback import ClientRound
    from florist_hf.clients.run import run_client_round

    recipe = load_recipe(write_recipe(tmp_path, ranks=(4,), rounds=1, training={"max_steps": -1, "num_train_epochs": 12,
                                                                               "per_device_train_batch_size": 4, "learning_rate": 3e-2},
                                      privacy={"noise_multiplier": 0.3, "max_grad_norm": 1.0}))
    tokenizer, dataset, _ = tiny_dp_setup(tmp_path, records=8)
    from florist_hf.tiny import build_tiny_llama
    from helpers import TINY_MODEL

    base = str(build_tiny_llama(tmp_path / "base", **TINY_MODEL))

    def train(name, secret):
        plan = ClientRound(client_id=0, round=1, rank=4, num_samples=len(dataset), export_dir=tmp_path / name / "export")
        history = []
        from transformers import TrainerCallback

        class Losses(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    history.append(logs["loss"])

        run_client_round(recipe, plan, base, tokenizer, dataset, tmp_path / name / "work", quiet_console(),
                         callbacks=[Losses()], secret_dir=tmp_path / secret)
        return read_adapter(plan.export_dir), history

    for secret, text in (("secret", "cd" * 32), ("other-secret", "ef" * 32)):  # fixed: the same draws on every test run
        (tmp_path / secret).mkdir()
        (tmp_path / secret / "privacy-seed").write_text(text)
    first, losses = train("a", "secret")
    assert len(losses) == 24 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05
    again, _ = train("b", "secret")
    other, _ = train("c", "other-secret")
    name = next(iter(first.modules))
    assert torch.equal(first.modules[name].lora_b, again.modules[name].lora_b)  # the same secret: the same round
    assert not torch.equal(first.modules[name].lora_b, other.modules[name].lora_b)


def test_a_node_policy_can_require_dp_sgd_within_a_budget(tmp_path):
    from florist_hf.flower.policy import check_privacy, check_request, load_policy
    from florist_hf.clients.dp_sgd import client_privacy

    (tmp_path / "policy.yaml").write_text("privacy: {require: dp_sgd, max_epsilon: 3}\n")
    policy, source = load_policy({"policy": str(tmp_path / "policy.yaml")})
    plain = load_recipe(write_recipe(tmp_path, ranks=(4, 4)))
    with pytest.raises(FloristError, match="requires DP-SGD"):
        check_request(policy, source, plain, 0)
    generous = load_recipe(write_recipe(tmp_path, ranks=(4, 4), privacy={"target_epsilon": 8}))
    with pytest.raises(FloristError, match="refuses privacy.target_epsilon 8"):
        check_request(policy, source, generous, 0)
    weak = load_recipe(write_recipe(tmp_path, ranks=(4, 4), privacy={"noise_multiplier": 0.2}))
    check_request(policy, source, weak, 0)  # a noise, not a budget: the node accounts it on its records
    with pytest.raises(FloristError, match=r"would spend ε = .* above its policy's max_epsilon 3"):
        check_privacy(policy, source, client_privacy(weak, 0, 1, 16))
    strong = load_recipe(write_recipe(tmp_path, ranks=(4, 4), privacy={"target_epsilon": 2}))
    check_request(policy, source, strong, 0)
    check_privacy(policy, source, client_privacy(strong, 0, 1, 16))


def test_a_sweep_with_dp_sgd_clients_shares_them_and_refuses_a_branch_its_settings_do_not_fit(tmp_path):
    from florist_hf.sweep import run_sweep, sweep_branches

    recipe = load_recipe(write_recipe(
        tmp_path, ranks=(4, 2, 2), rounds=1, federation={"clip_update_norm": 0.05},
        data={"holdout_per_label": 1, "cutoff_len": 256},
        training={"max_steps": -1, "num_train_epochs": 1, "per_device_train_batch_size": 4},
        privacy={"target_epsilon": 5.0, "delta": 1e-3}))
    with pytest.raises(FloristError, match="sweep branch flexlora: clip_update_norm bounds a client's update"):
        sweep_branches(recipe, [0.8], ["flexlora"])
    sweep_dir = run_sweep(recipe, [0.8, 0.95], baselines=["flora"], console=quiet_console())
    lines = {}
    for branch in ("tau_0.8", "tau_0.95", "flora"):
        records = [json.loads(line) for line in (sweep_dir / branch / "metrics.jsonl").read_text().splitlines()]
        lines[branch] = sorted((r["client"], r["epsilon"]) for r in records if r["kind"] == "client")
        sidecar = json.loads((RunPaths(sweep_dir / branch).global_dir(1) / "aggregation.json").read_text())
        assert sidecar["bounding"]["clip_update_norm"] == 0.05
    # FLoRA's and FLoRIST's clients train alike: one set of DP-SGD clients for every branch, one ε each.
    assert lines["tau_0.8"] == lines["tau_0.95"] == lines["flora"] and len(lines["flora"]) == 3


def test_the_aggregate_command_bounds_one_server_step(tmp_path):
    from typer.testing import CliRunner

    from florist_hf.cli import app
    from florist_hf.clients.callback import ClientRound

    dirs = []
    for k in range(3):
        plan = ClientRound(client_id=k, round=1, rank=4, num_samples=16, export_dir=tmp_path / f"client_{k}")
        poisoning_client(2)(plan, "builtin:tiny-llama")
        dirs.append(str(plan.export_dir))
    result = CliRunner().invoke(app, ["aggregate", *dirs, "--out", str(tmp_path / "global"), "--clip-update-norm", "0.05"])
    assert result.exit_code == 0, result.output
    assert "clipped to 0.05" in result.output and "client_2" in result.output
    written = delta_weights(tmp_path / "global")
    assert math.sqrt(sum(float(w.square().sum()) for w in written.values())) <= 0.05 * (1 + 1e-6)
    refused = CliRunner().invoke(app, ["aggregate", *dirs, "--method", "fedit", "--out", str(tmp_path / "g2"),
                                       "--clip-update-norm", "0.05"])
    assert refused.exit_code == 2 and "--reference DIR" in refused.output


def test_streaming_florist_bounds_each_client_as_it_is_folded_in(tmp_path):
    run_dir = drive(engine_recipe(tmp_path, "florist", rounds=1, clip_update_norm=0.05, aggregation="streaming"), [16, 16, 16],
                    client=poisoning_client(0))
    paths = RunPaths(run_dir)
    clients = [read_adapter(paths.client_dir(1, k)) for k in range(3)]
    clipped = [bound_client(c.modules, 0.05)[0] for c in clients]
    expected = get_method("florist", threshold=0.9).aggregate(clipped, [16, 16, 16])
    written = delta_weights(paths.global_dir(1))
    for name, module in expected.modules.items():
        assert relative_error(written[name], module.delta_weight) < 1e-5  # streaming at tolerance 0 equals stacked
    sidecar = json.loads((paths.global_dir(1) / "aggregation.json").read_text())
    assert sidecar["outliers"] == ["client_0"] and sidecar["clients"][0]["clipped"]
    assert "cosine" not in sidecar["clients"][0]  # the folded clients' factors are not kept to compare


def test_the_accountant_at_the_edge_of_its_orders_prints_nothing():
    """At a large ε (or a tiny one) Opacus' RDP accountant warns that its best order is the largest
    (smallest) it tries: the bound holds, so neither the ε of a run nor the noise calibrated to a target
    says anything (each value here its own, past the functions' caches)."""
    import warnings

    from florist_hf.privacy import calibrated_noise, epsilon

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert 0 < calibrated_noise(12_345.0, 1e-3, 1.0, 1, "rdp") < 0.1
        assert epsilon(0.001234, 1.0, 1, 1e-3, "rdp") > 1e4
        assert epsilon(123.4, 0.01, 1, 1e-3, "rdp") < 0.1
