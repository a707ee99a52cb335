"""Per-round wall time of a long federation: ``recipes/flowertune_shape.yaml`` (FlowerTune's shape:
20 clients, 2 per round, cosine round schedule, 200 rounds, on the demo model) run to the end.

    .venv/bin/python -m benchmarks.long_federation                 # about 15 minutes on 2 CPU cores
    .venv/bin/python -m benchmarks.long_federation --rounds 50

``florist-hf run`` in a subprocess; each round's wall time is the time between the console lines
that start consecutive rounds (the last one ends with the process). Writes
``long_federation.json`` and ``long_federation.png`` beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.measure import machine_record

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "flowertune_shape.yaml"
ROUND_LINE = re.compile(r"^round (\d+)/(\d+)")


def plot(seconds: list[float], catch_up: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    rounds = range(1, len(seconds) + 1)
    top.plot(rounds, seconds, ".", ms=3)
    top.set_ylabel("round wall time (s)")
    top.set_title("flowertune_shape: 20 clients, 2 per round, demo model")
    top.set_ylim(0, max(seconds) * 1.15)
    top.grid(alpha=0.3)
    bottom.plot(rounds, [b / 1024 for b in catch_up], ".", ms=3, color="tab:orange")
    bottom.set_ylabel("catch-up downlink (KiB)")
    bottom.set_xlabel("round")
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.long_federation", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / "run"
        command = [sys.executable, "-m", "florist_hf", "run", str(RECIPE), "--set", f"output_dir={run_dir}",
                   "--set", f"federation.rounds={args.rounds}"]
        starts: dict[int, float] = {}
        started = time.perf_counter()
        with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
            for line in process.stdout:
                match = ROUND_LINE.match(line.strip())
                if match:
                    starts[int(match.group(1))] = time.perf_counter()
                    if int(match.group(1)) % 25 == 0:
                        print(f"round {match.group(1)} at {starts[int(match.group(1))] - started:.0f} s", flush=True)
        ended = time.perf_counter()
        if process.returncode != 0:
            raise SystemExit(f"the run failed (exit {process.returncode})")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rounds = [r for r in records if r["kind"] == "round"]
        summary = json.loads((run_dir / "run.json").read_text())
    order = sorted(starts)
    seconds = [starts[t + 1] - starts[t] for t in order[:-1]] + [ended - starts[order[-1]]]
    catch_up = [r["catch_up_downlink_bytes"] for r in rounds]
    # What the same clients would have received with every missed round sent one by one (before
    # the compact state): each missed round's global, as that round's own clients got it.
    one_by_one, last_seen = [], {}
    for r in rounds:
        share = {s["round"]: s["downlink_bytes_total"] / len(s["clients"]) for s in rounds if s["round"] < r["round"]}
        one_by_one.append(int(sum(share[t] for client in r["clients"] for t in share if t > last_seen.get(client, 0))))
        last_seen.update({client: r["round"] for client in r["clients"]})
    result = {
        **machine_record(), "rounds": args.rounds, "round_seconds": seconds, "total_seconds": ended - started,
        "catch_up_downlink_bytes": catch_up, "catch_up_one_by_one_bytes": one_by_one, "downlink_bytes": [r["downlink_bytes_total"] for r in rounds],
        "server_seconds": [r["server_seconds"] for r in rounds],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
        "published": summary.get("published"), "communication": summary["communication"],
    }
    (HERE / "long_federation.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(seconds, catch_up, HERE / "long_federation.png")
    for first, last in ((1, 10), (2, 11), (91, 100), (191, 200)):
        window = seconds[first - 1:last]
        if len(window) == last - first + 1:
            print(f"rounds {first}-{last}: median {statistics.median(window):.2f} s", flush=True)
    print(f"total {ended - started:.0f} s; catch-up {sum(catch_up):,} B (one by one: {sum(one_by_one):,} B) against the rounds' own downlink "
          f"{sum(result['downlink_bytes']):,} B; peak RSS {result['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
