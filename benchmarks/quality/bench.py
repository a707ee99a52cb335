"""The benchmark grid: base model, data splits, every run, the references; results.json/.md and plots."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import time
from pathlib import Path

from benchmarks.measure import write_json
from benchmarks.quality import config


def split_key(split_settings: dict) -> str:
    payload = {**split_settings, "categories": config.FINETUNE_CATEGORIES, "v": 1}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]


def grid(seeds, settings, baselines, thresholds, centralised: bool = True, recipe_set: str = "tiny"):
    """Every run, seed-major so that a partial result already covers whole seeds."""
    import functools

    from benchmarks.quality.runner import SECURE_FLORIST, RunSpec

    RunSpec = functools.partial(RunSpec, recipe_set=recipe_set)  # noqa: N806 - the class, bound to one base
    specs = []
    for seed in seeds:
        for setting in settings:
            # FLoRA first: the FLoRIST runs reuse its round-1 client training; FedIT before FlexLoRA.
            order = [m for m in ("flora", "fedit", "flexlora", "ffa", "fedex", "fedsvd") if m in baselines]
            specs += [RunSpec(setting, method, seed) for method in order if method in ("flora", "fedit")]
            specs += [RunSpec(setting, "florist", seed, tau) for tau in thresholds]
            specs += [RunSpec(setting, method, seed) for method in order if method not in ("flora", "fedit")]
            if SECURE_FLORIST in baselines:  # after plain FLoRIST: its own clients, trained and masked through SecAgg+
                specs.append(RunSpec(setting, SECURE_FLORIST, seed, config.SECURE_THRESHOLD))
        if centralised:
            specs.append(RunSpec("centralised", "florist", seed, 1.0))
    return specs


def run_groups(specs) -> list[list]:
    """Runs that must share a process (a round-1 donor and its users): one setting and seed each."""
    groups: dict[tuple, list] = {}
    for spec in specs:
        groups.setdefault((spec.setting, spec.seed), []).append(spec)
    return sorted(groups.values(), key=len, reverse=True)  # longest first: better packing on workers


def run_group(specs, *, base_dir: Path, split_dir: Path, runs_root: Path, extra_overrides, share_first_round: bool,
              total: int) -> list[dict]:
    """Run one group of specs in order (in this process); returns their records."""
    from benchmarks.quality.data import load_client_eval
    from benchmarks.quality.runner import run_one

    client_records = load_client_eval(split_dir)
    done: dict[str, Path] = {}
    records = []
    # FLoRA and the FLoRIST τ grid go through `florist-hf sweep` (round 1 trained once, FLoRIST-O and
    # FLoRIST-E chosen by it) unless round-1 sharing is off; the other baselines run one by one.
    swept = [spec for spec in specs if spec.setting != "centralised" and spec.method in ("flora", "florist")]
    if not share_first_round or not any(spec.method == "florist" for spec in swept):
        swept = []
    for spec in specs:
        if spec in swept and spec is not swept[0]:
            continue
        tic = time.perf_counter()
        if spec in swept:
            from benchmarks.quality.runner import run_sweep_group

            new = run_sweep_group(swept, base_dir=base_dir, split_dir=split_dir, runs_root=runs_root,
                                  client_records=client_records, tolerance=config.SWEEP_TOLERANCE,
                                  extra_overrides=extra_overrides)
            for record in new:
                done[record["name"]] = Path(record["run_dir"])
        else:
            new = [run_one(
                spec, base_dir=base_dir, split_dir=split_dir, runs_root=runs_root, client_records=client_records, done=done,
                share_first_round=share_first_round, extra_overrides=extra_overrides,
            )]
            new[0]["name"] = spec.name
        for record in new:
            record["wall_seconds"] = (time.perf_counter() - tic) / len(new)
            records.append(record)
            chosen = f" (τ = {record['chosen_threshold']:g})" if "chosen_threshold" in record else ""
            print(
                f"  {record['setting']:<11} {record['label'] + chosen:<17} seed {record['seed']}: test loss {record['test_loss']:.4f}, "
                f"client-slice loss {record['client_eval_loss_mean']:.4f}, total rank {record['total_selected_rank']:g}, "
                f"{record['wall_seconds']:.1f} s{' (round 1 reused)' if record['first_round_from'] else ''}",
                flush=True,
            )
    return records


def _worker_init(threads: int) -> None:
    import gc

    import torch

    from florist_hf.cli import quiet_libraries

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    quiet_libraries()
    gc.freeze()  # the runner calls gc.collect() per client; frozen start-up objects make that cheap


def _map_groups(jobs: list[dict], workers: int, threads: int | None):
    """Yield each group's records as it finishes: in this process, or in ``workers`` processes."""
    import gc

    if workers <= 1 or len(jobs) <= 1:
        gc.freeze()
        try:
            for job in jobs:
                yield run_group(**job)
        finally:
            gc.unfreeze()
        return
    import concurrent.futures
    import multiprocessing

    per_worker = threads or max(1, (os.cpu_count() or 1) // workers)
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init, initargs=(per_worker,)
    ) as pool:
        futures = [pool.submit(run_group, **job) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()


def machine() -> dict:
    import peft
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "platform": platform.platform(),
    }


def run_benchmark(
    *,
    out_dir: Path = config.HERE,
    cache: Path = config.CACHE,
    seeds=config.SEEDS,
    settings=config.SETTINGS,
    baselines=config.BASELINES,
    thresholds=config.THRESHOLDS,
    centralised: bool = True,
    model_settings: dict | None = None,
    pretrain_settings: dict | None = None,
    vocab_size: int = config.VOCAB_SIZE,
    split_settings: dict | None = None,
    extra_overrides: tuple[str, ...] = (),
    share_first_round: bool = True,
    plots: bool = True,
    workers: int = 2,
    threads: int | None = None,
    base: str = "tiny",
    log=print,
) -> dict:
    """Run the whole benchmark; returns (and writes) the results."""
    import torch

    from florist_hf.cli import quiet_libraries

    quiet_libraries()
    # Pre-training (and in-process runs) use every core unless told otherwise; workers get cores / workers each.
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        return _run_benchmark(
            out_dir=out_dir, cache=cache, seeds=seeds, settings=settings, baselines=baselines, thresholds=thresholds,
            centralised=centralised, model_settings=model_settings, pretrain_settings=pretrain_settings, vocab_size=vocab_size,
            split_settings=split_settings, extra_overrides=extra_overrides, share_first_round=share_first_round, plots=plots,
            workers=workers, threads=threads, base=base, log=log,
        )
    finally:
        torch.set_num_threads(caller_threads)


def _run_benchmark(*, out_dir, cache, seeds, settings, baselines, thresholds, centralised, model_settings, pretrain_settings,
                   vocab_size, split_settings, extra_overrides, share_first_round, plots, workers, threads, base, log) -> dict:
    from benchmarks.quality.base import ensure_base
    from benchmarks.quality.data import build_split, load_client_eval
    from benchmarks.quality.report import aggregate, write_markdown, write_plots
    from benchmarks.quality.runner import client_losses
    from florist_hf.recipe import load_recipe

    started = time.perf_counter()
    load_start = os.getloadavg()
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    real = base != "tiny"
    if real:  # the real model: dequantized once from its GGUF file, the paper's own split sampled
        from benchmarks.quality.data import build_paper_split
        from florist_hf.loading import gguf_provenance, resolve_base

        base_dir = Path(resolve_base(config.REAL_BASE, config.REAL_GGUF))
        pretrain_summary = {"gguf": gguf_provenance(base_dir, source=config.REAL_BASE, gguf_file=config.REAL_GGUF)}
        extra_overrides = (*config.REAL_OVERRIDES, *extra_overrides)
        split_settings = {"total_train": config.REAL_TOTAL_TRAIN, "min_client_train": config.REAL_MIN_CLIENT_TRAIN,
                          "client_eval": config.REAL_CLIENT_EVAL, **(split_settings or {})}
        make_split = lambda split_dir, seed: build_paper_split(split_dir, seed, **split_settings)  # noqa: E731
        num_clients = config.NUM_CLIENTS
    else:
        base_dir, pretrain_summary = ensure_base(cache, vocab_size=vocab_size, model_settings=model_settings, settings=pretrain_settings, log=log)
        split_settings = {
            "num_clients": config.NUM_CLIENTS, "alpha": config.DIRICHLET_ALPHA, "test_per_category": config.TEST_PER_CATEGORY,
            "total_train": config.TOTAL_TRAIN_RECORDS, "min_client_train": config.MIN_CLIENT_TRAIN,
            "client_eval": config.CLIENT_EVAL_RECORDS, **(split_settings or {}),
        }
        make_split = lambda split_dir, seed: build_split(split_dir, seed, **split_settings)  # noqa: E731
        num_clients = split_settings["num_clients"]
    pretrain_seconds = time.perf_counter() - started
    runs_root = cache / ("runs" if not real else f"runs-{base}")
    results_file = out_dir / "results.json"
    specs = grid(seeds, settings, baselines, thresholds, centralised, recipe_set=base)
    results: dict = {
        "format": "florist-hf/quality-benchmark", "version": 1, "date": date, "machine": machine(),
        "command": "python -m benchmarks.quality" + (f" --base {base}" if real else ""),
        "base_model": {"path": str(base_dir), "name": base, **pretrain_summary},
        "finetune_categories": list(config.FINETUNE_CATEGORIES), "split_settings": split_settings,
        "seeds": list(seeds), "share_first_round": share_first_round, "extra_overrides": list(extra_overrides),
        "splits": {}, "references": [], "runs": [],
    }

    # Data and the lower reference (the untouched base) per seed.
    splits, client_eval = {}, {}
    for seed in seeds:
        split_dir = cache / "data" / f"seed_{seed}-{split_key({**split_settings, 'base': base})}"
        results["splits"][str(seed)] = make_split(split_dir, seed)
        splits[seed], client_eval[seed] = split_dir, load_client_eval(split_dir)
        recipe = load_recipe(config.RECIPE_SETS[base]["homo"], [f"model.name_or_path={base_dir}", "model.gguf_file=null",
                                                                f"data.source={split_dir}", *extra_overrides])
        from benchmarks.quality.runner import test_loss
        from florist_hf.data import load_flora_layout

        _, test_records = load_flora_layout(split_dir, num_clients)
        tic = time.perf_counter()
        base_test = test_loss(base_dir, recipe, test_records, cache / "eval_work")
        base_clients = client_losses(base_dir, None, recipe, client_eval[seed], cache / "eval_work")
        results["references"].append({
            "setting": "reference", "method": "base", "label": "base model (no fine-tuning)", "seed": seed,
            "test_loss": base_test, "client_eval_loss": base_clients,
            "client_eval_loss_mean": sum(base_clients) / len(base_clients), "eval_seconds": time.perf_counter() - tic,
        })
        log(f"seed {seed}: split {results['splits'][str(seed)]['client_train_sizes']} train records per client, "
            f"{results['splits'][str(seed)]['test_records']} test; base test loss {base_test:.4f}")

    # Every run, in groups that share round-1 donors (one setting and seed); with several workers,
    # groups run in parallel processes of one torch thread each.
    groups = run_groups(specs)
    order = {spec.name: index for index, spec in enumerate(specs)}
    federated_started = time.perf_counter()
    jobs = [
        dict(specs=group, base_dir=base_dir, split_dir=splits[group[0].seed], runs_root=runs_root,
             extra_overrides=extra_overrides, share_first_round=share_first_round, total=len(specs))
        for group in groups
    ]
    finished = 0
    for group_records in _map_groups(jobs, workers, threads):
        finished += sum(1 for record in group_records if "chosen_threshold" not in record)  # grid cells, not O/E
        # FLoRIST-O and FLoRIST-E (not grid cells) come after their setting's last FLoRIST τ.
        results["runs"] = sorted([*results["runs"], *group_records], key=lambda r: order.get(r["name"], (
            max((order[n] for n in order if n.startswith(f"{r['setting']}/florist") and n.endswith(f"seed_{r['seed']}")), default=0)
            + 0.5)))
        elapsed = time.perf_counter() - federated_started
        log(f"--- {finished}/{len(specs)} runs done; elapsed {elapsed / 60:.1f} min, "
            f"about {elapsed / finished * (len(specs) - finished) / 60:.1f} min left")
        write_json(results_file, results)  # partial results survive an interruption

    results["timing"] = {
        "workers": workers, "torch_threads_per_worker": threads or max(1, (os.cpu_count() or 1) // max(1, workers)),
        "total_seconds": time.perf_counter() - started, "base_model_seconds": pretrain_seconds,
        "base_model_cached": pretrain_summary.get("cached", False),
        "federated_seconds": time.perf_counter() - federated_started, "runs": len(specs),
        "load_average_start": list(load_start), "load_average_end": list(os.getloadavg()),
    }
    results["summary"] = aggregate(results)
    write_json(results_file, results)
    write_markdown(results, out_dir / "results.md")
    if plots:
        write_plots(results, out_dir)
    log(f"wrote {results_file}, {out_dir / 'results.md'}" + (" and plots" if plots else "")
        + f" in {results['timing']['total_seconds'] / 60:.1f} min")
    return results


def rewrite_report(out_dir: Path) -> dict:
    """Re-read every run's numbers from its run directory (when still there) and rewrite the outputs."""
    from benchmarks.quality.report import aggregate, write_markdown, write_plots
    from benchmarks.quality.runner import summarize_metrics

    results = json.loads((out_dir / "results.json").read_text())
    for run in results["runs"]:
        if (Path(run["run_dir"]) / "run.json").exists():
            run.update(summarize_metrics(Path(run["run_dir"])))
    results["summary"] = aggregate(results)
    write_json(out_dir / "results.json", results)
    write_markdown(results, out_dir / "results.md")
    write_plots(results, out_dir)
    return results


SMOKE = dict(
    seeds=(0,), settings=("homo",), baselines=("flora", "florist-secure"), thresholds=(0.9,),
    model_settings=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True),
    pretrain_settings=dict(seq_len=64, batch_size=4, steps=3, learning_rate=2e-3, warmup_steps=1, min_lr_ratio=0.1,
                           weight_decay=0.0, validation_records=8, seed=0, max_records=300),
    vocab_size=512,
    split_settings=dict(num_clients=2, test_per_category=2, total_train=16, min_client_train=4, client_eval=4),
    workers=1,
    threads=1,
    extra_overrides=("federation.num_clients=2", "lora.ranks=2", "federation.rounds=1", "training.max_steps=2", "data.cutoff_len=96"),
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__)
    parser.add_argument("--seeds", default=",".join(map(str, config.SEEDS)), help="comma-separated seeds (default %(default)s)")
    parser.add_argument("--thresholds", default=",".join(f"{t:g}" for t in config.THRESHOLDS), help="FLoRIST τ values")
    parser.add_argument("--baselines", default=",".join(config.BASELINES),
                        help="baseline methods (default %(default)s); also fedex, fedsvd, and florist-secure: FLoRIST "
                             f"τ = {config.SECURE_THRESHOLD:g} under federation.secure_aggregation")
    parser.add_argument("--settings", default=",".join(config.SETTINGS), help="homo,heter")
    parser.add_argument("--no-centralised", action="store_true", help="skip the centralised LoRA reference")
    parser.add_argument("--out", type=Path, default=None,
                        help="where results.json, results.md and plots go (default: benchmarks/quality/, or "
                             "benchmarks/quality/<base>/ for a real base)")
    parser.add_argument("--cache", type=Path, default=config.CACHE, help="base model, splits and run directories")
    parser.add_argument("--no-share-first-round", action="store_true",
                        help="train round 1 of every run from scratch instead of reusing an identical one")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override for every run")
    parser.add_argument("--workers", type=int, default=2,
                        help="parallel run processes, one torch thread each by default (default %(default)s: 2 cores)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite results.md and the plots from OUT/results.json (and the run directories) without running")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long version: tiny model, one seed, two methods")
    parser.add_argument("--base", choices=sorted(config.RECIPE_SETS), default="tiny",
                        help="tiny: the 4M Llama pre-trained here (default); smollm2: the real SmolLM2-135M-Instruct "
                             "from its GGUF file, on the paper's own Dolly split, through the shipped smollm2 recipes")
    parser.add_argument("--mmlu", action="store_true",
                        help="also MMLU by log-likelihood on the 1,444-question subset for the first seed's base and every "
                             "method of the last setting, into OUT/mmlu.json (python -m benchmarks.quality.mmlu for more)")
    parser.add_argument("--mmlu-sample", type=int, default=None, help="a seeded random sample of N MMLU questions (default all 1,444)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.out is None:
        args.out = config.HERE if args.base == "tiny" else config.HERE / args.base
    if args.report_only:
        return rewrite_report(args.out)
    if not config.SHARED_DOLLY.is_dir():  # every base trains on (the tiny base also pre-trains on) the real Dolly split
        raise SystemExit(f"python -m benchmarks.quality: the paper's Dolly split is not at {config.SHARED_DOLLY}; set "
                         "FLORIST_HF_SHARED_DATA to the folder holding dolly/8/ (and mmlu/) and rerun")
    numbers = lambda text, kind: tuple(kind(part) for part in text.split(",") if part.strip())
    options = dict(
        seeds=numbers(args.seeds, int), settings=numbers(args.settings, str), baselines=numbers(args.baselines, str),
        thresholds=numbers(args.thresholds, float),
    )
    if args.smoke:
        if args.base != "tiny":
            parser.error("--smoke is the tiny base's seconds-long version; for a quick real-model run pass "
                         "--seeds 0 --settings heter --thresholds 0.9 --baselines flora --set training.max_steps=1")
        options = {key: value for key, value in SMOKE.items()}
    options.setdefault("workers", args.workers)
    options.setdefault("threads", args.threads)
    options["extra_overrides"] = tuple(options.get("extra_overrides", ())) + tuple(args.overrides)
    results = run_benchmark(
        out_dir=args.out, cache=args.cache, centralised=not args.no_centralised,
        share_first_round=not args.no_share_first_round, base=args.base, **options,
    )
    if args.mmlu:
        from benchmarks.quality.mmlu import main as mmlu_main

        mmlu_main([str(args.out), *(["--sample", str(args.mmlu_sample)] if args.mmlu_sample else [])])
    return results
