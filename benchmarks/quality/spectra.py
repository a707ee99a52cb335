"""Energy spectra of the aggregated round-1 updates: how many components FLoRIST's τ keeps, per
module type, on the real model and on the pre-trained tiny base, from the runs' own sidecars.

    python -m benchmarks.quality.spectra benchmarks/quality/smollm2 [benchmarks/quality]

The first folder's results.json must point at run directories that still exist (the FLoRIST
branches of seed 0 keep each module's whole spectrum in rounds/1/global/aggregation.json); the
second, optional, is a tiny-base results.json whose recorded selected ranks are set beside it.
Writes energy_spectra.png and spectra.json into the first folder.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np

TAUS = (0.8, 0.9, 0.95, 0.99)


def module_spectra(run_dir: Path) -> dict[str, list[float]]:
    sidecar = json.loads((run_dir / "rounds" / "1" / "global" / "aggregation.json").read_text())
    return {name: info["singular_values"] for name, info in sidecar["modules"].items()}


def energy_curve(sigma: list[float]) -> np.ndarray:
    squares = np.square(np.asarray(sigma, dtype=np.float64))
    return np.cumsum(squares) / squares.sum()


def rank_at(curve: np.ndarray, tau: float) -> int:
    return int(np.searchsorted(curve, tau - 1e-12) + 1)


def summarize(results: dict) -> dict:
    """Per setting (seed 0): per module type, the rank each τ keeps (median and range over layers)
    as a count and as a share of the clients' summed rank."""
    seed = results["seeds"][0]
    out = {}
    for setting in ("homo", "heter"):
        run = next((r for r in results["runs"] if r["setting"] == setting and r["seed"] == seed and r["method"] == "florist"), None)
        if run is None or not (Path(run["run_dir"]) / "rounds" / "1" / "global" / "aggregation.json").exists():
            continue
        summed = sum(run["client_ranks"])
        by_type: dict[str, list[np.ndarray]] = {}
        for name, sigma in module_spectra(Path(run["run_dir"])).items():
            by_type.setdefault(name.rsplit(".", 1)[-1], []).append(energy_curve(sigma))
        out[setting] = {"summed_client_rank": summed, "modules": {}}
        for kind, curves in by_type.items():
            ranks = {f"{tau:g}": [rank_at(curve, tau) for curve in curves] for tau in TAUS}
            out[setting]["modules"][kind] = {
                "layers": len(curves),
                "rank_at_tau": {tau: {"median": statistics.median(r), "min": min(r), "max": max(r),
                                      "median_share": statistics.median(r) / summed} for tau, r in ranks.items()},
                "energy_median": np.median(np.stack([c[:min(map(len, curves))] for c in curves]), axis=0).tolist(),
            }
    return out


def tiny_shares(tiny_results: dict) -> dict:
    """The tiny base's recorded total selected rank per τ, as a share of modules × summed client rank."""
    out = {}
    for row in tiny_results.get("summary", []):
        if row["method"] != "florist" or row["setting"] not in ("homo", "heter"):
            continue
        run = next(r for r in tiny_results["runs"] if r["setting"] == row["setting"])
        summed = sum(run["client_ranks"])
        layers = tiny_results["base_model"]["model"]["num_hidden_layers"]
        modules = 2 * layers  # q_proj and v_proj
        out.setdefault(row["setting"], {})[f"{row['threshold']:g}"] = row["total_selected_rank"]["mean"] / (modules * summed)
    return out


def plot(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(summary), figsize=(5.5 * len(summary), 4), squeeze=False)
    for axis, (setting, info) in zip(axes[0], summary.items()):
        for kind, module in info["modules"].items():
            curve = np.asarray(module["energy_median"])
            axis.plot(np.arange(1, curve.size + 1), curve, label=f"{kind} (median of {module['layers']} layers)")
        for tau in TAUS:
            axis.axhline(tau, color="grey", lw=0.6, ls=":")
        axis.set_xscale("log")
        axis.set_xlabel(f"components kept (clients' summed rank {info['summed_client_rank']})")
        axis.set_ylabel("share of the update's energy")
        axis.set_title(f"SmolLM2-135M, round-1 FLoRIST update, {setting}")
        axis.legend(loc="lower right")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str]) -> dict:
    out = Path(argv[0])
    summary = {"real": summarize(json.loads((out / "results.json").read_text()))}
    if len(argv) > 1:
        summary["tiny_share_of_summed_rank"] = tiny_shares(json.loads((Path(argv[1]) / "results.json").read_text()))
    (out / "spectra.json").write_text(json.dumps(summary, indent=1))
    plot(summary["real"], out / "energy_spectra.png")
    for setting, info in summary["real"].items():
        for kind, module in info["modules"].items():
            ranks = ", ".join(f"τ={tau}: {r['median']:g} [{r['min']}-{r['max']}] ({100 * r['median_share']:.0f} %)"
                              for tau, r in module["rank_at_tau"].items())
            print(f"{setting} {kind}: {ranks}")
    for setting, shares in summary.get("tiny_share_of_summed_rank", {}).items():
        print(f"tiny base {setting}: " + ", ".join(f"τ={tau}: {100 * share:.0f} %" for tau, share in shares.items()))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
