"""A realistic run directory as the federation runner writes it, with real PEFT adapters on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

NUM_LAYERS = 2
MODULES = ("q_proj", "v_proj")
MODULE_SHAPES = {"q_proj": (64, 64), "v_proj": (32, 64)}
CLIENT_RANKS = [4, 4, 4]


def save_peft_adapter(tiny_base: Path, out_dir: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base),
        LoraConfig(r=4, lora_alpha=8, target_modules=list(MODULES)),
    )
    model.save_pretrained(out_dir)
    return out_dir


def module_name(layer: int, short_name: str) -> str:
    return f"base_model.model.model.layers.{layer}.self_attn.{short_name}"


def fake_sidecar(method: str, threshold: float | None, seed: int) -> dict:
    """Decaying singular values per module; FLoRIST keeps the smallest rank reaching τ of the energy."""
    generator = np.random.default_rng(seed)
    modules = {}
    for layer in range(NUM_LAYERS):
        for short_name in MODULES:
            sigma = np.sort(generator.exponential(1.0, size=sum(CLIENT_RANKS)) * np.geomspace(4, 0.05, sum(CLIENT_RANKS)))[::-1]
            energy = np.cumsum(sigma**2) / np.sum(sigma**2)
            rank = int(np.searchsorted(energy, threshold) + 1) if threshold is not None else CLIENT_RANKS[0]
            modules[module_name(layer, short_name)] = {
                "shape": list(MODULE_SHAPES[short_name]),
                "selected_rank": rank,
                "singular_values": [float(s) for s in sigma] if threshold is not None else None,
            }
    total_rank = sum(module["selected_rank"] for module in modules.values())
    return {
        "format": "florist-hf/aggregation",
        "version": 1,
        "method": method,
        "threshold": threshold,
        "clients": [
            {"path": f"clients/client_{k}", "num_samples": 100 + 10 * k, "weight": 1 / len(CLIENT_RANKS), "rank": rank}
            for k, rank in enumerate(CLIENT_RANKS)
        ],
        "modules": modules,
        "communication": {"uplink_bytes_total": 36864, "downlink_bytes_total": 4096 * total_rank, "eff_x1e4": 1e4 / total_rank},
        "total_rank": total_rank,
    }


def write_run_dir(
    run_dir: Path,
    tiny_base: Path,
    *,
    method: str = "florist",
    threshold: float | None = 0.9,
    rounds: int = 3,
    evaluation: dict | None = None,
    seed: int = 0,
) -> Path:
    """RUN_DIR with run.json, metrics.jsonl, rounds/<t>/global/aggregation.json and global_adapter/."""
    run_dir.mkdir(parents=True)
    generator = np.random.default_rng(seed)
    uplink_total = downlink_total = 0
    with open(run_dir / "metrics.jsonl", "w") as metrics:
        for round_index in range(1, rounds + 1):
            for client, rank in enumerate(CLIENT_RANKS):
                loss = 3.0 / round_index + 0.1 * client + 0.05 * float(generator.random())
                record = {"kind": "client", "round": round_index, "client": client, "loss": loss,
                          "num_samples": 100 + 10 * client, "train_seconds": 1.5, "rank": rank, "uplink_bytes": 12288}
                metrics.write(json.dumps(record) + "\n")
            sidecar = fake_sidecar(method, threshold, seed + round_index)
            round_dir = run_dir / "rounds" / str(round_index) / "global"
            round_dir.mkdir(parents=True)
            (round_dir / "aggregation.json").write_text(json.dumps(sidecar, indent=2))
            communication = sidecar["communication"]
            uplink_total += communication["uplink_bytes_total"]
            downlink_total += communication["downlink_bytes_total"]
            record = {"kind": "round", "round": round_index, "total_selected_rank": sidecar["total_rank"],
                      "uplink_bytes_total": communication["uplink_bytes_total"],
                      "downlink_bytes_total": communication["downlink_bytes_total"],
                      "eff_x1e4": communication["eff_x1e4"], "server_seconds": 0.2}
            metrics.write(json.dumps(record) + "\n")

    adapter_dir = save_peft_adapter(tiny_base, run_dir / "global_adapter")
    (adapter_dir / "aggregation.json").write_text(json.dumps(sidecar, indent=2))
    run = {
        "format": "florist-hf/run",
        "version": 1,
        "name": f"dolly-{method}",
        "method": method,
        "threshold": threshold,
        "rounds": rounds,
        "rounds_completed": rounds,
        "num_clients": len(CLIENT_RANKS),
        "clients_per_round": len(CLIENT_RANKS),
        "client_ranks": CLIENT_RANKS,
        "base_model": "TinyLlama/TinyLlama_v1.1",
        "datasets": ["databricks/databricks-dolly-15k"],
        "global_adapter": "global_adapter",
        "communication": {"uplink_bytes_total": uplink_total, "downlink_bytes_total": downlink_total,
                          "eff_x1e4": sidecar["communication"]["eff_x1e4"]},
        "evaluation": evaluation,
        "recipe": {"method": method, "threshold": threshold, "rounds": rounds, "lora": {"r": 4, "alpha": 8}},
    }
    (run_dir / "run.json").write_text(json.dumps(run, indent=2))
    return run_dir
