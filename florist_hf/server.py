"""The server: one aggregation step (client adapters on disk -> global adapter on disk) and the round loop."""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from florist_hf.adapters import (
    SIDECAR,
    LoraAdapter,
    client_weights,
    read_adapter,
    read_client_adapters,
    save_adapter_files,
    widest_dtype,
)
from florist_hf.aggregation import (
    AggregationMethod,
    AggregationResult,
    CommunicationReport,
    SharedAMismatch,
    energy,
    get_method,
    round_communication,
    sum_of_updates,
)
from florist_hf.errors import FloristError
from florist_hf.io_utils import append_jsonl, atomic_directory, write_json_atomic
from florist_hf.tiny import TINY_LLAMA_ID, build_tiny_llama

SIDECAR_FORMAT = "florist-hf/aggregation"
#: FlexLoRA writes each client's own truncation here, inside the global adapter directory.
CLIENT_ADAPTERS_DIR = "clients"


@dataclass
class ServerStep:
    """What one aggregation produced, for printing, the round log and the next round's clients."""

    out_dir: Path
    adapters: list[LoraAdapter]
    result: AggregationResult
    communication: CommunicationReport
    sidecar: dict

    @property
    def rank_summary(self) -> dict:
        return rank_summary(self.result.selected_ranks.values())


def rank_summary(ranks) -> dict:
    """Min, median, max and total of the per-module selected ranks."""
    ranks = list(ranks)
    return {"min": min(ranks), "median": statistics.median(ranks), "max": max(ranks), "total": sum(ranks)}


def _client_rank(adapter: LoraAdapter) -> int | dict[str, int]:
    ranks = {name: module.rank for name, module in adapter.modules.items()}
    return next(iter(ranks.values())) if len(set(ranks.values())) == 1 else ranks


def build_sidecar(
    method: AggregationMethod,
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float],
    result: AggregationResult,
    communication: CommunicationReport,
    client_names: Sequence[str] | None = None,
    server_seconds: float | None = None,
) -> dict:
    """The JSON record written beside a global adapter: how it was made and what it cost."""
    modules = {}
    for name, module in result.modules.items():
        sigma = module.singular_values
        modules[name] = {
            "shape": list(adapters[0].modules[name].shape),
            "selected_rank": module.selected_rank,
            "singular_values": None if sigma is None else [float(s) for s in sigma],
            "energy_kept": None if sigma is None else float(energy(sigma)[min(module.selected_rank, sigma.numel()) - 1]),
        }
    return {
        "format": SIDECAR_FORMAT,
        "version": 1,
        "method": method.name,
        "threshold": method.options().get("threshold"),
        "options": method.options(),
        "clients": [
            {"name": name, "path": str(adapter.path), "num_samples": adapter.num_samples, "weight": weight, "rank": adapter.rank}
            for adapter, weight, name in zip(adapters, result.client_weights, client_names or [None] * len(adapters))
        ],
        "server_seconds": server_seconds,  # reading the client adapters and aggregating them (not writing)
        "raw_weights": list(weights),
        "modules": modules,
        "total_rank": sum(result.selected_ranks.values()),
        "communication": communication.to_dict(),
    }


def aggregate_adapters(
    client_dirs: Sequence[str | os.PathLike],
    method: AggregationMethod,
    out_dir: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    client_names: Sequence[str] | None = None,
) -> ServerStep:
    """Read client adapters, aggregate them, and write the global PEFT adapter + sidecar atomically.

    Every input problem raises FloristError before anything is written to ``out_dir``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FloristError(f"{out_dir}: already exists; choose another --out or pass --force to replace it")
    started = time.perf_counter()
    adapters = read_client_adapters(client_dirs)
    raw_weights = client_weights(adapters, weights)
    wire_dtype = dtype or widest_dtype(adapter.dtype for adapter in adapters)
    try:
        # Results in the wire dtype module by module: fp64 copies of every module would double the peak.
        result = method.aggregate([adapter.modules for adapter in adapters], raw_weights, result_dtype=wire_dtype)
    except SharedAMismatch as error:
        raise FloristError(f"{adapters[error.client_index].path}: {error}") from None
    communication = round_communication(
        method,
        adapters[0].module_shapes,
        [_client_rank(adapter) for adapter in adapters],
        result.selected_ranks,
        bytes_per_param=torch.finfo(wire_dtype).bits // 8,
    )
    names = list(client_names) if client_names else [f"client_{index}" for index in range(len(adapters))]
    sidecar = build_sidecar(method, adapters, raw_weights, result, communication, names, time.perf_counter() - started)
    template = adapters[0].config
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        global_factors = {name: (m.lora_b, m.lora_a) for name, m in result.modules.items()}
        save_adapter_files(staging, global_factors, config_template=template, dtype=wire_dtype, sidecar=sidecar)
        if any(m.client_factors is not None for m in result.modules.values()):
            for index, (adapter, client_name) in enumerate(zip(adapters, names)):
                client_factors = {name: m.client_factors[index] for name, m in result.modules.items()}
                save_adapter_files(
                    staging / CLIENT_ADAPTERS_DIR / client_name,
                    client_factors,
                    config_template=template,
                    dtype=wire_dtype,
                    client_info={"source": str(adapter.path)},
                )
    return ServerStep(out_dir, adapters, result, communication, sidecar)


# --- the federation: rounds of client training and aggregation, resumable ------------------------

RUN_FORMAT = "florist-hf/run"
RECIPE_RECORD = "recipe.json"
METRICS_FILE = "metrics.jsonl"
RUN_SUMMARY = "run.json"
GLOBAL_ADAPTER = "global_adapter"
BASE_MODEL_DIR = "base_model"


@dataclass
class RunPaths:
    """Where a run keeps its state; every file here is written atomically."""

    root: Path

    def round_dir(self, round_index: int) -> Path:
        return self.root / "rounds" / str(round_index)

    def global_dir(self, round_index: int) -> Path:
        return self.round_dir(round_index) / "global"

    def client_dir(self, round_index: int, client_id: int) -> Path:
        return self.round_dir(round_index) / "clients" / f"client_{client_id}"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE


def _retire(path: Path, new_path: Path) -> None:

    shutil.rmtree(new_path, ignore_errors=True)
    os.replace(path, new_path)


def sample_clients(num_clients: int, clients_per_round: int | float | None, seed: int, round_index: int) -> list[int]:
    """The clients of one round: all (None), a count (int) or a fraction (float), reproducibly drawn."""

    if clients_per_round is None:
        count = num_clients
    elif isinstance(clients_per_round, int):
        count = min(clients_per_round, num_clients)
    else:
        count = max(1, min(num_clients, round(clients_per_round * num_clients)))
    if count == num_clients:
        return list(range(num_clients))
    return sorted(random.Random(seed * 1_000_003 + round_index).sample(range(num_clients), count))


def _logged_keys(metrics_file: Path) -> set[tuple]:

    if not metrics_file.exists():
        return set()
    keys = set()
    for line in metrics_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: ignored, rewritten on resume
            continue
        keys.add((record.get("kind"), record.get("round"), record.get("client")))
    return keys


def _check_recipe_record(paths: RunPaths, recipe, force: bool) -> None:


    record_file = paths.root / RECIPE_RECORD
    fingerprint = recipe.fingerprint()
    if record_file.exists():
        recorded = json.loads(record_file.read_text())
        if recorded.get("fingerprint") != fingerprint and not force:
            raise FloristError(
                f"{paths.root}: holds a run of a different recipe (fingerprint {recorded.get('fingerprint')} "
                f"vs {fingerprint}); use another output_dir, or --force to continue it with the new recipe"
            )
    write_json_atomic(record_file, {"fingerprint": fingerprint, "recipe": recipe.model_dump(mode="json")})


def prepare_base_model(recipe, paths: RunPaths) -> str:
    """The base model's path: the recipe's Hub id or directory, or the builtin tiny Llama built here."""

    if recipe.model.name_or_path == TINY_LLAMA_ID:
        return str(build_tiny_llama(paths.root / BASE_MODEL_DIR, **recipe.model.tiny))
    return recipe.model.name_or_path


def client_sample_seed(data_seed: int, client_id: int) -> int:
    """The seed of client ``client_id``'s draw of ``data.max_samples_per_client`` records."""
    return data_seed * 1_000_003 + client_id


def prepare_client_data(recipe) -> tuple[list[list[dict]], list[dict]]:
    """Every client's records and the held-out test records, as the recipe's data section says."""
    from florist_hf import data as datasets_io

    section, num_clients = recipe.data, recipe.federation.num_clients
    if section.layout == "flora":
        shards, test = datasets_io.load_flora_layout(section.source, num_clients, format=section.format, fields=section.fields)
    else:
        if section.source == "builtin:demo":
            records = datasets_io.demo_records()
        else:
            records = datasets_io.load_records(section.source, format=section.format, fields=section.fields, split=section.split)
        if section.partition == "dirichlet":
            shards, test = datasets_io.flora_split(
                records, num_clients, alpha=section.dirichlet_alpha, seed=section.seed,
                test_per_label=section.holdout_per_label, min_size=section.min_client_size,
            )
        else:
            import numpy as np

            random_state = np.random.RandomState(section.seed)
            # A per-label hold-out needs labels; an iid split of unlabelled data (Alpaca, WizardLM) does not.
            if section.holdout_per_label:
                train, test = datasets_io.holdout_per_label(records, section.holdout_per_label, random_state)
            else:
                train, test = records, []
            parts = datasets_io.iid_partition(len(train), num_clients, random_state)
            shards = [[train[index] for index in part] for part in parts]
    if section.max_samples_per_client:
        shards = [
            datasets_io.sample_records(shard, section.max_samples_per_client, client_sample_seed(section.seed, client_id))
            for client_id, shard in enumerate(shards)
        ]
    for client_id, shard in enumerate(shards):
        if not shard:
            fix = (
                f"add records to {num_clients}/local_training_{client_id}.json or use a split with more data"
                if section.layout == "flora"
                else "lower federation.num_clients or raise data.min_client_size"
            )
            raise FloristError(f"{section.source}: client {client_id}'s shard is empty; {fix}")
    return shards, test


def load_global_model(base_path: str, paths: RunPaths, method: AggregationMethod, round_index: int, dtype: str = "float32",
                      *, revision: str | None = None, trust_remote_code: bool = False, base_cache=None):
    """The global model after ``round_index`` rounds, for held-out evaluation: for merge-style
    methods the base plus every round's update exactly as the clients hold it
    (`attach_global_updates`), else the base with the round's global adapter. With ``base_cache``
    it is built on the cached base; release that afterwards."""
    from peft import PeftModel

    from florist_hf.client import attach_global_updates
    from florist_hf.loading import load_causal_lm

    if base_cache is not None:
        model = base_cache.get(base_path, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code)
    else:
        model = load_causal_lm(base_path, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code)
    if method.merges_into_base:
        attach_global_updates(model, [paths.global_dir(earlier) for earlier in range(1, round_index + 1)])
        return model
    return PeftModel.from_pretrained(model, paths.global_dir(round_index))


def heldout_loss(model, tokenizer, records, recipe, work_dir: Path) -> float | None:
    """The mean over held-out records of each record's mean loss on its response tokens (the
    Trainer's own evaluation loop; None when no record has a response token within the cutoff).

    The prompt is masked whatever ``train_on_inputs`` says: the Alpaca template is the same in
    every record, and its tokens would dominate a mean over whole sequences. One record per batch,
    so that the value depends neither on the batch size nor on how many processes share the work
    (the Trainer averages per-batch means, and batches differ in their number of response tokens).
    """
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from florist_hf.data import IGNORE_INDEX, make_collator, tokenize_records

    dataset = tokenize_records(records, tokenizer, cutoff_len=recipe.data.cutoff_len, train_on_inputs=False)
    # A record whose response the cutoff removed has no token to score (its loss would be 0/0).
    dataset = dataset.select([index for index, labels in enumerate(dataset["labels"]) if any(label != IGNORE_INDEX for label in labels)])
    if len(dataset) == 0:
        return None
    args = TrainingArguments(
        output_dir=str(work_dir), per_device_eval_batch_size=1, report_to="none", disable_tqdm=True,
        remove_unused_columns=False, dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=args, eval_dataset=dataset, data_collator=make_collator(tokenizer), processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    return float(trainer.evaluate()["eval_loss"])


def global_heldout_loss(recipe, base_path: str, paths: RunPaths, method: AggregationMethod, round_index: int,
                        tokenizer, test_records, *, base_cache=None) -> float | None:
    """`heldout_loss` of the global model after ``round_index`` rounds (`load_global_model`); with
    ``base_cache`` built on the cached base, which is put back as loaded afterwards."""
    from florist_hf.client import free_memory

    model = load_global_model(
        base_path, paths, method, round_index, recipe.model.dtype,
        revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code, base_cache=base_cache,
    )
    try:
        return heldout_loss(model, tokenizer, test_records, recipe, paths.root / "work")
    finally:
        if base_cache is not None:
            base_cache.release(model if model is not base_cache.model else None)
        del model
        free_memory()


def build_initial_adapter(base_path: str, recipe, out_dir: Path) -> None:
    """Round 0's global adapter for continue-style methods: one shared LoRA init at the largest rank.

    Every client slices it to its own rank, so FedIT averages factors that started equal and
    FFA-LoRA's frozen A is the same on every client (SPEC §3).
    """
    from florist_hf.client import build_lora_model

    max_rank = max(recipe.client_rank(k) for k in range(recipe.federation.num_clients))
    model = build_lora_model(
        base_path, rank=max_rank, alpha=max_rank, target_modules=recipe.lora.target_modules,
        dropout=0.0, use_rslora=False, dtype=recipe.model.dtype, seed=recipe.federation.seed,
        revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code,
    )
    with atomic_directory(out_dir, overwrite=True) as staging:
        model.save_pretrained(staging)


def tokenize_shard(recipe, tokenizer, records):
    """A client's training records as the Trainer's dataset. The same in every round, so the
    drivers tokenize each shard once per process (a few seconds per round for a large shard)."""
    from florist_hf.data import tokenize_records

    return tokenize_records(records, tokenizer, cutoff_len=recipe.data.cutoff_len, train_on_inputs=recipe.data.train_on_inputs)


def run_client_round(recipe, plan, base_path: str, tokenizer, dataset, work_dir: Path, console,
                     base_cache=None) -> dict:
    """Train one client for one round (a stock Trainer + FederatedCallback) on ``dataset`` (see
    `tokenize_shard`) and export its adapter. With ``base_cache`` (a `client.BaseModelCache`) the
    base is loaded once for all clients and put back as loaded afterwards."""
    from florist_hf.client import (
        TRAINING_DEFAULTS,
        ConsoleProgressCallback,
        FederatedCallback,
        build_client_trainer,
        build_lora_model,
        client_seed,
        free_memory,
    )
    seed = client_seed(recipe.training.get("seed", recipe.federation.seed), plan.client_id, plan.round)
    model = build_lora_model(
        base_path, rank=plan.rank, alpha=recipe.client_alpha(plan.client_id), target_modules=recipe.lora.target_modules,
        dropout=recipe.lora.dropout, use_rslora=recipe.lora.use_rslora, dtype=recipe.model.dtype, seed=seed,
        revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code, base_cache=base_cache,
    )
    federated = FederatedCallback(plan)
    training = recipe.client_training_arguments(plan.client_id, plan.round, TRAINING_DEFAULTS["learning_rate"])
    trainer = build_client_trainer(
        model, tokenizer, dataset, training=training, work_dir=work_dir, seed=seed,
        callbacks=[federated, ConsoleProgressCallback(console, f"round {plan.round} client {plan.client_id}")],
    )
    try:
        trainer.train()
    finally:
        if base_cache is not None:
            base_cache.release(model)
    metrics = dict(federated.metrics)
    del trainer, model, federated
    free_memory()
    return metrics


def reuses_base_model(recipe) -> bool:
    """Whether a run keeps one base model for all its clients: in a single process without
    DeepSpeed or torch.compile (there the Trainer's engine owns or rewraps the model)."""
    from florist_hf import distributed

    training = [recipe.training, *recipe.client_training.values()]
    return (
        distributed.world_size() == 1
        and not distributed.launched_with_deepspeed()
        and not any(section.get("deepspeed") or section.get("torch_compile") for section in training)
    )


def write_published_adapter(paths: RunPaths, method: AggregationMethod, rounds_done: Sequence[int], out_dir: Path) -> Path:
    """One PEFT adapter on the ORIGINAL base holding the global model after ``rounds_done`` (SPEC §4).

    Merge-style methods sum the round updates and re-factorise the sum with the stacked
    decomposition at τ = 1 (exact); continue-style methods publish the last round's global.
    """
    last_global = paths.global_dir(rounds_done[-1])
    last_sidecar = json.loads((last_global / SIDECAR).read_text())
    with atomic_directory(out_dir, overwrite=True) as staging:
        if not method.merges_into_base:
            shutil.copytree(last_global, staging, dirs_exist_ok=True)
            shutil.rmtree(staging / CLIENT_ADAPTERS_DIR, ignore_errors=True)
            return out_dir
        rounds = [read_adapter(paths.global_dir(t)) for t in rounds_done]
        summed = {name: sum_of_updates([r.modules[name] for r in rounds]) for name in rounds[0].modules}
        sidecar = {
            **last_sidecar,
            "published": "sum of the round updates, re-factorised at threshold 1",
            "rounds": list(rounds_done),
            "modules": {
                name: {
                    "shape": list(rounds[0].modules[name].shape),
                    "selected_rank": module.selected_rank,
                    "singular_values": [float(s) for s in module.singular_values],
                    "energy_kept": 1.0,
                }
                for name, module in summed.items()
            },
            "total_rank": sum(module.selected_rank for module in summed.values()),
        }
        save_adapter_files(
            staging,
            {name: (module.lora_b, module.lora_a) for name, module in summed.items()},
            config_template=rounds[0].config,
            dtype=rounds[0].dtype,
            sidecar=sidecar,
        )
    return out_dir


def accept_client_result(paths: RunPaths, plan, logged: set, console, *, main: bool = True) -> bool:
    """Log a finished client once; a diverged (NaN/Inf) client is set aside and left out of its round."""
    from florist_hf import distributed
    from florist_hf.client import read_client_info

    info = read_client_info(plan.export_dir)
    key = ("client", plan.round, plan.client_id)
    if main and key not in logged:
        append_jsonl(paths.metrics, {"kind": "client", "round": plan.round, **info})
        logged.add(key)
    if not info.get("finite", True):
        distributed.wait_for_everyone()  # every process has read it before it moves
        # Kept for inspection under another name, so that a resumed run trains it again.
        if main:
            _retire(plan.export_dir, plan.export_dir.with_name(plan.export_dir.name + ".nonfinite"))
        console.print(f"  [yellow]client {plan.client_id}: training diverged (NaN/Inf); left out of round {plan.round}[/]")
        return False
    console.print(f"  client {plan.client_id}: loss {info['loss']:.4f}, {info['num_samples']} samples, {info['train_seconds']:.1f} s")
    return True


def require_quorum(paths: RunPaths, round_index: int, trained: int, selected: int, min_clients: int) -> None:
    if trained < min_clients:
        raise FloristError(
            f"{paths.round_dir(round_index)}: only {trained} of {selected} clients trained successfully, "
            f"below federation.min_clients = {min_clients}; earlier rounds are kept — fix the recipe "
            "(e.g. a lower learning rate) and run again with --force to resume"
        )


def aggregate_round(paths: RunPaths, method: AggregationMethod, trained, round_index: int) -> ServerStep:
    """The server step of one round, weighted by sample counts."""
    return aggregate_adapters(
        [plan.export_dir for plan in trained], method, paths.global_dir(round_index),
        weights=[plan.num_samples for plan in trained], overwrite=False,
        client_names=[plan.export_dir.name for plan in trained],
    )


def _client_id(client: dict) -> int | str:
    name = client.get("name") or Path(client["path"]).name
    return int(name.removeprefix("client_")) if name.removeprefix("client_").isdigit() else name


def round_record(paths: RunPaths, round_index: int, heldout: float | None) -> dict:
    """The round's line in metrics.jsonl, from its global adapter's sidecar (written atomically
    with the adapter, so a round stopped before its line was written gets the same line on resume)."""
    sidecar = json.loads((paths.global_dir(round_index) / SIDECAR).read_text())
    ranks = rank_summary(module["selected_rank"] for module in sidecar["modules"].values())
    comm = sidecar["communication"]
    record = {
        "kind": "round", "round": round_index, "clients": [_client_id(client) for client in sidecar["clients"]],
        "total_selected_rank": ranks["total"], "rank_min": ranks["min"], "rank_median": ranks["median"],
        "rank_max": ranks["max"], "uplink_bytes_total": comm["uplink_bytes_total"],
        "downlink_bytes_total": comm["downlink_bytes_total"], "eff_x1e4": comm["eff_x1e4"],
        "server_seconds": sidecar.get("server_seconds"),
    }
    if heldout is not None:
        record["heldout_loss"] = heldout
    return record


def describe_round(record: dict) -> str:
    return (
        f"  server: ranks {record['rank_min']}/{record['rank_median']:g}/{record['rank_max']} "
        f"(total {record['total_selected_rank']}), Eff {record['eff_x1e4']:.2f}, "
        f"up {record['uplink_bytes_total']:,} B, down {record['downlink_bytes_total']:,} B"
        + (f", held-out loss {record['heldout_loss']:.4f}" if "heldout_loss" in record else "")
    )


def run_federation(recipe, *, force: bool = False, console=None) -> Path:
    """Run (or resume) a whole federation; returns the run directory.

    Resuming is the same call: finished rounds (their global adapter exists) and finished clients
    of the current round (their adapter exists) are reused, so a killed run continues where it
    stopped and ends with the same result as an uninterrupted one.
    """

    from rich.console import Console

    from florist_hf import distributed
    from florist_hf.client import BaseModelCache, ClientRound
    from florist_hf.loading import load_model_config, load_tokenizer

    # Under accelerate launch every process runs this; all of them train each client together,
    # the main one alone writes the run directory (see florist_hf.distributed).
    distributed.init_processes()
    main = distributed.is_main_process()
    console = (console or Console()) if main else Console(quiet=True)
    paths = RunPaths(Path(recipe.output_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    federation = recipe.federation
    method = get_method(federation.method, threshold=federation.threshold) if federation.method == "florist" else get_method(federation.method)
    with distributed.main_process_first():
        if main:
            _check_recipe_record(paths, recipe, force)
        base_path = prepare_base_model(recipe, paths)
    # A base that cannot be loaded (offline, gated, misspelt) fails here in one line, before any
    # data is prepared or any client starts: its config and tokenizer are a few KB.
    load_model_config(base_path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    tokenizer = load_tokenizer(base_path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    shards, test_records = prepare_client_data(recipe)
    logged = _logged_keys(paths.metrics)
    console.print(
        f"[bold]{recipe.name}[/]: {federation.method}"
        + (f" (τ = {federation.threshold})" if federation.method == "florist" else "")
        + f", {federation.num_clients} clients {[len(s) for s in shards]} samples, ranks "
        f"{[recipe.client_rank(k) for k in range(federation.num_clients)]}, {federation.rounds} rounds -> {paths.root}"
    )
    if main and not method.merges_into_base and not paths.global_dir(0).exists():
        build_initial_adapter(base_path, recipe, paths.global_dir(0))

    rounds_done: list[int] = []
    datasets: dict[int, object] = {}  # each client's shard, tokenized once for all rounds
    base_cache = BaseModelCache() if reuses_base_model(recipe) else None  # the base, loaded once
    for round_index in range(1, federation.rounds + 1):
        distributed.wait_for_everyone()  # what the main process wrote last round is complete
        selected = sample_clients(federation.num_clients, federation.clients_per_round, federation.seed, round_index)
        global_dir = paths.global_dir(round_index)
        if global_dir.exists():
            console.print(f"round {round_index}: already complete, reused")
            rounds_done.append(round_index)
            if ("round", round_index, None) in logged:
                continue
            # Stopped between the aggregation and the round's record: the record is rebuilt below
            # from the global adapter's sidecar, which was written with it.
        else:
            console.print(f"[bold]round {round_index}/{federation.rounds}[/]: clients {selected}")
            trained: list[ClientRound] = []
            for client_id in selected:
                plan = ClientRound(
                    client_id=client_id,
                    round=round_index,
                    rank=recipe.client_rank(client_id),
                    num_samples=len(shards[client_id]),
                    export_dir=paths.client_dir(round_index, client_id),
                    merge_adapters=[paths.global_dir(t) for t in rounds_done] if method.merges_into_base else [],
                    init_adapter=None if method.merges_into_base else paths.global_dir(rounds_done[-1] if rounds_done else 0),
                    freeze_lora_a=method.name == "ffa",
                )
                if plan.export_dir.exists():
                    console.print(f"  client {client_id}: already trained this round, reused")
                else:
                    if client_id not in datasets:
                        datasets[client_id] = tokenize_shard(recipe, tokenizer, shards[client_id])
                    with distributed.client_model_loading({**recipe.training, **recipe.client_training.get(client_id, {})}):
                        run_client_round(recipe, plan, base_path, tokenizer, datasets[client_id], paths.root / "work", console,
                                         base_cache=base_cache)
                distributed.wait_for_everyone()  # the main process has exported the adapter
                if accept_client_result(paths, plan, logged, console, main=main):
                    trained.append(plan)
            require_quorum(paths, round_index, len(trained), len(selected), federation.min_clients)
            if main:
                aggregate_round(paths, method, trained, round_index)
            rounds_done.append(round_index)
        heldout = None
        if recipe.federation.eval_heldout_loss and test_records:
            distributed.wait_for_everyone()  # the global adapter is on disk
            # Every process evaluates a share, with whole weights (see distributed.without_deepspeed).
            with distributed.without_deepspeed():
                heldout = global_heldout_loss(
                    recipe, base_path, paths, method, round_index, tokenizer, test_records, base_cache=base_cache
                )
        if not main:
            continue
        record = round_record(paths, round_index, heldout)
        append_jsonl(paths.metrics, record)
        logged.add(("round", round_index, None))
        if recipe.evaluation is not None and recipe.evaluation.every_round and round_index < federation.rounds:
            published = write_published_adapter(paths, method, rounds_done, paths.round_dir(round_index) / "published")
            with distributed.single_process():  # lm-eval on the main process alone
                _evaluate_and_log(recipe, base_path, published, paths, round_index, logged, console)
        console.print(describe_round(record))

    if base_cache is not None:
        base_cache.clear()  # lm-eval loads its own model
    if not main:  # training is over; the main process publishes, evaluates and pushes alone
        distributed.wait_for_everyone()
        return paths.root
    final_dir = write_published_adapter(paths, method, rounds_done, paths.root / GLOBAL_ADAPTER)
    evaluation = None
    if recipe.evaluation is not None:
        with distributed.single_process():
            evaluation = _evaluate_and_log(recipe, base_path, final_dir, paths, rounds_done[-1], logged, console)
    summary = summarize_run(recipe, paths, shards, base_path)
    summary["evaluation"] = evaluation
    write_json_atomic(paths.root / RUN_SUMMARY, summary)
    if recipe.hub is not None and recipe.hub.push:
        from florist_hf.hub import push

        url = push(paths.root, recipe.hub.repo_id, private=recipe.hub.private,
                   include_client_details=recipe.hub.include_client_details)
        console.print(f"pushed to {url}")
    distributed.wait_for_everyone()
    return paths.root


def _evaluate_and_log(recipe, base_path: str, adapter_dir: Path, paths: RunPaths, round_index: int, logged: set, console) -> dict:
    """Evaluate the adapter published after ``round_index`` once; later resumes reuse the file."""
    out_file = paths.round_dir(round_index) / "evaluation.json"
    if out_file.exists():
        results = json.loads(out_file.read_text())
        evaluation = results["florist_hf_summary"]
    else:
        evaluation = evaluate_run(recipe, base_path, adapter_dir, out_file, console)
    if ("evaluation", round_index, None) not in logged:
        append_jsonl(paths.metrics, {"kind": "evaluation", "round": round_index, **evaluation})
        logged.add(("evaluation", round_index, None))
    return evaluation


def evaluate_run(recipe, base_path: str, adapter_dir: Path, out_file: Path, console) -> dict:
    """The recipe's lm-eval evaluation of the published adapter; returns {task: {metric: value}}."""
    from florist_hf.evaluation import evaluate_adapter, evaluate_paper_mmlu, results_table, summarize_results

    section = recipe.evaluation
    if section.paper_mmlu_file:
        results = evaluate_paper_mmlu(
            base_path, adapter_dir, section.paper_mmlu_file, limit=section.limit, batch_size=section.batch_size,
            log_samples=section.log_samples, revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code, out_file=out_file,
        )
    else:
        results = evaluate_adapter(
            base_path, adapter_dir, tasks=section.tasks, num_fewshot=section.num_fewshot, limit=section.limit,
            include_path=section.include_path, batch_size=section.batch_size, log_samples=section.log_samples,
            apply_chat_template=section.apply_chat_template, revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code, out_file=out_file,
        )
    console.print(results_table(results))
    tasks: dict[str, dict] = {}
    for task, metric, value, stderr in summarize_results(results):
        tasks.setdefault(task, {})[metric] = value
        if stderr is not None:
            tasks[task][f"{metric}_stderr"] = stderr
    summary = {"tasks": tasks, "results_file": str(out_file)}
    write_json_atomic(out_file, {**results, "florist_hf_summary": summary})
    return summary


def summarize_run(recipe, paths: RunPaths, shards, base_path: str) -> dict:
    """``run.json``: what ran, what it cost, where the result is."""

    records = [json.loads(line) for line in paths.metrics.read_text().splitlines() if line.strip()]
    rounds = [r for r in records if r["kind"] == "round"]
    data_source = recipe.data.source
    return {
        "format": RUN_FORMAT,
        "version": 1,
        "name": recipe.name,
        "method": recipe.federation.method,
        "threshold": recipe.federation.threshold if recipe.federation.method == "florist" else None,
        "rounds": recipe.federation.rounds,
        "rounds_completed": len(rounds),
        "num_clients": recipe.federation.num_clients,
        "clients_per_round": len(sample_clients(recipe.federation.num_clients, recipe.federation.clients_per_round, recipe.federation.seed, 1)),
        "client_ranks": [recipe.client_rank(k) for k in range(recipe.federation.num_clients)],
        "client_samples": [len(shard) for shard in shards],
        "base_model": base_path,
        # Hub dataset ids only (for the model card); local files and builtin data are not linkable.
        "datasets": [] if data_source.startswith("builtin:") or Path(data_source).exists() else [data_source],
        "data_source": data_source,
        "global_adapter": GLOBAL_ADAPTER,
        "communication": {
            "uplink_bytes_total": sum(r["uplink_bytes_total"] for r in rounds),
            "downlink_bytes_total": sum(r["downlink_bytes_total"] for r in rounds),
            "eff_x1e4": rounds[-1]["eff_x1e4"] if rounds else None,
            "eff_x1e4_per_round": [r["eff_x1e4"] for r in rounds],
        },
        "heldout_loss": [r.get("heldout_loss") for r in rounds],
        "evaluation": None,
        "recipe": recipe.model_dump(mode="json"),
    }
