"""MMLU on the 1,444-question subset for one seed's models of the quality benchmark: the base and every
method's global adapter, by log-likelihood (``florist_mmlu``, lm-eval's mmlu prompt and scoring) with
standard errors and each adapter's paired difference to the base, and optionally the paper's generative
protocol (``florist_mmlu_paper``) with its artefact shares on the first questions.

    python -m benchmarks.quality.mmlu OUT [--limit N] [--generative-limit N] [--generative-models base,flora]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.quality import config

#: The paper protocol's numbers kept per model (lm-eval metric names, filter "none").
PAPER_METRICS = ("macro_acc", "acc", "strict_acc", "no_letter", "multi_letter", "substring_only", "case_miss")


def benchmark_models(results: dict) -> list[dict]:
    """The base and the federated runs of the first seed and last setting (the centralised reference left out)."""
    seed = results["seeds"][0]
    setting = "heter" if any(r["setting"] == "heter" for r in results["runs"]) else "homo"
    models = [{"key": "base", "label": "base model", "adapter": None}]
    for run in results["runs"]:
        if run["seed"] == seed and run["setting"] == setting and not run["label"].startswith("centralised"):
            models.append({"key": run["name"], "label": run["label"], "adapter": str(Path(run["run_dir"]) / "global_adapter")})
    return models


def _per_question(record: dict, task: str, metric: str) -> dict[int, float]:
    return {sample["doc_id"]: float(sample[metric]) for sample in record["samples"][task]}


def paired_difference(model: dict[int, float], base: dict[int, float]) -> tuple[float, float]:
    """Mean and standard error of the per-question difference ``model - base`` (the same questions)."""
    differences = [model[doc] - base[doc] for doc in sorted(base)]
    count = len(differences)
    mean = sum(differences) / count
    variance = sum((d - mean) ** 2 for d in differences) / (count - 1) if count > 1 else 0.0
    return mean, math.sqrt(variance / count)


def run_mmlu(results: dict, *, limit: int | None = None, generative_limit: int | None = None,
             generative_models: tuple[str, ...] = (), batch_size: int = 16, log=print) -> dict:
    """Evaluate every model of ``benchmark_models``; returns the record written to mmlu JSON."""
    from florist_hf.evaluation import MMLU_SUBSET_TASK, PAPER_MMLU_TASK, evaluate_adapter, evaluate_paper_mmlu

    if not config.PAPER_MMLU.is_file():
        raise FileNotFoundError(f"the MMLU subset is not at {config.PAPER_MMLU} (set FLORIST_HF_SHARED_DATA)")
    base_dir = results["base_model"]["path"]
    started = datetime.now(timezone.utc)
    rows, base_scores = [], None
    for model in benchmark_models(results):
        tic = time.perf_counter()
        record = evaluate_adapter(base_dir, model["adapter"], tasks=[MMLU_SUBSET_TASK], mmlu_file=config.PAPER_MMLU,
                                  limit=limit, device="cpu", batch_size=batch_size, log_samples=True)
        scores = record["results"][MMLU_SUBSET_TASK]
        per_question = _per_question(record, MMLU_SUBSET_TASK, "acc")
        row = {**model, "acc": scores["acc,none"], "acc_stderr": scores["acc_stderr,none"],
               "macro_acc": scores["macro_acc,none"], "questions": len(per_question),
               "seconds": round(time.perf_counter() - tic, 1)}
        if base_scores is None:
            base_scores = per_question
        else:
            row["delta_vs_base"], row["delta_stderr"] = paired_difference(per_question, base_scores)
            row["changed_answers"] = sum(per_question[doc] != base_scores[doc] for doc in base_scores)
        log(f"  MMLU (log-likelihood) {row['label']}: acc {row['acc']:.4f} ± {row['acc_stderr']:.4f}, "
            f"macro {row['macro_acc']:.4f}, {row['questions']} questions, {row['seconds']:.0f} s")
        if model["key"] in generative_models:
            tic = time.perf_counter()
            paper = evaluate_paper_mmlu(base_dir, model["adapter"], config.PAPER_MMLU, limit=generative_limit,
                                        device="cpu", batch_size=batch_size)
            metrics = paper["results"][PAPER_MMLU_TASK]
            row["paper"] = {name: metrics[f"{name},none"] for name in PAPER_METRICS}
            row["paper"]["acc_stderr"] = metrics["acc_stderr,none"]
            row["paper"]["strict_acc_stderr"] = metrics["strict_acc_stderr,none"]
            row["paper"]["questions"] = paper["n-samples"][PAPER_MMLU_TASK]["effective"]
            row["paper"]["seconds"] = round(time.perf_counter() - tic, 1)
            log(f"  MMLU (paper protocol) {row['label']}: " + ", ".join(f"{k} {v:.3f}" for k, v in row["paper"].items()
                                                                       if isinstance(v, float)))
        rows.append(row)
    return {
        "date": started.isoformat(timespec="seconds"), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "torch_threads": _torch_threads(),
        "seed": results["seeds"][0], "file": config.PAPER_MMLU.name, "limit": limit, "generative_limit": generative_limit,
        "base_model": results["base_model"], "rows": rows,
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def markdown_table(record: dict) -> str:
    """The log-likelihood table, then the paper protocol's where it ran."""
    lines = ["| model | acc ± SE | Δ vs base ± paired SE | answers changed | macro acc | seconds |", "|---|---|---|---|---|---|"]
    for row in record["rows"]:
        delta = "" if "delta_vs_base" not in row else f"{row['delta_vs_base']:+.4f} ± {row['delta_stderr']:.4f}"
        lines.append(f"| {row['label']} | {row['acc']:.4f} ± {row['acc_stderr']:.4f} | {delta} | "
                     f"{row.get('changed_answers', '')} | {row['macro_acc']:.4f} | {row['seconds']:.0f} |")
    paper_rows = [row for row in record["rows"] if "paper" in row]
    if paper_rows:
        lines += ["", "| model (paper protocol) | macro acc | acc ± SE | strict acc ± SE | no letter | ≥ 2 letters | "
                      "substring only | case miss | questions | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in paper_rows:
            p = row["paper"]
            lines.append(f"| {row['label']} | {p['macro_acc']:.3f} | {p['acc']:.3f} ± {p['acc_stderr']:.3f} | "
                         f"{p['strict_acc']:.3f} ± {p['strict_acc_stderr']:.3f} | {p['no_letter']:.3f} | {p['multi_letter']:.3f} | "
                         f"{p['substring_only']:.3f} | {p['case_miss']:.3f} | {p['questions']} | {p['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.mmlu", description=__doc__)
    parser.add_argument("out", type=Path, help="a finished quality benchmark's folder (its results.json)")
    parser.add_argument("--limit", type=int, default=None, help="log-likelihood MMLU on the first N questions (default all)")
    parser.add_argument("--generative-limit", type=int, default=None, help="the paper protocol on the first N questions")
    parser.add_argument("--generative-models", default="", help="comma-separated model keys (base, run names) for the paper protocol")
    parser.add_argument("--json", type=Path, default=None, help="where the record goes (default OUT/mmlu.json)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchmarks.quality.bench import write_json
    from florist_hf.cli import quiet_libraries

    quiet_libraries()
    results = json.loads((args.out / "results.json").read_text())
    record = run_mmlu(results, limit=args.limit, generative_limit=args.generative_limit,
                      generative_models=tuple(name for name in args.generative_models.split(",") if name))
    write_json(args.json or args.out / "mmlu.json", record)
    print(markdown_table(record))
    return record


if __name__ == "__main__":
    main()
