"""The paper's MMLU protocol (SPEC §7: the 1,444-question subset, 0-shot, greedy) on one seed's
models of the quality benchmark: the base, FLoRA, FedIT, FLoRIST-O and FLoRIST-E."""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.quality import config

#: The models evaluated, by method name in results.json (``base``: no adapter).
MODELS = ("base", "fedit", "flora", "florist-o", "florist-e")


def run_paper_mmlu(results: dict, *, out_dir: Path, limit: float | None = None, batch_size: int = 16) -> dict:
    """Evaluate, add ``results["paper_mmlu"]`` and rewrite results.json and the MMLU part of results.md."""
    from benchmarks.quality.bench import write_json
    from florist_hf.evaluation import evaluate_paper_mmlu

    if not config.PAPER_MMLU.is_file():
        raise FileNotFoundError(f"the MMLU subset is not at {config.PAPER_MMLU} (it lies beside the CI clone)")
    seed = results["seeds"][0]
    setting = "heter" if any(r["setting"] == "heter" for r in results["runs"]) else "homo"
    base_dir = results["base_model"]["path"]
    runs = {r["method"]: r for r in results["runs"] if r["seed"] == seed and r["setting"] == setting}
    count = int(limit) if limit is not None and limit >= 1 else limit
    rows = []
    for method in MODELS:
        if method != "base" and method not in runs:
            continue
        adapter = None if method == "base" else Path(runs[method]["run_dir"]) / "global_adapter"
        tic = time.perf_counter()
        record = evaluate_paper_mmlu(base_dir, adapter, config.PAPER_MMLU, limit=count, device="cpu", batch_size=batch_size)
        scores = record["results"]["florist_mmlu_paper"]
        rows.append({
            "method": method, "label": "base model" if method == "base" else runs[method]["label"],
            "chosen_threshold": runs.get(method, {}).get("chosen_threshold"),
            "macro_acc": scores["macro_acc,none"], "acc": scores["acc,none"],
            "questions": record["n-samples"]["florist_mmlu_paper"]["effective"], "seconds": time.perf_counter() - tic,
        })
        print(f"  MMLU (paper protocol) {rows[-1]['label']}: macro acc {rows[-1]['macro_acc']:.4f}, "
              f"acc {rows[-1]['acc']:.4f} on {rows[-1]['questions']} questions, {rows[-1]['seconds']:.0f} s", flush=True)
    results["paper_mmlu"] = {"seed": seed, "setting": setting, "limit": limit, "file": config.PAPER_MMLU.name, "rows": rows}
    write_json(out_dir / "results.json", results)
    write_markdown_section(results, out_dir / "results.md")
    return results


def _tau(row: dict) -> str:
    return "" if row["chosen_threshold"] is None else f" (τ = {row['chosen_threshold']:g})"


def write_markdown_section(results: dict, markdown: Path) -> None:
    mmlu = results.get("paper_mmlu")
    if not mmlu:
        return
    text = markdown.read_text() if markdown.exists() else ""
    text = text.split("\n## MMLU", 1)[0].rstrip() + "\n"
    questions = mmlu["rows"][0]["questions"] if mmlu["rows"] else 0
    lines = [
        "", f"## MMLU, the paper's protocol ({questions} of the 1,444 questions, seed {mmlu['seed']}, {mmlu['setting']})", "",
        "| model | macro accuracy | accuracy | seconds |", "|---|---|---|---|",
        *(f"| {row['label']}{_tau(row)} "
          f"| {row['macro_acc']:.4f} | {row['acc']:.4f} | {row['seconds']:.0f} |" for row in mmlu["rows"]),
    ]
    markdown.write_text(text + "\n".join(lines) + "\n")


if __name__ == "__main__":  # rerun on a finished benchmark: python -m benchmarks.quality.mmlu OUT [LIMIT]
    import sys

    out = Path(sys.argv[1])
    run_paper_mmlu(json.loads((out / "results.json").read_text()), out_dir=out,
                   limit=float(sys.argv[2]) if len(sys.argv) > 2 else None)
