"""Baselines over several rounds on the real SmolLM2-135M, for the pairs whose round 1 is the same
computation and which part from round 2 on: FFA-LoRA and FedSVD (clients train B against a frozen
A, random or re-factorised), FedIT and FedEx-LoRA (clients continue the averaged factors, without
or with the residual that makes the global model exact).

    .venv/bin/python -m benchmarks.over_rounds                                   # ffa,fedsvd; about 20 minutes
    .venv/bin/python -m benchmarks.over_rounds --methods fedit,fedex --setting homo

``recipes/smollm2_135m_dolly_<setting>.yaml`` on the paper's Dolly split (``../shared/data/dolly``
beside the clone, FLoRA's layout), FLoRIST's recipe with the method changed, run through
`run_federation`; the second method takes the first one's round-1 client adapters
(`sweep.share_round_one`: the same init, the same training). Reports the held-out loss (response
tokens) after every round and the bytes each way; writes ``over_rounds_<a>_<b>.json`` beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.measure import machine_record

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DOLLY = REPO.parent / "shared" / "data" / "dolly"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.over_rounds", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--methods", default="ffa,fedsvd", help="two methods whose clients train alike in round 1")
    parser.add_argument("--setting", default="heter", choices=("heter", "homo"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not (DOLLY / "8").is_dir():
        raise SystemExit(f"the paper's Dolly split is not at {DOLLY} (it lies beside the CI clone)")
    from rich.console import Console

    from florist_hf.recipe import client_training_view
    from florist_hf.recipe import load_recipe
    from florist_hf.runner import run_federation
    from florist_hf.sweep import share_round_one

    console = Console()
    recipe_file = REPO / "recipes" / f"smollm2_135m_dolly_{args.setting}.yaml"
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        previous = previous_recipe = None
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        for method in methods:
            run_dir = Path(scratch) / method
            recipe = load_recipe(recipe_file, [
                "data.layout=flora", f"data.source={DOLLY}", f"federation.method={method}",
                f"federation.rounds={args.rounds}", "evaluation=null", f"output_dir={run_dir}"])
            if previous is not None:
                if client_training_view(recipe) != client_training_view(previous_recipe):
                    raise SystemExit(f"{methods[0]} and {method} do not train their clients alike; no round 1 to share")
                share_round_one(previous, run_dir)
            started = time.perf_counter()
            run_federation(recipe, console=console)
            seconds = time.perf_counter() - started
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            rounds = [r for r in records if r["kind"] == "round"]
            rows[method] = {
                "heldout_loss": [r.get("heldout_loss") for r in rounds],
                "uplink_bytes": [r["uplink_bytes_total"] for r in rounds],
                "downlink_bytes": [r["downlink_bytes_total"] for r in rounds],
                "client_loss": [[r["loss"] for r in records if r["kind"] == "client" and r["round"] == t]
                                for t in range(1, args.rounds + 1)],
                "seconds": seconds,
            }
            previous, previous_recipe = run_dir, recipe
            console.print(f"{method}: held-out loss per round {rows[method]['heldout_loss']}")
    result = {**machine_record(), "setting": args.setting, "rounds": args.rounds, "recipe": str(recipe_file.relative_to(REPO)),
              "methods": rows}
    (HERE / f"over_rounds_{'_'.join(methods)}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
