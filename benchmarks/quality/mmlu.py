"""MMLU on the 1,444-question subset for one seed's models of the quality benchmark: the base and every
method's global adapter, by log-likelihood (``florist_mmlu``, lm-eval's mmlu prompt and scoring) with
standard errors and each adapter's paired difference to the base, and optionally the paper's generative
protocol (``florist_mmlu_paper``) with its artefact shares on the first questions.

    python -m benchmarks.quality.mmlu OUT [--sample N] [--models base,NAME=ADAPTER,...]
                                          [--paper --paper-limit N] [--json FILE]
    python -m benchmarks.quality.mmlu OUT --merge A.json B.json --json FILE

``--sample N`` evaluates a seeded random sample of N of the 1,444 questions (the same for every model, so
differences are paired); ``--models`` names the adapters instead of OUT/results.json's runs; ``--paper`` runs
the generative protocol instead; a later call with the same ``--json`` adds its rows to the record (the
base's answers serve the paired differences); ``--merge`` joins records of calls run side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
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


def _answer_counts(record: dict, task: str) -> dict[str, int]:
    """How often the model's likeliest letter is each of A-D (a small base's letter bias shows here)."""
    counts = dict.fromkeys("ABCD", 0)
    for sample in record["samples"][task]:
        scores = [loglikelihood for loglikelihood, _ in sample["filtered_resps"]]
        counts["ABCD"[max(range(4), key=scores.__getitem__)]] += 1
    return counts


def paired_difference(model: dict[int, float], base: dict[int, float]) -> tuple[float, float]:
    """Mean and standard error of the per-question difference ``model - base`` (the same questions)."""
    differences = [model[doc] - base[doc] for doc in sorted(base)]
    count = len(differences)
    mean = sum(differences) / count
    variance = sum((d - mean) ** 2 for d in differences) / (count - 1) if count > 1 else 0.0
    return mean, math.sqrt(variance / count)


def sample_file(out_dir: Path, count: int | None, seed: int = 0) -> tuple[Path, list[int]]:
    """The subset file (or a seeded random sample of ``count`` of its questions, written to ``out_dir``)."""
    records = json.loads(config.PAPER_MMLU.read_text())
    if count is None or count >= len(records):
        return config.PAPER_MMLU, list(range(len(records)))
    chosen = sorted(random.Random(seed).sample(range(len(records)), count))
    path = out_dir / f"mmlu_sample_{count}_seed{seed}.json"
    path.write_text(json.dumps([records[index] for index in chosen]))
    return path, chosen


def run_mmlu(models: list[dict], base_dir: str, data_file: Path, *, base_row: dict | None = None, batch_size: int = 8,
             log=print) -> list[dict]:
    """One row per model: florist_mmlu's acc ± SE, macro acc, per-question answers and, after the
    base, the paired difference to it."""
    from florist_hf.evaluation import MMLU_SUBSET_TASK, evaluate_adapter

    rows = []
    base_scores = None if base_row is None else {int(k): v for k, v in base_row["per_question"].items()}
    for model in models:
        tic = time.perf_counter()
        record = evaluate_adapter(base_dir, model["adapter"], tasks=[MMLU_SUBSET_TASK], mmlu_file=data_file,
                                  device="cpu", batch_size=batch_size, log_samples=True)
        scores = record["results"][MMLU_SUBSET_TASK]
        per_question = _per_question(record, MMLU_SUBSET_TASK, "acc")
        row = {**model, "acc": scores["acc,none"], "acc_stderr": scores["acc_stderr,none"],
               "macro_acc": scores["macro_acc,none"], "questions": len(per_question),
               "seconds": round(time.perf_counter() - tic, 1), "per_question": per_question,
               "answers": _answer_counts(record, MMLU_SUBSET_TASK)}
        if model["key"] == "base":
            base_scores = per_question
        elif base_scores is not None:
            row["delta_vs_base"], row["delta_stderr"] = paired_difference(per_question, base_scores)
            row["changed_answers"] = sum(per_question[doc] != base_scores[doc] for doc in base_scores)
        log(f"  MMLU (log-likelihood) {row['label']}: acc {row['acc']:.4f} ± {row['acc_stderr']:.4f}, "
            f"macro {row['macro_acc']:.4f}, {row['questions']} questions, {row['seconds']:.0f} s", flush=True)
        rows.append(row)
    return rows


def run_paper(models: list[dict], base_dir: str, data_file: Path, *, limit: int | None, batch_size: int = 8,
              log=print) -> list[dict]:
    """One row per model: the paper protocol's score and artefact shares on the first ``limit`` questions."""
    from florist_hf.evaluation import PAPER_MMLU_TASK, evaluate_paper_mmlu

    rows = []
    for model in models:
        tic = time.perf_counter()
        record = evaluate_paper_mmlu(base_dir, model["adapter"], data_file, limit=limit, device="cpu", batch_size=batch_size)
        metrics = record["results"][PAPER_MMLU_TASK]
        paper = {name: metrics[f"{name},none"] for name in PAPER_METRICS}
        paper.update(acc_stderr=metrics["acc_stderr,none"], strict_acc_stderr=metrics["strict_acc_stderr,none"],
                     questions=record["n-samples"][PAPER_MMLU_TASK]["effective"], seconds=round(time.perf_counter() - tic, 1))
        rows.append({**model, "paper": paper})
        log(f"  MMLU (paper protocol) {model['label']}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in paper.items() if isinstance(v, float)), flush=True)
    return rows


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def markdown_table(record: dict) -> str:
    """The log-likelihood table, then the paper protocol's where it ran."""
    lines = ["| model | acc ± SE | Δ vs base ± paired SE | answers changed | macro acc | seconds |", "|---|---|---|---|---|---|"]
    for row in (row for row in record["rows"] if "acc" in row):
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


def merge_records(records: list[dict]) -> dict:
    """One record from records of the same questions (calls run side by side), the paired
    differences to the base recomputed for every log-likelihood row."""
    merged = {**records[0], "runs": [run for record in records for run in record["runs"]],
              "rows": [row for record in records for row in record["rows"]]}
    if any(record["question_ids"] != merged["question_ids"] for record in records):
        raise SystemExit("the records hold different questions")
    base = next((row for row in merged["rows"] if row["key"] == "base" and "acc" in row), None)
    if base is not None:
        base_scores = {int(k): v for k, v in base["per_question"].items()}
        for row in merged["rows"]:
            if "acc" in row and row is not base:
                scores = {int(k): v for k, v in row["per_question"].items()}
                row["delta_vs_base"], row["delta_stderr"] = paired_difference(scores, base_scores)
                row["changed_answers"] = sum(scores[doc] != base_scores[doc] for doc in base_scores)
    return merged


def _named_models(text: str) -> list[dict]:
    models = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, adapter = item.partition("=")
        models.append({"key": key, "label": "base model" if key == "base" else key, "adapter": adapter or None})
    return models


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.mmlu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="a quality benchmark's folder (its results.json, unless --models)")
    parser.add_argument("--sample", type=int, default=None, help="a seeded random sample of N questions (default all 1,444)")
    parser.add_argument("--models", default=None, help="comma-separated base and NAME=ADAPTER_DIR (default: OUT/results.json)")
    parser.add_argument("--base-dir", default=None, help="the base model's directory (default: OUT/results.json's)")
    parser.add_argument("--paper", action="store_true", help="the paper's generative protocol instead (see --paper-limit)")
    parser.add_argument("--paper-limit", type=int, default=None, help="the paper protocol on the first N questions of the sample")
    parser.add_argument("--json", type=Path, default=None, help="the record, extended if it exists (default OUT/mmlu.json)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="instead of running: merge these records (the same questions) into --json")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchmarks.measure import write_json
    from florist_hf.cli import quiet_libraries

    if args.merge:
        record = merge_records([json.loads(path.read_text()) for path in args.merge])
        write_json(args.json or args.out / "mmlu.json", record)
        print(markdown_table(record))
        return record

    quiet_libraries()
    results = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").exists() else None
    models = _named_models(args.models) if args.models else benchmark_models(results)
    base_dir = args.base_dir or results["base_model"]["path"]
    json_path = args.json or args.out / "mmlu.json"
    record = json.loads(json_path.read_text()) if json_path.exists() else None
    data_file, question_ids = sample_file(args.out, args.sample)
    if record is not None and record["question_ids"] != question_ids:
        raise SystemExit(f"{json_path} holds other questions; pass the same --sample or another --json")
    done = {row["key"] for row in record["rows"] if ("paper" in row) == args.paper} if record else set()
    base_row = next((row for row in record["rows"] if row["key"] == "base" and "acc" in row), None) if record else None
    started = datetime.now(timezone.utc)
    todo = [model for model in models if model["key"] not in done]
    if args.paper:
        rows = run_paper(todo, base_dir, data_file, limit=args.paper_limit)
    else:
        rows = run_mmlu(todo, base_dir, data_file, base_row=base_row)
    if record is None:
        record = {"file": config.PAPER_MMLU.name, "sample": args.sample, "sample_seed": 0, "question_ids": question_ids,
                  "base_model": base_dir, "runs": [], "rows": []}
    record["runs"].append({"date": started.isoformat(timespec="seconds"),
                           "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "machine": f"{platform.machine()} {os.cpu_count()} cores", "torch_threads": _torch_threads(),
                           "load_average": os.getloadavg(), "models": [row["key"] for row in rows]})
    record["rows"] += rows
    write_json(json_path, record)
    print(markdown_table(record))
    return record


if __name__ == "__main__":
    main()
