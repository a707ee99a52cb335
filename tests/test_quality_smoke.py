"""Smoke version of the CPU-scale quality benchmark (benchmarks/quality): one seed, FLoRA and FLoRIST (plain and secure),
a few steps, a tiny base model pre-trained for 3 steps. The full benchmark is not a test."""

import json
import math
from pathlib import Path


def test_quality_benchmark_smoke(shared_data, tmp_path):
    from benchmarks.quality import config
    from benchmarks.quality.bench import main

    if not config.SHARED_DOLLY.is_dir():
        import pytest

        pytest.skip(f"the Dolly split is not at {config.SHARED_DOLLY}")
    out, cache = tmp_path / "out", tmp_path / "cache"
    results = main(["--smoke", "--out", str(out), "--cache", str(cache)])

    # The base model is an ordinary HF model directory with a trained BPE tokenizer, and is cached.
    base_dir = cache / next(p.name for p in cache.iterdir() if p.name.startswith("base-"))
    assert (base_dir / "config.json").exists() and (base_dir / "tokenizer.json").exists()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
    assert results["base_model"]["cached"] is False

    written = json.loads((out / "results.json").read_text())
    runs = {(r["setting"], r["method"]): r for r in written["runs"]}
    assert set(runs) == {("homo", "flora"), ("homo", "florist"), ("homo", "florist-o"), ("homo", "florist-e"),
                         ("homo", "florist-secure"), ("centralised", "florist")}
    for run in runs.values():
        assert math.isfinite(run["test_loss"])
        assert len(run["client_eval_loss"]) == 2 and all(math.isfinite(x) for x in run["client_eval_loss"])
        assert run["uplink_bytes_per_round"] > 0 and run["downlink_bytes_per_round"] > 0
        assert run["total_selected_rank"] >= 1
    # FLoRA broadcasts the stacked rank R = 2 clients × r = 2 on each of 2 layers × (q, v) modules;
    # FLoRIST at most that, and it aggregates FLoRA's very client adapters (round 1 reused).
    assert runs[("homo", "flora")]["total_selected_rank"] == 4 * 4
    assert 4 <= runs[("homo", "florist")]["total_selected_rank"] <= 4 * 4
    # FLoRA and FLoRIST run as one `florist-hf sweep`: FLoRA aggregates FLoRIST's round-1 clients.
    assert runs[("homo", "flora")]["first_round_from"] == runs[("homo", "florist")]["run_dir"]
    assert runs[("homo", "florist-o")]["chosen_threshold"] == runs[("homo", "florist-e")]["chosen_threshold"] == 0.9
    assert runs[("homo", "flora")]["downlink_bytes_per_round"] >= runs[("homo", "florist")]["downlink_bytes_per_round"]
    assert written["references"][0]["method"] == "base"

    # Secure FLoRIST went through `florist-hf run` with secure aggregation, training its own clients: they equal
    # plain FLoRIST's bit for bit, every module keeps the same rank, and the update and the loss agree.
    secure, plain = runs[("homo", "florist-secure")], runs[("homo", "florist")]
    assert secure["threshold"] == plain["threshold"] == 0.9 and secure["first_round_from"] is None
    sidecar = json.loads((Path(secure["run_dir"]) / "global_adapter" / "aggregation.json").read_text())
    assert sidecar["secure_aggregation"]["needs"] == ["sketch_sums"]
    assert secure["uplink_bytes_per_round"] > plain["uplink_bytes_per_round"]  # (m+n)·p masked words, not (m+n)·r_k
    from benchmarks.quality.secure import main as compare

    record = compare([str(out / "results.json"), "--json", str(out / "secure.json")])
    (pair,) = record["pairs"]
    assert pair["clients"] == {"clients": 2, "identical": True, "max_abs_factor_difference": 0.0}
    assert pair["globals"]["same_ranks"] and pair["globals"]["total_rank_secure"] == plain["total_selected_rank"]
    assert pair["globals"]["max_relative_update_difference"] < 1e-5
    assert abs(pair["test_loss_difference"]) < 1e-4
    assert json.loads((out / "secure.json").read_text())["pairs"][0]["seed"] == 0

    labels = {row["label"] for row in written["summary"]}
    assert {"FLoRA", "FLoRIST τ=0.90", "centralised LoRA", "base model (no fine-tuning)"} <= labels
    table = (out / "results.md").read_text()
    assert "| homogeneous ranks | FLoRIST τ=0.90 |" in table
    assert "| homogeneous ranks | FLoRIST τ=0.90, secure aggregation |" in table
    for plot in ("quality_vs_bytes.png", "rank_vs_tau.png", "client_losses.png"):
        assert (out / plot).stat().st_size > 1000

    # The base model is pre-trained once: a second request for the same settings reuses it.
    from benchmarks.quality.base import ensure_base
    from benchmarks.quality.bench import SMOKE

    again, summary = ensure_base(
        cache, vocab_size=SMOKE["vocab_size"], model_settings=SMOKE["model_settings"], settings=SMOKE["pretrain_settings"],
        log=lambda *args: None,
    )
    assert again == base_dir and summary["cached"] is True


def test_the_benchmark_without_the_real_data_says_where_it_looked(tmp_path, monkeypatch, capsys):
    """No Dolly split where the benchmark reads it (a clone without ../shared/data, or a worktree): one line
    naming the folder and the variable that points elsewhere, before anything runs."""
    import pytest

    from benchmarks.quality import config
    from benchmarks.quality.bench import main

    missing = tmp_path / "nowhere" / "dolly" / "8"
    monkeypatch.setattr(config, "SHARED_DOLLY", missing)
    with pytest.raises(SystemExit) as exit_:
        main(["--smoke", "--out", str(tmp_path / "out")])
    message = str(exit_.value)
    assert str(missing) in message and "FLORIST_HF_SHARED_DATA" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
