"""Mean and spread over seeds, the Markdown table and the plots of the quality benchmark."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

METRICS = (
    "test_loss", "client_eval_loss_mean", "client_eval_loss_worst", "uplink_bytes_per_round", "downlink_bytes_per_round",
    "bytes_per_round", "eff_x1e4", "total_selected_rank", "published_total_rank", "server_seconds", "run_seconds",
)
SETTING_TITLES = {"homo": "homogeneous ranks", "heter": "heterogeneous ranks", "centralised": "centralised", "reference": "reference"}


def _stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values),
            "values": values}


def _order(row: dict) -> tuple:
    setting_order = {"reference": 0, "centralised": 1, "homo": 2, "heter": 3}
    method_order = {"base": 0, "fedit": 1, "flora": 2, "flexlora": 3, "ffa": 4, "fedex": 5, "fedsvd": 6, "florist": 7, "florist-secure": 7.5,
                    "florist-o": 8, "florist-e": 9}
    return (setting_order.get(row["setting"], 9), method_order.get(row["method"], 9), row.get("threshold") or 0)


def aggregate(results: dict) -> list[dict]:
    """One row per (setting, method, τ): mean, sample SD and per-seed values of every metric, the
    paired difference to FLoRA (same seed, same split) and the share of the centralised gain."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in [*results["references"], *results["runs"]]:
        run = dict(run)
        if "client_eval_loss" in run:
            run["client_eval_loss_worst"] = max(run["client_eval_loss"])
        if "uplink_bytes_per_round" in run:
            run["bytes_per_round"] = run["uplink_bytes_per_round"] + run["downlink_bytes_per_round"]
        groups[(run["setting"], run["method"], run.get("threshold"))].append(run)

    by_seed = lambda setting, method, threshold=None: {r["seed"]: r for r in groups.get((setting, method, threshold), [])}
    base, central = by_seed("reference", "base"), by_seed("centralised", "florist", 1.0)
    rows = []
    for (setting, method, threshold), runs in groups.items():
        row = {"setting": setting, "method": method, "threshold": threshold, "label": runs[0]["label"], "seeds": [r["seed"] for r in runs]}
        if any("chosen_threshold" in r for r in runs):  # FLoRIST-O / -E: the τ the sweep chose, per seed
            row["chosen_thresholds"] = [r.get("chosen_threshold") for r in runs]
            row["label"] += " (τ = " + ", ".join(f"{t:g}" for t in row["chosen_thresholds"]) + " by seed)"
        for metric in METRICS:
            if any(metric in r for r in runs):
                row[metric] = _stats([r.get(metric) for r in runs])
        row["test_perplexity"] = _stats([math.exp(r["test_loss"]) for r in runs])
        flora = by_seed(setting, "flora")
        if flora and setting in ("homo", "heter"):
            row["test_loss_minus_flora"] = _stats([r["test_loss"] - flora[r["seed"]]["test_loss"] for r in runs if r["seed"] in flora])
            row["client_loss_minus_flora"] = _stats(
                [r["client_eval_loss_mean"] - flora[r["seed"]]["client_eval_loss_mean"] for r in runs if r["seed"] in flora]
            )
        gains = [
            (base[r["seed"]]["test_loss"] - r["test_loss"]) / (base[r["seed"]]["test_loss"] - central[r["seed"]]["test_loss"])
            for r in runs
            if r["seed"] in base and r["seed"] in central and base[r["seed"]]["test_loss"] != central[r["seed"]]["test_loss"]
        ]
        row["share_of_centralised_gain"] = _stats(gains)
        rows.append(row)
    rows.sort(key=_order)
    return rows


def human_bytes(count: float | None) -> str:
    if count is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def _pm(stat: dict | None, digits: int = 3, signed: bool = False) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    sign = "+" if signed else ""
    return f"{stat['mean']:{sign}.{digits}f} ± {stat['sd']:.{digits}f}"


def table(rows: list[dict]) -> str:
    header = (
        "| setting | method | test loss | test ppl | Δ loss vs FLoRA (paired) | share of centralised gain | client-slice loss "
        "| worst client | up / round | down / round | Eff ×10⁻⁴ | total selected rank / round | server step (ms) |"
    )
    lines = [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    for row in rows:
        if row["setting"] == "centralised":  # nothing travels: no communication columns
            row = {k: v for k, v in row.items() if k not in (
                "uplink_bytes_per_round", "downlink_bytes_per_round", "eff_x1e4", "total_selected_rank", "server_seconds")}
        rank = row.get("total_selected_rank")
        server = row.get("server_seconds")
        lines.append(
            "| " + " | ".join([
                SETTING_TITLES.get(row["setting"], row["setting"]),
                row["label"],
                _pm(row.get("test_loss")),
                _pm(row.get("test_perplexity"), 1),
                _pm(row.get("test_loss_minus_flora"), 3, signed=True) if row["method"] != "flora" else "0",
                (f"{100 * row['share_of_centralised_gain']['mean']:.0f} % ± {100 * row['share_of_centralised_gain']['sd']:.0f}"
                 if row["share_of_centralised_gain"]["mean"] is not None else "–"),
                _pm(row.get("client_eval_loss_mean")),
                _pm(row.get("client_eval_loss_worst")),
                human_bytes(row.get("uplink_bytes_per_round", {}).get("mean")),
                human_bytes(row.get("downlink_bytes_per_round", {}).get("mean")),
                f"{row['eff_x1e4']['mean']:.1f}" if "eff_x1e4" in row else "–",
                (f"{rank['mean']:.0f} ± {rank['sd']:.0f}" if rank and rank["mean"] is not None else "–"),
                (f"{1000 * server['mean']:.0f} ± {1000 * server['sd']:.0f}" if server and server["mean"] is not None else "–"),
            ]) + " |"
        )
    return "\n".join(lines)


def write_markdown(results: dict, path: Path) -> Path:
    m, b, s, t = results["machine"], results["base_model"], results["split_settings"], results.get("timing", {})
    rows = results["summary"]
    runs = results["runs"]
    any_run = next((r for r in runs if r["setting"] == "homo"), runs[0] if runs else None)
    heter_ranks = next((r["client_ranks"] for r in runs if r["setting"] == "heter"), None)
    if b.get("gguf"):  # the real pretrained base and the paper's own split
        gguf = b["gguf"]
        base_note = f"dequantized from its GGUF file in {t.get('base_model_seconds', 0):.0f} s (or read from the cache)"
        base_text = (
            f"**Base model**: SmolLM2-135M-Instruct, a real pretrained model (30 layers × 576, GQA 9/3 heads, tied embeddings, "
            f"49,152-token BPE): `{gguf['gguf_file']}` from `{gguf['source']}` (sha256 {gguf['sha256'][:16]}…), dequantized "
            f"to {gguf['dtype']} by transformers {gguf['transformers']}."
        )
        data_text = (
            f"**Fine-tuning data**: the paper's own 8-client Dolly split (Dirichlet(0.5) over all eight categories) and its "
            f"80 test records (10 per category); per seed each client trains on a random sample of its paper shard, "
            f"{s['total_train']} records in all (proportional to the shard sizes, ≥ {s['min_client_train']}), and "
            f"{s['client_eval']} further records of its shard are its held-out slice. Chat template, loss on the answer only. "
            f"Seeds {', '.join(map(str, results['seeds']))} (each seed: its own sample, LoRA init and client seeds)."
        )
    else:
        base_note = "from the cache" if t.get("base_model_cached") else f"pre-trained in {b['seconds'] / 60:.1f} min"
        base_text = (
            f"**Base model**: Llama {b['model']['num_hidden_layers']}×{b['model']['hidden_size']}, {b['parameters'] / 1e6:.2f}M parameters, "
            f"{b['vocab_size']}-token byte-level BPE trained here; pre-trained on {b['train_records']} Dolly records of "
            f"{', '.join(b['categories'])} ({b['tokens_seen'] / 1e6:.2f}M tokens, {b['epochs']:.2f} epochs): held-out loss "
            f"{b['validation_loss_init']:.3f} → {b['validation_loss_final']:.3f}."
        )
        data_text = (
            f"**Fine-tuning data**: Dolly {', '.join(results['finetune_categories'])} (never seen in pre-training); per seed, "
            f"{s['test_per_category']} test records per category, Dirichlet({s['alpha']}) over category to {s['num_clients']} "
            f"clients, {s['total_train']} training records in all (client sizes proportional to the Dirichlet shards, "
            f"≥ {s['min_client_train']}), {s['client_eval']} further records of each client's own shard as its held-out slice. "
            f"Seeds {', '.join(map(str, results['seeds']))} (each seed: its own split, LoRA init and client seeds)."
        )
    text = [
        "# Quality benchmark results",
        "",
        f"Measured {results['date']} on {m['cpu']}, {m['cores']} cores ({t.get('workers', 1)} run worker process(es) × "
        f"{t.get('torch_threads_per_worker', m['torch_threads'])} torch thread(s)), "
        f"{m['memory_gib']} GiB; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}. "
        f"Command: `{results['command']}`; wall time {t.get('total_seconds', 0) / 60:.1f} min "
        f"(base model {base_note}, "
        f"{t.get('runs', len(runs))} federated/centralised runs in {t.get('federated_seconds', 0) / 60:.1f} min; "
        f"load average {', '.join(f'{x:.1f}' for x in t.get('load_average_start', []))} at start, "
        f"{', '.join(f'{x:.1f}' for x in t.get('load_average_end', []))} at end — the machine was shared).",
        "",
        base_text,
        "",
        data_text,
        "",
    ]
    if any_run:
        text += [
            f"**Federation**: LoRA on q_proj, v_proj; homogeneous r = {any_run['client_ranks'][0]}"
            + (f", heterogeneous r = {heter_ranks}" if heter_ranks else "")
            + f", α = 2r; {any_run['rounds']} round(s) of {any_run.get('local_epochs', '?')} local epoch(s); recipe overrides: `{' '.join(results['extra_overrides']) or 'none'}`. "
            "Centralised LoRA: one client holding the union of the clients' training records, same rank as homogeneous, "
            "same example passes (rounds × local epochs as one run).",
            "",
        ]
    text += [
        "Columns: test loss = mean token loss of the final global model on the test split (the runner's held-out loss), "
        "mean ± SD over seeds; Δ vs FLoRA = per-seed difference to FLoRA in the same setting (same split, same seed), "
        "mean ± SD; share of centralised gain = (base − method) / (base − centralised) test loss; client-slice loss = "
        "mean over clients of the final global adapter's loss on each client's own held-out records; worst client = the "
        "largest of those; bytes per round summed over clients (fp32 on the wire); total selected rank = Σ over modules of "
        "the global adapter's rank broadcast per round; server step = the aggregation's wall time per round.",
        "",
        table(rows),
        "",
    ]
    if results.get("share_first_round"):
        text += [
            "FLoRA and every FLoRIST τ of a setting and seed run as one `florist-hf sweep` (`--baselines flora`): round 1's "
            "clients are trained once and every branch aggregates those same adapters; FlexLoRA reuses FedIT's round-1 "
            "client adapters through the runner's resume path. Their round-1 client training is identical by construction "
            "(same base, same init, same seeds), so within a seed the methods differ only in what the server does.",
            "",
        ]
    if any(run["method"] == "florist-secure" for run in runs):
        text += [
            "FLoRIST with secure aggregation (`florist-secure`): `florist-hf run` with `federation.secure_aggregation` on "
            "(SecAgg+: the server learns only the two sums of the clients' masked sketches, FLoRIST's update from them); its "
            "clients train their own round 1 through the protocol (no reuse), so beside plain FLoRIST at the same τ and seed "
            "the two differ only in the server step (`python -m benchmarks.quality.secure` checks that their clients are "
            "equal and compares every module's rank and update).",
            "",
        ]
    tolerances = {run.get("sweep_tolerance") for run in results["runs"] if "chosen_threshold" in run}
    if tolerances:
        text += [
            "FLoRIST-O and FLoRIST-E are the sweep's choices per seed, by the test loss: O the τ with the lowest, E the "
            "τ with the least downlink among those within "
            + ", ".join(f"{t:g}" for t in sorted(tolerances))
            + " (nats, absolute) of O's loss; the τ chosen for each seed is in the row's label. Selecting on the test "
            "split is how the paper reports both variants; the per-τ rows above show the whole curve.",
            "",
        ]
    path.write_text("\n".join(text))
    return path


COLORS = {"fedit": "tab:orange", "flora": "tab:green", "flexlora": "tab:purple", "ffa": "tab:brown", "fedex": "tab:olive",
          "fedsvd": "tab:pink", "florist": "tab:blue", "florist-secure": "navy", "florist-o": "tab:red", "florist-e": "tab:cyan",
          "centralised": "black", "base": "gray"}
MARKERS = {"fedit": "s", "flora": "D", "flexlora": "^", "ffa": "v", "fedex": "<", "fedsvd": ">", "florist": "o", "florist-secure": "X", "florist-o": "*",
           "florist-e": "P"}


def _runs_by_key(results: dict) -> dict[tuple, dict[int, dict]]:
    runs: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for run in [*results["references"], *results["runs"]]:
        runs[(run["setting"], run["method"], run.get("threshold"))][run["seed"]] = run
    return runs


def reference_key(results: dict, setting: str) -> tuple:
    """What the plots subtract: FLoRA (exact aggregation) of ``setting``, else its first method."""
    keys = [key for key in _runs_by_key(results) if key[0] == setting]
    return (setting, "flora", None) if (setting, "flora", None) in keys else sorted(keys, key=str)[0]


def paired_delta(results: dict, key: tuple, setting: str, metric) -> dict:
    """``metric(run) - metric(reference run)`` per seed (the reference of ``setting``, same seed): mean and SD."""
    runs = _runs_by_key(results)
    flora = runs.get(reference_key(results, setting), {})
    return _stats([metric(run) - metric(flora[seed]) for seed, run in runs.get(key, {}).items() if seed in flora])


def _key(row: dict) -> tuple:
    return (row["setting"], row["method"], row.get("threshold"))


def write_plots(results: dict, out_dir: Path) -> list[Path]:
    """quality_vs_bytes.png, rank_vs_tau.png, client_losses.png. Losses are plotted as the paired
    difference to FLoRA of the same seed: the seeds' splits differ in difficulty by more than the
    methods differ, and pairing removes that shared part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["summary"]
    settings = [s for s in ("homo", "heter") if any(r["setting"] == s for r in rows)]
    reference_label = {
        setting: next(r["label"] for r in rows if _key(r) == reference_key(results, setting)) for setting in settings
    }
    references = [r for r in rows if r["setting"] in ("reference", "centralised")]
    test = lambda run: run["test_loss"]
    paths = []

    # 1. Quality vs communication (the paper's trade-off picture).
    fig, axes = plt.subplots(1, len(settings), figsize=(6.4 * len(settings), 5.4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        setting_rows = [r for r in rows if r["setting"] == setting]
        florist = sorted((r for r in setting_rows if r["method"] == "florist"), key=lambda r: r["threshold"])
        points = {}
        for row in setting_rows:
            delta = paired_delta(results, _key(row), setting, test)
            x = row["bytes_per_round"]["mean"]
            points[_key(row)] = (x, delta["mean"])
            ax.errorbar(x, delta["mean"], yerr=delta["sd"], fmt=MARKERS[row["method"]], color=COLORS[row["method"]],
                        ms=8 if row["method"] != "florist" else 6, mfc="none" if row["method"] in ("flexlora", "fedit") else None,
                        mew=1.6, capsize=3, label=row["label"] if row["method"] != "florist" else None, zorder=3)
            if row["method"] == "florist":
                ax.annotate(f"τ={row['threshold']:g}", (x, delta["mean"]), textcoords="offset points", xytext=(4, 6), fontsize=8,
                            color=COLORS["florist"])
        if florist:
            ax.plot([points[_key(r)][0] for r in florist], [points[_key(r)][1] for r in florist], "-",
                    color=COLORS["florist"], label="FLoRIST (τ sweep)", zorder=2)
        for row in references:
            delta = paired_delta(results, _key(row), setting, test)
            if delta["mean"] is not None:
                ax.axhline(delta["mean"], ls=":" if row["setting"] == "centralised" else "--", color=COLORS.get(row["method"] if row["setting"] != "centralised" else "centralised"),
                           label=f"{row['label']}: {delta['mean']:+.3f}")
        ax.axhline(0, color=COLORS[reference_key(results, setting)[1]], lw=0.8, alpha=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("bytes per round, uplink + downlink, all clients (log scale)")
        ax.set_ylabel(f"test loss − {reference_label[setting]}'s, same seed (mean ± SD)")
        ax.set_title(f"Dolly, {SETTING_TITLES[setting]}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    fig.suptitle("Quality vs communication: lower-left is better (reference method = 0; dashed: base, dotted: centralised LoRA)",
                 fontsize=11)
    fig.tight_layout()
    paths.append(out_dir / "quality_vs_bytes.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # 2. Selected rank vs τ.
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for setting, color in zip(settings, ("tab:blue", "tab:red")):
        florist = sorted((r for r in rows if r["setting"] == setting and r["method"] == "florist"), key=lambda r: r["threshold"])
        if florist:
            ax.errorbar([r["threshold"] for r in florist], [r["total_selected_rank"]["mean"] for r in florist],
                        yerr=[r["total_selected_rank"]["sd"] for r in florist], fmt="o-", color=color, capsize=3,
                        label=f"FLoRIST, {SETTING_TITLES[setting]}")
        for method, style in (("flora", "--"), ("fedit", ":")):
            row = next((r for r in rows if r["setting"] == setting and r["method"] == method), None)
            if row:
                ax.axhline(row["total_selected_rank"]["mean"], ls=style, color=color, alpha=0.7,
                           label=f"{row['label']} ({SETTING_TITLES[setting]}): {row['total_selected_rank']['mean']:.0f}")
    ax.set_yscale("log")
    ax.set_xlabel("energy threshold τ")
    ax.set_ylabel("total rank broadcast per round (Σ over modules, log)")
    ax.set_title("FLoRIST: selected rank vs τ (mean ± SD over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7.5)
    fig.tight_layout()
    paths.append(out_dir / "rank_vs_tau.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # 3. Per-client distributions: the global model on every client's own held-out records.
    fig, axes = plt.subplots(1, len(settings), figsize=(6.4 * len(settings), 4.6), squeeze=False)
    metrics = (("mean over clients", lambda run: statistics.fmean(run["client_eval_loss"]), 1.0),
               ("worst client", lambda run: max(run["client_eval_loss"]), 0.45))
    for ax, setting in zip(axes[0], settings):
        labelled = [r for r in rows if r["setting"] == setting] + references
        names = [r["label"].replace("FLoRIST ", "FLoRIST\n").replace(" (no fine-tuning)", "").replace("centralised LoRA", "centralised")
                 for r in labelled]
        colors = [COLORS["centralised"] if r["setting"] == "centralised" else COLORS.get(r["method"], "gray") for r in labelled]
        for offset, (name, metric, alpha) in zip((-0.2, 0.2), metrics):
            deltas = [paired_delta(results, _key(r), setting, metric) for r in labelled]
            ax.bar([x + offset for x in range(len(labelled))], [d["mean"] for d in deltas], width=0.4, alpha=alpha,
                   yerr=[d["sd"] for d in deltas], capsize=2, color=colors, label=name)
        ax.axhline(0, color=COLORS[reference_key(results, setting)[1]], lw=0.8)
        ax.set_xticks(list(range(len(labelled))), names, fontsize=7, rotation=45, ha="right")
        ax.set_ylabel(f"client loss − {reference_label[setting]}'s, same seed")
        ax.set_title(f"Clients' own distributions, {SETTING_TITLES[setting]}")
        ax.grid(alpha=0.3, axis="y")
        handles = [plt.Rectangle((0, 0), 1, 1, color="dimgray", alpha=a) for _, _, a in metrics]
        ax.legend(handles, [n for n, _, _ in metrics], fontsize=8, loc="upper left")
    fig.tight_layout()
    paths.append(out_dir / "client_losses.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
