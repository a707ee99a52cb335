"""Client-level central DP for FLoRIST on its two sketch sums, under secure aggregation: the sensitivity
the noise is calibrated to, measured on what the clients' own code sends (and tight); the noise the
server adds to each sum, its std and where it comes from; the accounting; whole runs, resumed."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import write_recipe
from test_engine_cases import drive, fake_client
from test_secure_round import MODULES, write_clients

from florist_hf.adapters import SIDECAR, LoraAdapter, read_adapter, without_factors
from florist_hf.aggregation import ClientModule, get_method, sketch
from florist_hf.aggregation.bounding import update_norm
from florist_hf.errors import FloristError
from florist_hf.recipe import load_recipe
from florist_hf.rundir import RunPaths
from florist_hf.secure import SecAggSettings
from florist_hf.secure.encoding import sensitivity_slack
from florist_hf.secure.methods import SKETCH
from florist_hf.secure.server_step import SecureRound, SumTask, local_sums, plan_modules, secure_aggregate_adapters, secure_result
from florist_hf.server import UpdateBounding

RANKS = [64, 32, 16, 8, 4]
SEED = 5


def client_modules(ranks=RANKS, seed=3):
    """Trained-looking fresh LoRA updates at SmolLM2's attention shapes (GQA v_proj), one dict per client."""
    generator = torch.Generator().manual_seed(seed)
    return [{name: ClientModule(torch.randn(rank, n, generator=generator) / n**0.5,
                                0.02 * torch.randn(m, rank, generator=generator) * torch.logspace(0, -2, rank), 2.0)
             for name, (m, n) in MODULES.items()} for rank in ranks]


def sketch_sums(clients, plans, clip, denominator, *, unit=True, bases=None):
    """Each sum as the clients' own code computes its arrays (bounded, weighted 1/denominator), added in the clear."""
    count = len(clients)
    task = SumTask("first" if bases is None else "second", tuple(plans), SEED, (1 / count,) * count, (SKETCH,), False,
                   bases=bases, clip=clip, rescale=count / denominator, unit_sketch=unit)
    arrays = [task.compute(k, modules) for k, modules in enumerate(clients)]
    return {name: sum(torch.from_numpy(a[name]) for a in arrays) for name in arrays[0]}


def distance(first, second):
    return math.sqrt(sum(float((first[name] - second[name]).square().sum()) for name in first))


def plans_for(ranks, participants):
    return plan_modules(MODULES, [{name: rank for name in MODULES} for rank in ranks],
                        sketch.participation_free_columns(RANKS, participants))


def in_span_client(rank, bases=None):
    """An update built to be as long in a sketch as it is: A's rows in Ω's span (first sum), or B's
    columns in Q's span (second sum), the worst case for the sensitivity."""
    generator = torch.Generator().manual_seed(11)
    modules = {}
    for name, (m, n) in MODULES.items():
        columns = plans_for(RANKS, len(RANKS))[list(MODULES).index(name)].columns
        if bases is None:
            omega = sketch.sketch_matrix(n, columns, SEED, name, orthonormal=True)
            lora_a = (omega @ torch.randn(columns, rank, generator=generator, dtype=torch.float64)).T.float()
            lora_b = torch.randn(m, rank, generator=generator)
        else:
            lora_b = bases[name].apply(torch.randn(columns, rank, generator=generator, dtype=torch.float64)).float()
            lora_a = torch.randn(rank, n, generator=generator)
        modules[name] = ClientModule(lora_a, lora_b, 2.0)
    return modules


def test_one_client_moves_each_sketch_sum_by_at_most_clip_over_the_denominator_and_a_worst_case_client_by_that():
    """Adding a client to a round (the denominator fixed) moves both sums, over every module together, by at
    most clip/denominator: the client bounds its update s·B·A to clip, Ω and Q have orthonormal columns. A
    client whose update lies in Ω's (Q's) span moves the sum by exactly that; with the plain Gaussian Ω it
    would move the first sum by far more, which is why central DP sketches with an orthonormal Ω."""
    clients, denominator = client_modules(), 5
    clip = 0.5 * min(update_norm(modules) for modules in clients)  # binds every client
    plans = plans_for(RANKS, denominator)
    assert [plan.columns for plan in plans] == [sum(RANKS) + 8] * 2 and not any(plan.checks_error for plan in plans)
    bound = clip / denominator
    without, with_all = sketch_sums(clients[:4], plans, clip, denominator), sketch_sums(clients, plans, clip, denominator)
    assert 0.3 * bound < distance(with_all, without) <= bound * (1 + 1e-9)
    worst = in_span_client(16)
    assert update_norm(worst) > clip
    assert distance(sketch_sums(clients[:4] + [worst], plans, clip, denominator), without) == pytest.approx(bound, rel=1e-9)
    gaussian = (sketch_sums(clients[:4] + [worst], plans, clip, denominator, unit=False),
                sketch_sums(clients[:4], plans, clip, denominator, unit=False))
    assert distance(*gaussian) > 5 * bound

    # The second sum, on a Q fixed by the first (noised, as the server takes it: any Q will do).
    noisy = {plan.name: with_all[f"{plan.name}/range"] + sketch.gaussian_noise(tuple(with_all[f"{plan.name}/range"].shape),
                                                                               1e-3, 9, plan.name, "range")
             for plan in plans}
    bases = {name: sketch.range_basis(values) for name, values in noisy.items()}
    without = sketch_sums(clients[:4], plans, clip, denominator, bases=bases)
    assert 0.3 * bound < distance(sketch_sums(clients, plans, clip, denominator, bases=bases), without) <= bound * (1 + 1e-9)
    worst = in_span_client(16, bases)
    assert distance(sketch_sums(clients[:4] + [worst], plans, clip, denominator, bases=bases), without) == pytest.approx(
        bound, rel=1e-9)


def test_the_sketch_width_under_central_dp_does_not_depend_on_who_takes_part():
    """Whichever 3 of the federation's 5 clients a round samples, the width is the same, and exact for them."""
    width = sketch.participation_free_columns(RANKS, 3)
    assert width == 64 + 32 + 16 + 8
    for chosen in ([64, 32, 16], [8, 4, 16], [4, 8, 32]):
        plans = plan_modules(MODULES, [{name: rank for name in MODULES} for rank in chosen], width)
        assert [plan.columns for plan in plans] == [width, min(width, 192)]
        assert all(plan.columns >= plan.exact_columns for plan in plans)


def secure_dp_round(clients, sigma, clip, denominator, noise_seed=21):
    """The server's side of a secure FLoRIST round with central DP, in memory (its sums, bases and noise)."""
    adapters = [LoraAdapter(Path(f"client_{k}"), {}, modules, None, torch.float32) for k, modules in enumerate(clients)]
    central = UpdateBounding(clip=clip, noise_multiplier=sigma, denominator=denominator, noise_seed=noise_seed)
    secure = SecureRound(SecAggSettings(), seed=SEED, clip=clip, central_dp=central,
                         sketch_columns=sketch.participation_free_columns(RANKS, denominator))
    return secure_result([without_factors(a) for a in adapters], local_sums(adapters), get_method("florist", threshold=0.9),
                         secure, weights=[1.0] * len(adapters))


def test_the_server_noises_both_sums_at_root_two_sigma_from_its_secret_seed_and_takes_q_from_the_noised_first():
    """Y and Z each get N(0, (√2·σ·(clip/denominator + slack))²) per entry, drawn per module and sum from the
    round's secret seed; Q spans the noised Y (not the clean one); FLoRIST keeps only components above the
    noise's spectral edge; another seed, other noise."""
    clients, denominator, sigma = client_modules(), 5, 0.001
    clip = 0.5 * min(update_norm(modules) for modules in clients)
    built = secure_dp_round(clients, sigma, clip, denominator)
    plans = built.plans
    entries = max(sum(m * p.columns for p, (m, n) in zip(plans, MODULES.values())),
                  sum(p.columns * n for p, (m, n) in zip(plans, MODULES.values())))
    assert built.central.noised_sums == 2
    assert built.central.quantisation_slack == sensitivity_slack(5, entries, 32)
    std = built.central.noise_std()
    assert std == pytest.approx(sigma * math.sqrt(2) * (clip / denominator + built.central.quantisation_slack), rel=1e-12)

    clean_first = sketch_sums(clients, plans, clip, denominator)
    bases = {name: update.basis for name, update in built.updates.items()}
    clean_second = sketch_sums(clients, plans, clip, denominator, bases=bases)
    residuals = []
    for plan in plans:
        name, update = plan.name, built.updates[plan.name]
        noise = update.projection - clean_second[f"{name}/projection"]
        expected = sketch.gaussian_noise(tuple(noise.shape), std, 21, name, "projection")
        assert float((noise - expected).abs().max()) <= update.entry_error  # the secure sum's round-off, no more
        residuals.append(noise.flatten())
        clean_y = clean_first[f"{name}/range"]
        noisy_y = clean_y + sketch.gaussian_noise(tuple(clean_y.shape), std, 21, name, "range")
        # Q spans the noised Y (to the secure sum's round-off, entry_error·√(m·p) at most)
        assert update.basis.residual_norm(noisy_y) <= update.entry_error * noisy_y.numel() ** 0.5
        assert update.basis.residual_norm(clean_y) > 1e-3 * float(clean_y.norm())  # and so not the clean one
        kept = built.result.modules[name].selected_rank
        floor = update.noise_floor()
        edge = math.sqrt(plan.columns) + math.sqrt(MODULES[name][1]) + sketch.NOISE_EDGE_MARGIN
        assert update.noise_std == std and floor == pytest.approx(std * edge)
        assert kept > 1 and bool((built.result.modules[name].singular_values[:kept] > floor).all())
        assert float(built.result.modules[name].singular_values[kept]) <= floor or kept == built.result.modules[name].selected_rank
    pooled = torch.cat(residuals)
    assert float(pooled.std()) == pytest.approx(std, rel=0.02) and abs(float(pooled.mean())) < 5 * std / pooled.numel() ** 0.5

    other = secure_dp_round(clients, sigma, clip, denominator, noise_seed=22)
    name = plans[0].name
    assert not torch.allclose(other.updates[name].projection, built.updates[name].projection)


def test_central_dp_on_the_sketch_sums_refuses_a_width_read_off_the_rounds_clients(tmp_path):
    dirs, _ = write_clients(tmp_path, torch.float32, ranks=[8, 4, 4])
    central = UpdateBounding(clip=0.1, noise_multiplier=1.0, denominator=3, noise_seed=1)
    for columns, message in ((None, "needs a sketch width fixed before the round"), (6, "its error-check sum is not noised")):
        secure = SecureRound(SecAggSettings(), seed=1, clip=0.1, central_dp=central, sketch_columns=columns)
        with pytest.raises(FloristError, match=message) as error:
            secure_aggregate_adapters(dirs, get_method("florist"), tmp_path / f"out_{columns}", secure)
        assert "\n" not in str(error.value) and not (tmp_path / f"out_{columns}").exists()


def test_a_florist_run_with_central_dp_accounts_its_rounds_keeps_one_width_and_resumes_to_the_same_bytes(tmp_path):
    """florist-hf run, FLoRIST under secure aggregation and central DP, 3 of 4 clients a round: the accountant
    counts one Gaussian at σ per round (the two sums at √2·σ), every round sketches at the same width,
    run.json names the mechanism, and a rerun in the same directory resumes to the same bytes."""
    pytest.importorskip("opacus")
    from opacus.accountants import RDPAccountant

    clip, sigma, ranks = 0.05, 0.8, (4, 2, 2, 1)
    federation = {"eval_heldout_loss": False, "clip_update_norm": clip, "clients_per_round": 3,
                  "central_dp": {"noise_multiplier": sigma, "delta": 1e-3}, "secure_aggregation": {"enabled": True}}
    recipe_file = write_recipe(tmp_path, method="florist", ranks=ranks, rounds=3, federation=federation)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "privacy-seed").write_text("ef" * 32)
    run_dir = drive(load_recipe(recipe_file), [16, 17, 18, 19], client=fake_client)
    paths = RunPaths(run_dir)
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if r["kind"] == "round"]
    sampled = set()
    for line in rounds:
        t = line["round"]
        sampled.add(tuple(line["clients"]))
        sidecar = json.loads((paths.global_dir(t) / SIDECAR).read_text())
        central = sidecar["bounding"]["central_dp"]
        accountant = RDPAccountant()
        accountant.history = [(sigma, 3 / 4, t)]
        assert central["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-3), rel=1e-9)
        assert central["noised_sums"] == 2 and central["denominator"] == 3
        assert central["noise_std"] == pytest.approx(sigma * math.sqrt(2) * (clip / 3 + central["quantisation_slack"]))
        assert sidecar["secure_aggregation"]["settings"]["sketch_columns"] == 4 + 2 + 2 + 8
        assert [c["weight"] for c in sidecar["clients"]] == pytest.approx([1 / 3] * 3)
    assert len(sampled) > 1  # the width stayed while the round's clients changed
    summary = json.loads((run_dir / "run.json").read_text())["privacy"]["client_level"]
    assert "two sketch sums" in summary["mechanism"] and summary["epsilon"] == rounds[-1]["central_epsilon"]

    before = {t: (paths.global_dir(t) / "adapter_model.safetensors").read_bytes() for t in (1, 2, 3)}
    drive(load_recipe(recipe_file), [16, 17, 18, 19], client=fake_client)
    assert not (run_dir / "superseded").exists()
    assert {t: (paths.global_dir(t) / "adapter_model.safetensors").read_bytes() for t in (1, 2, 3)} == before
    assert read_adapter(paths.global_dir(3)).modules


def test_without_noise_the_orthonormal_sketch_at_the_fixed_width_is_plain_florist_on_the_bounded_updates():
    """σ = 0: what the DP path computes is FLoRIST of the bounded, uniformly weighted updates (the same ranks, the
    same update within the secure sums' round-off): the orthonormal Ω and the fixed width change no result."""
    from florist_hf.aggregation.bounding import bound_client

    clients, denominator = client_modules(), 5
    clip = 0.5 * min(update_norm(modules) for modules in clients)
    built = secure_dp_round(clients, 0.0, clip, denominator)
    assert built.central.noise_std() == 0.0
    bounded = [bound_client(modules, clip)[0] for modules in clients]
    plain = get_method("florist", threshold=0.9).aggregate(bounded, [1.0] * len(clients))
    assert built.result.selected_ranks == plain.selected_ranks
    assert 1 < min(plain.selected_ranks.values())
    for name, expected in plain.modules.items():
        got = built.result.modules[name].delta_weight
        assert float((got - expected.delta_weight).norm() / expected.delta_weight.norm()) < 1e-6


def test_a_round_whose_every_component_is_below_the_noise_publishes_a_zero_update():
    """With the noise far above the clients' updates (σ huge against a few clients), no singular value of
    the noised Z clears the noise's spectral edge: FLoRIST publishes a rank-1 adapter of zeros rather than
    a component of noise."""
    clients, denominator = client_modules(), 5
    clip = 0.5 * min(update_norm(modules) for modules in clients)
    built = secure_dp_round(clients, 1e4, clip, denominator)
    for name, module in built.result.modules.items():
        assert module.selected_rank == 1 and float(module.lora_b.abs().max()) == 0.0
        assert float(module.singular_values[0]) <= built.updates[name].noise_floor()
