"""Secure against plain FLoRIST in the quality benchmark: each `florist-secure` run beside the plain
FLoRIST run of the same setting, seed and τ: their test losses, their clients (a one-round federation's
clients train alike whatever the aggregation, so their kept adapters must be equal), every module's
selected rank and its update difference, and the seed spread the loss difference is read against.

    python -m benchmarks.quality.secure RESULTS.json [MORE_RESULTS.json ...] [--json OUT.json] [--markdown OUT.md]

RESULTS.json: what `python -m benchmarks.quality --baselines florist-secure ...` writes (the plain and the
secure runs may come from separate invocations); the run directories they name must still be there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
from pathlib import Path

from benchmarks.measure import write_json


def client_dirs(run_dir: Path, round_index: int = 1) -> list[Path]:
    from florist_hf.rundir import RunPaths

    return RunPaths(Path(run_dir)).client_dirs(round_index)


def compare_clients(plain_run: Path, secure_run: Path) -> dict:
    """Both runs' kept round-1 client adapters, factor by factor: equal bit for bit, and the largest difference."""
    from florist_hf.adapters import read_adapter

    plain, secure = client_dirs(plain_run), client_dirs(secure_run)
    if [d.name for d in plain] != [d.name for d in secure] or not plain:
        raise SystemExit(f"{plain_run} and {secure_run}: different or no kept round-1 clients "
                         f"({[d.name for d in plain]} vs {[d.name for d in secure]}); rerun both without deleting rounds/")
    identical, largest = True, 0.0
    for ours, theirs in zip(secure, plain):
        a, b = read_adapter(ours), read_adapter(theirs)
        if set(a.modules) != set(b.modules) or a.num_samples != b.num_samples:
            identical, largest = False, float("inf")
            continue
        for name, module in a.modules.items():
            other = b.modules[name]
            for x, y in ((module.lora_a, other.lora_a), (module.lora_b, other.lora_b)):
                same = x.shape == y.shape and bool((x == y).all())
                identical &= same
                largest = max(largest, float((x.double() - y.double()).abs().max()) if x.shape == y.shape else float("inf"))
    return {"clients": len(plain), "identical": identical, "max_abs_factor_difference": largest}


def compare_globals(plain_global: Path, secure_global: Path) -> dict:
    """Every module's rank in both global adapters and ‖ΔW_secure − ΔW_plain‖_F / ‖ΔW_plain‖_F (ΔW = s·B·A, fp64)."""
    from florist_hf.adapters import read_adapter

    plain, secure = read_adapter(plain_global), read_adapter(secure_global)
    ranks_plain = {name: m.lora_a.shape[0] for name, m in plain.modules.items()}
    ranks_secure = {name: m.lora_a.shape[0] for name, m in secure.modules.items()}
    differences = {}
    for name, module in plain.modules.items():
        ours = secure.modules[name]
        theirs_update = module.scale * (module.lora_b.double() @ module.lora_a.double())
        ours_update = ours.scale * (ours.lora_b.double() @ ours.lora_a.double())
        differences[name] = float((ours_update - theirs_update).norm() / theirs_update.norm())
    worst = max(differences, key=differences.get)
    return {
        "modules": len(ranks_plain), "same_ranks": ranks_plain == ranks_secure,
        "modules_with_other_rank": sorted(n for n in ranks_plain if ranks_plain[n] != ranks_secure.get(n)),
        "total_rank_plain": sum(ranks_plain.values()), "total_rank_secure": sum(ranks_secure.values()),
        "max_relative_update_difference": differences[worst], "max_difference_module": worst,
        "median_relative_update_difference": statistics.median(differences.values()),
        "global_dtype": str(next(iter(plain.modules.values())).lora_a.dtype).removeprefix("torch."),
    }


def pairs(results: list[dict]) -> list[tuple[dict, dict]]:
    """(plain, secure) run records of the same setting, seed and τ, in setting and seed order."""
    runs = [run for result in results for run in result["runs"]]
    plain = {(r["setting"], r["seed"], r["threshold"]): r for r in runs if r["method"] == "florist" and r["setting"] != "centralised"}
    secure = {(r["setting"], r["seed"], r["threshold"]): r for r in runs if r["method"] == "florist-secure"}
    return [(plain[key], secure[key]) for key in sorted(secure, key=lambda k: (k[0] != "homo", k[1], k[2])) if key in plain]


def compare(results: list[dict]) -> dict:
    """The record: per pair its losses, clients, ranks and update differences; per setting the seed spread."""
    rows = []
    for plain, secure in pairs(results):
        plain_dir, secure_dir = Path(plain["run_dir"]), Path(secure["run_dir"])
        sidecar = json.loads((secure_dir / "global_adapter" / "aggregation.json").read_text())
        rows.append({
            "setting": plain["setting"], "seed": plain["seed"], "threshold": plain["threshold"],
            "plain_run": str(plain_dir), "secure_run": str(secure_dir),
            "test_loss_plain": plain["test_loss"], "test_loss_secure": secure["test_loss"],
            "test_loss_difference": secure["test_loss"] - plain["test_loss"],
            "client_eval_loss_mean_plain": plain["client_eval_loss_mean"],
            "client_eval_loss_mean_secure": secure["client_eval_loss_mean"],
            "clients": compare_clients(plain_dir, secure_dir),
            "globals": compare_globals(plain_dir / "global_adapter", secure_dir / "global_adapter"),
            "secure_aggregation": sidecar.get("secure_aggregation"),
            "uplink_bytes_per_round": {"plain": plain["uplink_bytes_per_round"], "secure": secure["uplink_bytes_per_round"]},
            "downlink_bytes_per_round": {"plain": plain["downlink_bytes_per_round"], "secure": secure["downlink_bytes_per_round"]},
            "run_seconds": {"plain": plain["run_seconds"], "secure": secure["run_seconds"]},
            "server_seconds": {"plain": plain["server_seconds"], "secure": secure["server_seconds"]},
            "records": {"plain": plain, "secure": secure},  # the benchmark's own records of both runs
        })
    spread = {}
    for setting in sorted({row["setting"] for row in rows}):
        of = [row for row in rows if row["setting"] == setting]
        sd = lambda key: statistics.stdev(r[key] for r in of) if len(of) > 1 else None  # noqa: E731
        spread[setting] = {
            "seeds": [r["seed"] for r in of], "test_loss_sd_plain": sd("test_loss_plain"), "test_loss_sd_secure": sd("test_loss_secure"),
            "max_abs_difference": max(abs(r["test_loss_difference"]) for r in of),
            "mean_difference": statistics.fmean(r["test_loss_difference"] for r in of),
        }
    first = results[0]
    return {
        "format": "florist-hf/quality-secure-vs-plain", "version": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": first["machine"], "base_model": first["base_model"].get("name"),
        "benchmarks": [{"date": r["date"], "command": r["command"], "extra_overrides": r["extra_overrides"],
                        "timing": r.get("timing")} for r in results],
        "pairs": rows, "seed_spread": spread, "load_average_now": list(os.getloadavg()),
    }


SETTING = {"homo": "homogeneous", "heter": "heterogeneous"}


def markdown(record: dict) -> str:
    """One line per pair, then the seed spread per setting."""
    lines = ["| setting | seed | test loss, plain | test loss, secure | secure − plain | total rank plain / secure "
             "| every module's rank equal | largest module update difference | clients identical |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in record["pairs"]:
        g, c = row["globals"], row["clients"]
        lines.append(
            f"| {SETTING.get(row['setting'], row['setting'])} | {row['seed']} | {row['test_loss_plain']:.4f} | "
            f"{row['test_loss_secure']:.4f} | {row['test_loss_difference']:+.1e} | {g['total_rank_plain']} / {g['total_rank_secure']} | "
            f"{'yes' if g['same_ranks'] else 'no'} ({g['modules'] - len(g['modules_with_other_rank'])} of {g['modules']}) | "
            f"{g['max_relative_update_difference']:.1e} | {'yes' if c['identical'] else 'no'} ({c['clients']}) |")
    for setting, s in record["seed_spread"].items():
        if s["test_loss_sd_plain"] is not None:
            lines.append(f"\n{SETTING.get(setting, setting)}: seed spread (SD of the test loss over seeds {s['seeds']}) "
                         f"{s['test_loss_sd_plain']:.4f} plain, {s['test_loss_sd_secure']:.4f} secure; largest |secure − plain| "
                         f"{s['max_abs_difference']:.1e}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.secure", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files of the quality benchmark")
    parser.add_argument("--json", type=Path, default=None, help="write the record here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here")
    args = parser.parse_args(argv)
    results = []
    for path in args.results:
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"{path}: cannot read it ({type(error).__name__}); pass a results.json of python -m benchmarks.quality")
        if not isinstance(result, dict) or result.get("format") != "florist-hf/quality-benchmark":
            raise SystemExit(f"{path}: not a results.json of python -m benchmarks.quality; pass the one in its --out folder")
        results.append(result)
    from florist_hf.errors import FloristError

    try:
        record = compare(results)
    except (FloristError, OSError) as error:
        raise SystemExit(f"{error}; the run directories results.json names must still be there (rerun the benchmark)")
    if not record["pairs"]:
        raise SystemExit(f"{', '.join(map(str, args.results))}: no florist-secure run with a plain FLoRIST run of the same "
                         "setting, seed and τ; run the benchmark with --baselines florist-secure --thresholds "
                         "0.9 (or run the plain ones into another --out and pass both results.json)")
    if args.json:
        write_json(args.json, record)
    text = markdown(record)
    if args.markdown:
        args.markdown.write_text(text)
    print(text, end="")
    return record


if __name__ == "__main__":
    main()
