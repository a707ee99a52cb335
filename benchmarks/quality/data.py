"""The benchmark's data: real Dolly records, split by category into pre-training and fine-tuning
data, and per seed a non-IID FLoRA-layout client split of the fine-tuning part (SPEC §6)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.quality import config
from florist_hf.data import (
    dirichlet_partition,
    holdout_per_label,
    labels_of,
    load_flora_layout,
    save_flora_layout,
)


def dolly_records(source: Path = config.SHARED_DOLLY) -> list[dict]:
    """Every record of the shared Dolly split (the 8 client files and the test file), canonical form."""
    if not source.is_dir():
        raise FileNotFoundError(f"real Dolly data not found at {source} (it lies beside the CI clone)")
    shards, test = load_flora_layout(source.parent, int(source.name), format="dolly")
    return [record for shard in shards for record in shard] + test


def pretrain_records(source: Path = config.SHARED_DOLLY) -> list[dict]:
    return [r for r in dolly_records(source) if r["label"] in config.PRETRAIN_CATEGORIES]


def finetune_records(source: Path = config.SHARED_DOLLY, categories=config.FINETUNE_CATEGORIES) -> list[dict]:
    return [r for r in dolly_records(source) if r["label"] in categories]


def client_train_sizes(shard_sizes: list[int], total: int, minimum: int, available: list[int]) -> list[int]:
    """Training records per client: proportional to its Dirichlet shard, at least ``minimum``."""
    scale = total / sum(shard_sizes)
    return [min(max(minimum, round(size * scale)), room) for size, room in zip(shard_sizes, available)]


def sample_clients(out_dir: Path, shards: list[list[dict]], test: list[dict], sizes: list[int], client_eval: int,
                   state: np.random.RandomState) -> tuple[list[list[dict]], list[list[dict]]]:
    """Each client's training sample (``sizes``) and held-out slice (``client_eval`` further
    records) drawn from its shard, written: FLoRA layout for the federation, ``1/`` (their union)
    for the centralised reference, ``client_eval.json``."""
    client_train, client_heldout = [], []
    for shard, size in zip(shards, sizes):
        chosen = state.permutation(len(shard))
        client_train.append([shard[i] for i in chosen[:size]])
        client_heldout.append([shard[i] for i in chosen[size: size + client_eval]])
    save_flora_layout(out_dir, client_train, test)
    save_flora_layout(out_dir, [[r for part in client_train for r in part]], test)
    (out_dir / "client_eval.json").write_text(json.dumps(client_heldout, ensure_ascii=False))
    return client_train, client_heldout


def build_split(
    out_dir: Path,
    seed: int,
    *,
    records: list[dict] | None = None,
    num_clients: int = config.NUM_CLIENTS,
    alpha: float = config.DIRICHLET_ALPHA,
    test_per_category: int = config.TEST_PER_CATEGORY,
    total_train: int = config.TOTAL_TRAIN_RECORDS,
    min_client_train: int = config.MIN_CLIENT_TRAIN,
    client_eval: int = config.CLIENT_EVAL_RECORDS,
) -> dict:
    """Write one seed's split and return its description.

    1. Hold out ``test_per_category`` records per category: the global test split.
    2. Dirichlet(alpha) over category, self-balancing (the paper's procedure, `dirichlet_partition`).
    3. Each client keeps a random sample of its shard, proportional to the shard's size, for
       training, and ``client_eval`` further records of its shard as its own held-out slice.

    Files: ``<out_dir>/<K>/`` (FLoRA layout for the federation), ``<out_dir>/1/`` (the union of the
    clients' training records, for the centralised reference; same test file) and
    ``<out_dir>/client_eval.json`` (one list of records per client).
    """
    split_file = out_dir / "split.json"
    if split_file.exists():
        return json.loads(split_file.read_text())
    records = finetune_records() if records is None else records
    state = np.random.RandomState(seed)
    train, test = holdout_per_label(records, test_per_category, state)
    parts = dirichlet_partition(labels_of(train), num_clients, alpha, state, min_size=min_client_train + client_eval)
    sizes = client_train_sizes([len(p) for p in parts], total_train, min_client_train, [len(p) - client_eval for p in parts])
    client_train, client_heldout = sample_clients(out_dir, [[train[i] for i in part] for part in parts], test, sizes,
                                                  client_eval, state)
    categories = sorted({r["label"] for r in records})
    description = {
        "seed": seed,
        "categories": categories,
        "test_records": len(test),
        "dirichlet_shard_sizes": [len(p) for p in parts],
        "client_train_sizes": sizes,
        "client_eval_sizes": [len(h) for h in client_heldout],
        "client_category_counts": [
            {c: sum(r["label"] == c for r in shard) for c in categories} for shard in client_train
        ],
    }
    split_file.write_text(json.dumps(description, indent=1))
    return description


def load_client_eval(out_dir: Path) -> list[list[dict]]:
    """Each client's own held-out records (canonical records, as written by `build_split`)."""
    return json.loads((out_dir / "client_eval.json").read_text())


def build_paper_split(out_dir: Path, seed: int, *, source: Path = config.SHARED_DOLLY, total_train: int = config.REAL_TOTAL_TRAIN,
                      min_client_train: int = config.REAL_MIN_CLIENT_TRAIN, client_eval: int = config.REAL_CLIENT_EVAL) -> dict:
    """One seed's sample of the paper's own 8-client Dolly split, for the real-model benchmark.

    The clients keep the paper's shards (Dirichlet(0.5) over all eight categories) and its test file
    (10 records per category); each trains on a seeded random sample of its shard proportional to
    the shard's size (``total_train`` in all, at least ``min_client_train``), so client sizes stay
    skewed as in the paper, and ``client_eval`` further records of its shard are its own held-out
    slice. Same files as `build_split`.
    """
    split_file = out_dir / "split.json"
    if split_file.exists():
        return json.loads(split_file.read_text())
    shards, test = load_flora_layout(source.parent, int(source.name), format="dolly")
    state = np.random.RandomState(seed)
    sizes = client_train_sizes([len(s) for s in shards], total_train, min_client_train, [len(s) - client_eval for s in shards])
    client_train, client_heldout = sample_clients(out_dir, shards, test, sizes, client_eval, state)
    categories = sorted({r["label"] for r in test})
    description = {
        "seed": seed, "source": "the paper's 8-client Dolly split", "categories": categories, "test_records": len(test),
        "paper_shard_sizes": [len(s) for s in shards], "client_train_sizes": sizes,
        "client_eval_sizes": [len(h) for h in client_heldout],
        "client_category_counts": [{c: sum(r["label"] == c for r in part) for c in categories} for part in client_train],
    }
    split_file.write_text(json.dumps(description, indent=1))
    return description
