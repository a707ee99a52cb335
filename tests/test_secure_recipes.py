"""Secure aggregation on the users' recipes: shipped recipes of each client trainer and the hardest model
shape, run through the CLI twice (as shipped, then with ``federation.secure_aggregation.enabled``), on
the stand-ins of the recipe conformance tests (`test_recipes`). The clients train the same adapters
either way, so the secure global must be the plain one: FLoRIST's ranks equal and every module's
update within the secure sums' round-off.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import delta_weights
from test_recipes import REPO, conformance_overrides, run_recipe, stand_ins  # noqa: F401 (a fixture)

#: The recipes: TRL's SFTTrainer clients under FedIT (summed factors) on the real SmolLM2, the Llama-3.2-1B
#: stand-in (tied embeddings, GQA) in bf16 under FLoRIST, DPOTrainer clients on the real SmolLM2 under FLoRIST.
#: (By hand, 2026-12-07: all 27 shipped recipes ran under secure aggregation, and six, these and the Llama-7B,
#: TinyLlama and SmolLM2 Dolly ones, compared so. DP-SGD clients under secure aggregation: test_privacy.)
CASES = ("flowertune_general_nlp", "llama32_1b_dolly_heter", "smollm2_135m_dpo")
#: The largest relative difference of a module's update between the two globals (measured 1.3e-6 to 3.7e-6).
TOLERANCE = 2e-5


def _round_one(run_dir: Path) -> tuple[dict, dict]:
    """Round 1's sidecar and the rank FLoRIST selected per module (None for a method that selects none)."""
    sidecar = json.loads((run_dir / "rounds" / "1" / "global" / "aggregation.json").read_text())
    return sidecar, {name: module.get("selected_rank") for name, module in sidecar["modules"].items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_a_shipped_recipe_under_secure_aggregation_publishes_the_plain_runs_global(name, tmp_path, stand_ins):
    recipe_file = REPO / "recipes" / f"{name}.yaml"
    runs = {}
    for kind, extra in (("plain", []), ("secure", ["federation.secure_aggregation.enabled=true"])):
        overrides = [*conformance_overrides(recipe_file, tmp_path / kind, stand_ins), "federation.rounds=1", *extra]
        result = run_recipe(recipe_file, overrides)
        assert result.exit_code == 0, f"{name} ({kind}):\n{result.output}\n{result.exception!r}"
        runs[kind] = tmp_path / kind

    sidecar, secure_ranks = _round_one(runs["secure"])
    assert "secure_aggregation" in sidecar and sidecar["secure_aggregation"]["sums"] == (2 if sidecar["method"] == "florist" else 1)
    plain_sidecar, plain_ranks = _round_one(runs["plain"])
    assert "secure_aggregation" not in plain_sidecar
    assert secure_ranks == plain_ranks
    got, expected = delta_weights(runs["secure"] / "global_adapter"), delta_weights(runs["plain"] / "global_adapter")
    assert set(got) == set(expected)
    for module in expected:
        error = float((got[module] - expected[module]).norm() / expected[module].norm())
        assert error < TOLERANCE, f"{name} {module}: the secure update differs from the plain one by {error:.2e}"
