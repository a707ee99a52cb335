"""Preference pairs built from Dolly, for the DPO recipe (recipes/smollm2_135m_dpo.yaml) and the DPO benchmark.

    python tools/dolly_preference.py DOLLY OUT

DOLLY is the paper's 8-client Dolly split (a FLoRA-layout folder: local_training_<k>.json, global_test.json) or
databricks-dolly-15k.jsonl itself. Each record becomes one pair in TRL's conversational preference format with an
explicit prompt (``prompt``: the user's turn, the instruction and its context after a blank line; ``chosen``: the
record's own response as the assistant's turn; ``rejected``: the response Dolly gives to another instruction of the
same category, as the assistant's turn) and its ``category``. So the preference is relevance: a fluent answer of the
right kind, but to another question, is worse than the answer to this one. The other record is drawn without
replacement within its file and category (a seeded random cycle, so no record is its own rejected answer). No
human or model judged these pairs: they are built, not collected.

Writes OUT/train.jsonl (the training files' records; all of databricks-dolly-15k.jsonl but its held-out share) and
OUT/heldout.jsonl (global_test.json's 80 records, 10 per category; or every 50th record of the .jsonl).
"""

from __future__ import annotations

import json
import random
import sys
from collections import defaultdict
from pathlib import Path

SEED = 0


def pairs_of(records: list[dict], seed: int = SEED) -> list[dict]:
    """One preference pair per record (its order kept): its own response chosen, the response of another record
    of its category (a seeded random cycle through them) rejected; categories with a single record give none."""
    by_category: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        by_category[record["category"]].append(index)
    rejected: dict[int, int] = {}
    rng = random.Random(seed)
    for category in sorted(by_category):
        members = by_category[category]
        if len(members) < 2:
            continue
        cycle = rng.sample(members, len(members))
        rejected.update({cycle[k]: cycle[(k + 1) % len(cycle)] for k in range(len(cycle))})
    pairs = []
    for index, record in enumerate(records):
        if index not in rejected:
            continue
        context = (record.get("context") or "").strip()
        user = record["instruction"].strip() + (f"\n\n{context}" if context else "")
        pairs.append({
            "prompt": [{"role": "user", "content": user}],
            "chosen": [{"role": "assistant", "content": record["response"].strip()}],
            "rejected": [{"role": "assistant", "content": records[rejected[index]]["response"].strip()}],
            "category": record["category"],
        })
    return pairs


def split_records(dolly: Path) -> tuple[list[list[dict]], list[dict]]:
    """(training files' records, held-out records) of a FLoRA-layout folder or of databricks-dolly-15k.jsonl."""
    if dolly.is_dir():
        files = sorted(dolly.glob("local_training_*.json"), key=lambda path: int(path.stem.rsplit("_", 1)[1]))
        if not files or not (dolly / "global_test.json").is_file():
            raise SystemExit(f"{dolly}: expected local_training_<k>.json and global_test.json (FLoRA's layout)")
        return [json.loads(path.read_text()) for path in files], json.loads((dolly / "global_test.json").read_text())
    records = [json.loads(line) for line in dolly.read_text().splitlines() if line.strip()]
    return [[record for k, record in enumerate(records) if k % 50]], [record for k, record in enumerate(records) if not k % 50]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    staging = path.with_suffix(".jsonl.partial")
    staging.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    staging.replace(path)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(__doc__.split("\n\n")[1])
    dolly, out = Path(argv[0]), Path(argv[1])
    training, heldout = split_records(dolly)
    out.mkdir(parents=True, exist_ok=True)
    train_pairs = [pair for records in training for pair in pairs_of(records)]
    write_jsonl(out / "train.jsonl", train_pairs)
    write_jsonl(out / "heldout.jsonl", pairs_of(heldout))
    print(f"{out}: {len(train_pairs)} training pairs, {len(pairs_of(heldout))} held-out pairs")


if __name__ == "__main__":
    main(sys.argv[1:])
