"""Secure aggregation in the server step and in `florist-hf run`: every method that takes it publishes
the plain method's global adapter within the fixed-point round-off, FLoRIST selects the same ranks,
and the recipe refuses, in one line, what cannot combine with it."""

import json

import pytest
import torch
from helpers import delta_weights, quiet_console, relative_error, write_recipe
from test_engine_cases import SHAPES, drive, fake_client
from typer.testing import CliRunner

from florist_hf.adapters import SIDECAR, read_adapter, save_adapter_files
from florist_hf.aggregation import get_method
from florist_hf.cli import app
from florist_hf.errors import FloristError
from florist_hf.recipe import load_recipe
from florist_hf.rundir import RunPaths
from florist_hf.secure import SecAggSettings
from florist_hf.secure.server_step import SecureRound, secure_aggregate_adapters
from florist_hf.secure.settings import default_threshold
from florist_hf.server import aggregate_adapters

runner = CliRunner()
#: SmolLM2-135M's attention shapes (GQA: v_proj is 192×576) and the paper's heterogeneous ranks.
MODULES = {"base_model.model.model.layers.0.self_attn.q_proj": (576, 576),
           "base_model.model.model.layers.0.self_attn.v_proj": (192, 576)}
RANKS = [64, 32, 16, 16, 8, 8, 4, 4]
TEMPLATE = {"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "base",
            "task_type": "CAUSAL_LM"}


def write_clients(tmp_path, dtype, *, shared_a=False, ranks=RANKS):
    """Trained-looking client adapters (B ~ 1e-2, A ~ 1/√n, a decaying spectrum so τ has a choice),
    and for shared-A methods the global they continued, whose A they froze."""
    generator = torch.Generator().manual_seed(7)
    frozen = {name: torch.randn(max(ranks), n, generator=generator) / n**0.5 for name, (m, n) in MODULES.items()}
    reference = tmp_path / "global_0"
    save_adapter_files(reference, {name: (torch.zeros(m, max(ranks)), frozen[name]) for name, (m, n) in MODULES.items()},
                       config_template=TEMPLATE, dtype=dtype)
    dirs = []
    for k, rank in enumerate(ranks):
        factors = {}
        for name, (m, n) in MODULES.items():
            lora_a = frozen[name][:rank] if shared_a else torch.randn(rank, n, generator=generator) / n**0.5
            lora_b = 0.02 * torch.randn(m, rank, generator=generator) * torch.logspace(0, -2, rank)
            factors[name] = (lora_b, lora_a)
        dirs.append(save_adapter_files(tmp_path / f"client_{k}", factors, config_template=TEMPLATE, dtype=dtype,
                                       client_info={"client": k, "num_samples": 100 + 37 * k}))
    return dirs, reference


def method_named(name):
    return get_method(name, threshold=0.9) if name == "florist" else get_method(name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", ["florist", "flexlora", "fedex", "fedit", "ffa", "fedsvd"])
def test_the_secure_server_step_equals_the_plain_one(tmp_path, name, dtype):
    method = method_named(name)
    dirs, reference = write_clients(tmp_path, dtype, shared_a=method.freezes_lora_a)
    plain = aggregate_adapters(dirs, method, tmp_path / "plain")
    secure = secure_aggregate_adapters(dirs, method, tmp_path / "secure", SecureRound(SecAggSettings(), seed=11,
                                                                                      reference=reference))
    assert secure.result.selected_ranks == plain.result.selected_ranks
    # In fp64, before the write: 32 fractional bits put each summed value within 8·2^-33 ≈ 1e-9 of the plain sum
    # (entries ~1e-4); a truncation (τ, FlexLoRA's rank) turns that into a little more where singular values crowd.
    clients = [read_adapter(directory) for directory in dirs]  # read anew: the server step releases the factors it read
    exact = method.aggregate([adapter.modules for adapter in clients], [adapter.num_samples for adapter in clients])
    for module, expected in exact.modules.items():
        assert relative_error(secure.result.modules[module].delta_weight, expected.delta_weight) < 1e-6
    # As written, in the clients' dtype: two roundings of (nearly) the same factors.
    plain_delta, secure_delta = delta_weights(tmp_path / "plain"), delta_weights(tmp_path / "secure")
    for module in MODULES:
        assert relative_error(secure_delta[module], plain_delta[module]) < (1e-3 if dtype == torch.bfloat16 else 1e-6)
    if name == "florist":
        assert 1 < min(secure.result.selected_ranks.values()) < max(secure.result.selected_ranks.values()) < sum(RANKS)
        for module in MODULES:
            assert torch.allclose(secure.result.modules[module].singular_values[:20],
                                  plain.result.modules[module].singular_values[:20].to(torch.float64), rtol=1e-5)
    if name == "flexlora":  # each client's own truncation, written beside the global
        assert len(list((tmp_path / "secure" / "clients").iterdir())) == len(RANKS)
        for module, expected in exact.modules.items():
            for (b, a), (ref_b, ref_a) in zip(secure.result.modules[module].client_factors, expected.client_factors,
                                              strict=True):
                assert b.shape == ref_b.shape and relative_error(b @ a, ref_b @ ref_a) < 1e-6
    if name == "fedex":
        assert relative_error(delta_weights(tmp_path / "secure" / "residual")[next(iter(MODULES))],
                              delta_weights(tmp_path / "plain" / "residual")[next(iter(MODULES))]) < 1e-3

    sidecar = json.loads((tmp_path / "secure" / SIDECAR).read_text())
    record = sidecar["secure_aggregation"]
    assert record["threshold"] == 6 and record["settings"] == {"threshold": None, "fraction_bits": 32, "sketch_columns": None}
    assert "outliers" not in sidecar and "unavailable" in record["outlier_report"]
    comm, sketches = sidecar["communication"], name in ("florist", "flexlora", "fedex")
    assert record["sums"] == (2 if sketches else 1)
    for k, rank in enumerate(RANKS):
        # What each client sent, counted exactly: (m+n)·p per module for a sketch (p = Σ r_k + 8 ≤ m, n here),
        # the factors padded to the round's largest rank for a sum (B only where A is frozen), and fedex both.
        expected = sum((m + n) * (sum(RANKS) + 8) if sketches else 0 for m, n in MODULES.values())
        if name in ("fedit", "fedex"):
            expected += sum((m + n) * max(RANKS) for m, n in MODULES.values())
        if name in ("ffa", "fedsvd"):
            expected += sum(m * max(RANKS) for m, n in MODULES.values())
        assert comm["secure"]["uplink_params"][k] == expected
        assert comm["uplink_bytes"][k] > 8 * expected  # the masked words plus the protocol's keys and shares
        assert comm["uplink_bytes"][k] < 8 * expected + 20_000 * len(RANKS)
        assert comm["plain"]["uplink_bytes"][k] == plain.sidecar["communication"]["uplink_bytes"][k]
    # Q as its p Householder reflectors (m×p) and their p scalars τ, in fp64.
    basis = sum((m + 1) * (sum(RANKS) + 8) for m, n in MODULES.values()) * 8 if sketches else 0
    assert comm["secure"]["basis_downlink_bytes"] == basis
    assert comm["downlink_bytes"][0] == (comm["plain"]["downlink_bytes"][0] + basis
                                         + comm["secure"]["protocol_downlink_bytes"][0])


def test_a_narrow_sketch_records_its_estimated_error_per_module(tmp_path):
    dirs, _ = write_clients(tmp_path, torch.float32)
    method = get_method("florist", threshold=0.9)
    plain = aggregate_adapters(dirs, method, tmp_path / "plain")
    step = secure_aggregate_adapters(dirs, method, tmp_path / "secure",
                                     SecureRound(SecAggSettings(), seed=3, sketch_columns=48))
    sidecar = json.loads((tmp_path / "secure" / SIDECAR).read_text())
    plain_delta, secure_delta = delta_weights(tmp_path / "plain"), delta_weights(tmp_path / "secure")
    for module in MODULES:
        record = sidecar["modules"][module]["sketch"]
        assert record["columns"] == 48 and record["estimated_relative_error"] > 1e-4
        assert step.result.modules[module].selected_rank <= 48
        # The round's update is replaced by its projection on 48 directions: off by about the estimate.
        assert relative_error(secure_delta[module], plain_delta[module]) < 1.0
    assert sidecar["communication"]["secure"]["uplink_params"][0] == sum((m + n) * 48 + m * 8 for m, n in MODULES.values())


def test_too_few_clients_for_the_threshold_write_nothing(tmp_path):
    dirs, _ = write_clients(tmp_path, torch.float32, ranks=[4, 4, 2])
    with pytest.raises(FloristError, match=r"threshold 4 is outside \(1, 3\]"):
        secure_aggregate_adapters(dirs, get_method("florist"), tmp_path / "secure", SecureRound(SecAggSettings(threshold=4), 1))
    assert not (tmp_path / "secure").exists()


SECURE_CASES = [("florist", (4, 2, 2, 2), 3), ("fedit", (4, 2, 2), 3), ("ffa", (4, 4, 4), 3), ("fedsvd", (4, 4, 2), 2),
                ("flexlora", (4, 2, 2), 2), ("fedex", (4, 4, 4), 2)]


@pytest.mark.parametrize("method, ranks, rounds", SECURE_CASES, ids=[case[0] for case in SECURE_CASES])
def test_a_secure_run_publishes_the_plain_runs_adapter(tmp_path, method, ranks, rounds):
    """The engine's round loop (clients writing their adapters as training would) with and without
    secure aggregation: every round's global and the published adapter agree, and the rounds'
    lines carry both traffics."""
    runs = {}
    for secure in (False, True):
        federation = {"eval_heldout_loss": False, **({"secure_aggregation": {"enabled": True}} if secure else {})}
        recipe = load_recipe(write_recipe(tmp_path / str(secure), method=method, ranks=ranks, rounds=rounds,
                                          federation=federation))
        runs[secure] = drive(recipe, [16 + k for k in range(len(ranks))], client=fake_client)
    plain, secure = RunPaths(runs[False]), RunPaths(runs[True])
    for t in range(1, rounds + 1):
        plain_side = json.loads((plain.global_dir(t) / SIDECAR).read_text())
        secure_side = json.loads((secure.global_dir(t) / SIDECAR).read_text())
        assert [m["selected_rank"] for m in secure_side["modules"].values()] == \
               [m["selected_rank"] for m in plain_side["modules"].values()]
        ours, theirs = delta_weights(secure.global_dir(t)), delta_weights(plain.global_dir(t))
        assert all(relative_error(ours[m], theirs[m]) < 1e-5 for m in theirs)
        assert "secure_aggregation" in secure_side and "secure_aggregation" not in plain_side
    ours, theirs = delta_weights(runs[True] / "global_adapter"), delta_weights(runs[False] / "global_adapter")
    assert all(relative_error(ours[m], theirs[m]) < 1e-5 for m in theirs)
    lines = [json.loads(line) for line in (runs[True] / "metrics.jsonl").read_text().splitlines()]
    round_line = next(line for line in lines if line["kind"] == "round")
    assert round_line["secure_aggregation"] is True
    assert round_line["uplink_bytes_total"] > round_line["plain_uplink_bytes_total"]
    assert 0 < round_line["secure_protocol_bytes_total"] < round_line["uplink_bytes_total"] + round_line["downlink_bytes_total"]
    from florist_hf.rounds import describe_round

    assert "B of it keys and shares; plain: up" in describe_round({**round_line, "eff_x1e4": 1.0})
    # What the run guarantees says so (run.json and the model card); a plain run's says nothing of it.
    recorded = json.loads((runs[True] / "run.json").read_text())["privacy"]["secure_aggregation"]
    assert recorded["sums"] == (2 if method in ("florist", "flexlora", "fedex") else 1)
    assert recorded["threshold"] == default_threshold(len(ranks)) == secure_side["secure_aggregation"]["threshold"]
    assert (json.loads((runs[False] / "run.json").read_text())["privacy"] or {}).get("secure_aggregation") is None
    if method in ("florist", "fedit"):
        from florist_hf.hub import build_upload_folder

        cards = {secure: (build_upload_folder(runs[secure], tmp_path / f"upload_{secure}", repo_id="org/secure")
                          / "README.md").read_text() for secure in (False, True)}
        learned = "the two sketch sums" if method == "florist" else "the sums of the clients' weighted factors"
        assert "| Secure aggregation | SecAgg+" in cards[True] and learned in cards[True]
        assert "Secure aggregation" not in cards[False]


@pytest.mark.parametrize("method, ranks", [("florist", (4, 2, 2)), ("fedit", (4, 2, 2)), ("ffa", (4, 4, 4))])
def test_clients_bound_their_own_updates_before_masking_as_the_server_would(tmp_path, method, ranks):
    """clip_update_norm under secure aggregation: each client scales its own update (s·B·A for FLoRIST's
    fresh LoRA, the change since the continued global for FedIT and FFA-LoRA) before it masks it; the
    global equals the plain run's, where the server bounded every update it saw, and the sidecar
    records the bound but no client's norm. The clip binds: half the median norm of round 1."""
    sizes = [16 + k for k in range(len(ranks))]

    def run(name, clip, secure):
        federation = {"eval_heldout_loss": False, "clip_update_norm": clip,
                      **({"secure_aggregation": {"enabled": True}} if secure else {})}
        return drive(load_recipe(write_recipe(tmp_path / name, method=method, ranks=ranks, rounds=2,
                                              federation=federation)), sizes, client=fake_client)

    unbound = json.loads((RunPaths(run("unbound", 1e6, False)).global_dir(1) / SIDECAR).read_text())
    clip = sorted(client["update_norm"] for client in unbound["clients"])[1] / 2
    runs = {secure: run(str(secure), clip, secure) for secure in (False, True)}
    plain, secure = RunPaths(runs[False]), RunPaths(runs[True])
    for t in (1, 2):
        plain_side = json.loads((plain.global_dir(t) / SIDECAR).read_text())
        secure_side = json.loads((secure.global_dir(t) / SIDECAR).read_text())
        assert all(client["clipped"] for client in plain_side["clients"])  # the bound binds every client
        assert secure_side["bounding"]["clip_update_norm"] == clip and "before masking" in secure_side["bounding"]["where"]
        assert not any("update_norm" in client for client in secure_side["clients"])
        ours, theirs = delta_weights(secure.global_dir(t)), delta_weights(plain.global_dir(t))
        assert all(relative_error(ours[m], theirs[m]) < 1e-5 for m in theirs)


@pytest.mark.parametrize("method, ranks", [("fedit", (4, 4, 4, 4)), ("ffa", (4, 4, 4, 4))])
def test_central_dp_noises_the_securely_summed_mean_as_the_plain_server_noises_its_own(tmp_path, method, ranks):
    """federation.central_dp under secure aggregation: the clients bound their own updates with the plain
    step's fixed denominator and uniform weights, the server adds the noise to the decoded mean from the
    same secret seed: the same global as the plain run's within the encoding, the same accounting, and a
    noise std that also covers how far the fixed-point rounding lets one client move the mean."""
    pytest.importorskip("opacus")
    from florist_hf.secure.encoding import sensitivity_slack

    clip, sigma, sizes = 0.05, 0.8, [16 + k for k in range(len(ranks))]

    def run(name, secure):
        federation = {"eval_heldout_loss": False, "clip_update_norm": clip, "clients_per_round": 3,
                      "central_dp": {"noise_multiplier": sigma, "delta": 1e-3},
                      **({"secure_aggregation": {"enabled": True}} if secure else {})}
        out = tmp_path / name / "run"
        out.mkdir(parents=True)
        (out / "privacy-seed").write_text("cd" * 32)  # one secret for both runs: the same noise draws
        return RunPaths(drive(load_recipe(write_recipe(tmp_path / name, method=method, ranks=ranks, rounds=2,
                                                       federation=federation)), sizes, client=fake_client))

    plain, secure = run("plain", False), run("secure", True)
    for t in (1, 2):
        plain_side = json.loads((plain.global_dir(t) / SIDECAR).read_text())
        secure_side = json.loads((secure.global_dir(t) / SIDECAR).read_text())
        ours, theirs = secure_side["bounding"]["central_dp"], plain_side["bounding"]["central_dp"]
        assert [c["weight"] for c in secure_side["clients"]] == pytest.approx([1 / 3] * 3)
        assert ours["epsilon"] == theirs["epsilon"] and ours["denominator"] == theirs["denominator"] == 3
        assert "before masking" in secure_side["bounding"]["where"]
        entries = sum(m * max(ranks) + (0 if method == "ffa" else max(ranks) * n) for m, n in SHAPES.values())
        assert ours["quantisation_slack"] == sensitivity_slack(3, entries, 32) > 0
        assert ours["noise_std"] == pytest.approx(sigma * (clip / 3 + ours["quantisation_slack"]), rel=1e-12)
        assert theirs["noise_std"] == pytest.approx(sigma * clip / 3, rel=1e-12)
        assert theirs["noise_std"] < ours["noise_std"] < theirs["noise_std"] * (1 + 1e-6)
        got, expected = read_adapter(secure.global_dir(t)).modules, read_adapter(plain.global_dir(t)).modules
        for name, module in expected.items():
            # The same noise (the same draws, a std 1e-6 apart) on the same mean (within the encoding).
            assert float((got[name].lora_b.double() - module.lora_b.double()).abs().max()) < 1e-6
            assert float((got[name].lora_a.double() - module.lora_a.double()).abs().max()) < 1e-6
            noise = (module.lora_b.double() - read_adapter(plain.global_dir(t - 1)).modules[name].lora_b.double())
            assert float(noise.std()) > 10 * 1e-6  # the round's change, noise and all, is far above that tolerance


def test_one_client_moves_the_decoded_mean_by_at_most_the_bound_the_noise_is_calibrated_to(tmp_path):
    """The sensitivity the secure step's noise is calibrated to holds for the sums the server learns: a
    round with one client more (the others the same, the denominator fixed) moves the decoded mean by
    at most clip/denominator plus the rounding's slack, measured with the noise off (σ = 0)."""
    from florist_hf.secure.encoding import sensitivity_slack
    from florist_hf.server import UpdateBounding

    dirs, reference = write_clients(tmp_path, torch.float32, ranks=[8, 8, 8, 8, 8])
    clip, denominator = 1e-3, 5  # binds every client: each moves the mean by clip/5 exactly
    results = {}
    for count in (4, 5):
        central = UpdateBounding(clip=clip, reference=reference, noise_multiplier=0.0, denominator=denominator, noise_seed=1)
        secure = SecureRound(SecAggSettings(), seed=3, reference=reference, clip=clip, central_dp=central)
        step = secure_aggregate_adapters(dirs[:count], get_method("fedit"), tmp_path / f"global_{count}", secure)
        results[count] = read_adapter(step.out_dir).modules
        assert step.sidecar["bounding"]["central_dp"]["noise_std"] == 0.0
    moved = sum(float((results[5][name].lora_b.double() - results[4][name].lora_b.double()).square().sum())
                + float((results[5][name].lora_a.double() - results[4][name].lora_a.double()).square().sum())
                for name in MODULES) ** 0.5
    entries = sum(m * 8 + 8 * n for m, n in MODULES.values())
    assert clip / denominator * (1 - 1e-6) <= moved <= clip / denominator + sensitivity_slack(5, entries, 32)


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
def test_central_dp_on_averaged_factors_refuses_clients_of_uneven_ranks(tmp_path, secure):
    """With ranks 8, 8, 8, 8 and a client of rank 2 the zero-padded mean moves by 0.69 when that client
    joins (measured with the noise off), against the clip/denominator = 2e-4 its noise would be calibrated
    to: the server step refuses it in one line and writes nothing, plain or secure."""
    from florist_hf.server import UpdateBounding

    dirs, reference = write_clients(tmp_path, torch.float32, ranks=[8, 8, 8, 8, 2])
    central = UpdateBounding(clip=1e-3, reference=reference, noise_multiplier=1.0, denominator=5, noise_seed=1)
    with pytest.raises(FloristError, match="needs one LoRA rank for every client") as error:
        if secure:
            secure_aggregate_adapters(dirs, get_method("fedit"), tmp_path / "global", SecureRound(
                SecAggSettings(), seed=3, reference=reference, clip=1e-3, central_dp=central))
        else:
            aggregate_adapters(dirs, get_method("fedit"), tmp_path / "global", bounding=central)
    assert "\n" not in str(error.value) and not (tmp_path / "global").exists()


def test_the_outlier_report_is_unavailable_in_one_line_and_the_sidecar_says_so(tmp_path):
    import io

    from rich.console import Console

    output = io.StringIO()
    recipe = load_recipe(write_recipe(tmp_path, method="florist", ranks=(4, 2, 2), rounds=2,
                                      federation={"eval_heldout_loss": False, "secure_aggregation": {"enabled": True}}))
    run_dir = drive(recipe, [16, 17, 18], client=fake_client, console=Console(file=output, width=400))
    lines = [line for line in output.getvalue().splitlines() if "outlier report" in line]
    assert len(lines) == 1 and "unavailable under secure aggregation" in lines[0], output.getvalue()
    sidecar = json.loads((RunPaths(run_dir).global_dir(2) / SIDECAR).read_text())
    assert "unavailable" in sidecar["secure_aggregation"]["outlier_report"] and "outliers" not in sidecar


@pytest.mark.parametrize("central_dp", [False, True], ids=["plain", "central-dp"])
def test_a_kill_between_the_two_secure_sums_resumes_to_the_same_bytes(tmp_path, monkeypatch, central_dp):
    """Nothing is written until both sums are done; the rerun draws fresh keys and masks, yet the same
    sketch seed and the same encodings give the same sums, so the same global adapter to the byte; under
    central DP the same secret gives the same noise on both sums, so the same bytes too."""
    from florist_hf.secure import server_step

    private = {"clip_update_norm": 0.05, "central_dp": {"noise_multiplier": 1e-3, "delta": 1e-3}} if central_dp else {}

    def run(out, **drive_options):
        recipe_file = write_recipe(tmp_path / out, method="florist", ranks=(4, 2, 2), rounds=2,
                                   federation={"eval_heldout_loss": False, "secure_aggregation": {"enabled": True},
                                               **private})
        (tmp_path / out / "run").mkdir(parents=True, exist_ok=True)
        (tmp_path / out / "run" / "privacy-seed").write_text("7e" * 32)  # both runs, one secret
        return drive(load_recipe(recipe_file), [16, 17, 18], client=fake_client, **drive_options)

    straight = run("straight")
    calls, real_sum = [], server_step.secure_sum

    def killed_in_round_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # round 2's second sum: its first is done, the global not yet written
            raise KeyboardInterrupt
        return real_sum(*args, **kwargs)

    monkeypatch.setattr(server_step, "secure_sum", killed_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        run("killed")
    assert not RunPaths(tmp_path / "killed" / "run").global_dir(2).exists()
    monkeypatch.setattr(server_step, "secure_sum", real_sum)
    resumed = run("killed")
    for t in (1, 2):
        ours = (RunPaths(resumed).global_dir(t) / "adapter_model.safetensors").read_bytes()
        assert ours == (RunPaths(straight).global_dir(t) / "adapter_model.safetensors").read_bytes()
    assert (resumed / "global_adapter" / "adapter_model.safetensors").read_bytes() == \
        (straight / "global_adapter" / "adapter_model.safetensors").read_bytes()
    if central_dp:  # the noise is there: a round's update is not the clean one
        sidecar = json.loads((RunPaths(resumed).global_dir(2) / SIDECAR).read_text())
        assert sidecar["bounding"]["central_dp"]["noised_sums"] == 2 and sidecar["bounding"]["central_dp"]["noise_std"] > 0


def test_changed_secure_settings_set_the_rounds_they_made_aside(tmp_path):
    recipe_file = write_recipe(tmp_path, method="florist", ranks=(4, 2, 2), rounds=2,
                               federation={"eval_heldout_loss": False, "secure_aggregation": {"enabled": True}})
    run_dir = drive(load_recipe(recipe_file), [16, 17, 18], client=fake_client)
    from florist_hf.engine import Federation

    for overrides, set_aside in (([], False), (["federation.secure_aggregation.fraction_bits=24"], True)):
        federation = Federation(load_recipe(recipe_file, overrides), console=quiet_console())
        try:
            federation.open(force=True)
            federation.plan_round(1, [16, 17, 18])
        finally:
            federation.close()
        assert RunPaths(run_dir).global_dir(1).exists() != set_aside


@pytest.mark.parametrize("change, expected", [
    ({"method": "flora"}, "flora hands every client every other client's factors"),
    ({"method": "fedit", "robust": "median"}, "secure_aggregation and robust do not combine"),
    ({"aggregation": "streaming"}, "secure_aggregation and aggregation: streaming do not combine"),
    ({"method": "fedit", "secure_aggregation": {"sketch_columns": 8}}, "sketch_columns applies to florist, flexlora and fedex"),
    ({"secure_aggregation": {"threshold": 4}}, r"threshold 4 is outside (1, 3]"),
    ({"secure_aggregation": {"fraction_bits": 60}}, "fraction_bits"),
])
def test_what_cannot_combine_with_secure_aggregation_is_refused_in_one_line(tmp_path, change, expected):
    secure = {"enabled": True, **change.pop("secure_aggregation", {})}
    recipe_file = write_recipe(tmp_path, federation={"secure_aggregation": secure, **change})
    result = runner.invoke(app, ["run", str(recipe_file)])
    assert result.exit_code == 2, result.output
    assert expected in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_disabled_secure_aggregation_is_the_plain_run(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, federation={"secure_aggregation": {"enabled": False},
                                                            "clip_update_norm": 0.1}))
    assert recipe.federation.secure() is None
    assert read_adapter  # the plain path keeps every defence


def test_nothing_the_server_step_receives_is_a_clients_contribution(tmp_path, monkeypatch):
    """Both secure sums of a FedEx-LoRA round (sketches and summed factors) are recorded: every masked
    array the server side receives equals no client's contribution and does not correlate with it."""
    import numpy as np

    from florist_hf.secure import server_step
    from florist_hf.secure.protocol import MaskedInput

    recorded, real_sum = [], server_step.secure_sum

    def recording(inputs, *args, **kwargs):
        result = real_sum(inputs, *args, keep_transcript=True, **kwargs)
        # What each client contributed: its arrays, computed again (deterministic) from its side.
        recorded.append(({k: compute() for k, compute in inputs.items()}, result.transcript))
        return result

    monkeypatch.setattr(server_step, "secure_sum", recording)
    dirs, _ = write_clients(tmp_path, torch.float32, ranks=[16, 8, 8, 4])
    secure_aggregate_adapters(dirs, get_method("fedex"), tmp_path / "secure", SecureRound(SecAggSettings(), seed=5))
    assert len(recorded) == 2
    checked = 0
    for inputs, transcript in recorded:
        for message in (m for m in transcript if isinstance(m, MaskedInput)):
            for name, masked in message.arrays.items():
                signed = masked.view(np.int64).astype(np.float64).ravel()
                for contribution in (arrays[name] for arrays in inputs.values()):
                    assert not np.array_equal(masked.view(np.int64) / 2.0**32, contribution)
                    assert abs(np.corrcoef(signed, contribution.ravel())[0, 1]) < 6 / np.sqrt(signed.size)
                    checked += 1
    # 4 clients' messages × (range, lora_b, lora_a; projection) × 2 modules, each against 4 contributions
    assert checked == 4 * 4 * 2 * 4


def test_a_secure_florist_run_with_real_trainer_clients_publishes_the_plain_runs_adapter(tmp_path):
    """`florist-hf run` on the tiny Llama: real Trainer clients, heterogeneous ranks, two rounds."""
    from florist_hf.runner import run_federation

    published = {}
    for secure in (False, True):
        federation = {"secure_aggregation": {"enabled": True}} if secure else {}
        recipe = load_recipe(write_recipe(tmp_path / str(secure), method="florist", threshold=0.9, ranks=(4, 2, 2),
                                          rounds=2, federation=federation))
        run_dir = run_federation(recipe, console=quiet_console())
        published[secure] = run_dir
    for t in (1, 2):
        ours = json.loads((RunPaths(published[True]).global_dir(t) / SIDECAR).read_text())
        theirs = json.loads((RunPaths(published[False]).global_dir(t) / SIDECAR).read_text())
        assert {n: m["selected_rank"] for n, m in ours["modules"].items()} == \
               {n: m["selected_rank"] for n, m in theirs["modules"].items()}
    ours, theirs = delta_weights(published[True] / "global_adapter"), delta_weights(published[False] / "global_adapter")
    assert all(relative_error(ours[m], theirs[m]) < 1e-4 for m in theirs)
    lines = [json.loads(line) for line in (published[True] / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines if line.get("secure_aggregation")] == [1, 2]


@pytest.mark.parametrize("name", ["florist", "fedit", "ffa"])
def test_the_secure_traffic_counted_from_shapes_equals_what_a_round_counts(tmp_path, name):
    """`secure.communication` (what `florist-hf comm --secure` prints) from shapes and ranks alone equals
    the traffic a secure round counts message by message: masked words, Q, keys and shares."""
    from florist_hf.secure.communication import secure_round_communication

    method, ranks = method_named(name), [16, 8, 4, 4]
    dirs, reference = write_clients(tmp_path, torch.bfloat16, shared_a=method.freezes_lora_a, ranks=ranks)
    step = secure_aggregate_adapters(dirs, method, tmp_path / "secure", SecureRound(SecAggSettings(), 3, reference=reference))
    counted = step.sidecar["communication"]
    selected = {name: module["selected_rank"] for name, module in step.sidecar["modules"].items()}
    predicted = secure_round_communication(method, MODULES, ranks, selected, bytes_per_param=2)
    assert predicted["secure"]["uplink_bytes"] == counted["uplink_bytes"]
    assert predicted["secure"]["downlink_bytes"] == counted["downlink_bytes"]
    for key in ("uplink_params", "basis_downlink_bytes", "protocol_uplink_bytes", "protocol_downlink_bytes"):
        assert predicted["secure"][key] == counted["secure"][key], key
    assert {key: predicted["plain"][key] for key in counted["plain"]} == counted["plain"]
    m_plus_n = sum(m + n for m, n in MODULES.values())
    if name == "florist":  # (m+n)·p per module, p = Σ r_k + 8, instead of (m+n)·r_k
        assert predicted["secure"]["uplink_params"][0] == m_plus_n * (sum(ranks) + 8)
        assert predicted["plain"]["uplink_params"] == [m_plus_n * rank for rank in ranks]


def test_comm_shows_the_secure_round_beside_the_plain_one(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
                                  "intermediate_size": 512, "num_attention_heads": 4, "num_hidden_layers": 2,
                                  "num_key_value_heads": 2, "vocab_size": 128}))
    command = ["comm", "--model-config", str(config), "--ranks", "8,4,4", "--secure"]
    figures = json.loads(runner.invoke(app, [*command, "--json"]).output)
    secure = figures["secure"]
    assert secure["uplink_params"] == [2 * ((256 + 256) + (128 + 256)) * (16 + 8)] * 3  # q and v of 2 layers, p = 24
    assert secure["basis_downlink_bytes"] == 2 * (256 + 1 + 128 + 1) * 24 * 8  # p reflectors (m×p) and p scalars τ
    assert secure["uplink_bytes_total"] == sum(secure["masked_uplink_bytes"]) + sum(secure["protocol_uplink_bytes"])
    table = runner.invoke(app, command)
    assert table.exit_code == 0 and "plain" in table.output and "of which the basis Q" in table.output, table.output
    refused = runner.invoke(app, [*command, "--method", "flora"])
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1
    assert "flora hands every client every other client's factors" in refused.output


@pytest.mark.parametrize("name", ["florist", "flexlora", "fedex"])
def test_the_server_step_on_worker_threads_publishes_the_bytes_of_one_thread(tmp_path, name, monkeypatch):
    """With two torch threads each module's work runs on a worker as its sums are unmasked
    (`secure_result`); every module still runs single-threaded, so the global adapter is the one
    thread's to the bit, the clients of `florist-hf run` compute both sums at the caller's thread
    setting, and that setting comes back."""
    from florist_hf.secure.server_step import SumTask

    method = method_named(name)
    dirs, reference = write_clients(tmp_path, torch.float32)
    threads = torch.get_num_threads()
    compute, seen = SumTask.compute, []

    def recording(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return compute(self, *args, **kwargs)

    monkeypatch.setattr(SumTask, "compute", recording)
    written = {}
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            out = tmp_path / f"threads_{count}"
            secure = SecureRound(SecAggSettings(), seed=5, reference=reference)
            seen.clear()
            step = secure_aggregate_adapters(dirs, method, out, secure)
            assert torch.get_num_threads() == count and seen == [count] * 2 * len(RANKS)
            written[count] = {path.relative_to(out): path.read_bytes() for path in sorted(out.rglob("*.safetensors"))}
            assert written[count] and step.result.selected_ranks
    finally:
        torch.set_num_threads(threads)
    assert written[1] == written[2]
