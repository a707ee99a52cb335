"""Small local copies of the paper's datasets in their real Hub schemas and repository layouts.

Each writer makes a folder laid out like the dataset's Hub repository (same file name, same file
type, same columns and dtypes), so ``datasets.load_dataset(folder)`` goes through the builder the
Hub id goes through:

- ``databricks/databricks-dolly-15k``: ``databricks-dolly-15k.jsonl``; instruction, context,
  response, category (8 categories); split ``train``.
- ``tatsu-lab/alpaca``: ``data/train-00000-of-00001-a09b74b3ef9c3b56.parquet``; instruction,
  input (often ""), output, text (the formatted prompt); split ``train``.
- ``vicgalle/alpaca-gpt4`` (FlowerTune's general-NLP data): one parquet shard under ``data/`` (its name's
  hash is not the Hub's); the same columns as Alpaca, the outputs GPT-4's; split ``train``.
- ``WizardLM/WizardLM_evol_instruct_70k``: ``alpaca_evol_instruct_70k.json`` (one JSON array);
  instruction, output (no input); split ``train``.
- ``data/dolly_preference/train.jsonl`` (the DPO recipe's pairs, which ``tools/dolly_preference.py`` builds from
  Dolly): prompt, chosen, rejected (conversations), category; the tool's own output for the Dolly rows above.
"""

from __future__ import annotations

import json
from pathlib import Path

DOLLY_CATEGORIES = (
    "brainstorming", "classification", "closed_qa", "creative_writing",
    "general_qa", "information_extraction", "open_qa", "summarization",
)
ALPACA_PARQUET = "data/train-00000-of-00001-a09b74b3ef9c3b56.parquet"
ALPACA_GPT4_PARQUET = "data/train-00000-of-00001-alpaca-gpt4.parquet"
WIZARD_JSON = "alpaca_evol_instruct_70k.json"
DOLLY_JSONL = "databricks-dolly-15k.jsonl"

#: Which writer makes the stand-in for a recipe's ``data.source``.
HUB_FIXTURES = {}


def _text(index: int, words: int) -> str:
    vocabulary = ("apple", "river", "stone", "cloud", "green", "quick", "seven", "light", "north", "paper")
    return " ".join(vocabulary[(index * 7 + k * 3) % len(vocabulary)] for k in range(words))


def write_dolly_repo(folder: Path, count: int = 480) -> Path:
    """``count`` Dolly rows, categories in round-robin (the split needs each one populated)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / DOLLY_JSONL, "w") as out:
        for index in range(count):
            row = {
                "instruction": f"Question {index}: {_text(index, 4)}?",
                "context": _text(index + 1, 6) if index % 3 == 0 else "",
                "response": _text(index + 2, 5) + ".",
                "category": DOLLY_CATEGORIES[index % len(DOLLY_CATEGORIES)],
            }
            out.write(json.dumps(row) + "\n")
    return folder


def write_alpaca_repo(folder: Path, count: int = 96, shard: str = ALPACA_PARQUET) -> Path:
    """``count`` Alpaca rows as one parquet shard (``shard``); every other row has an input."""
    import datasets

    from florist_hf.data import format_prompt

    rows = []
    for index in range(count):
        instruction = f"Task {index}: {_text(index, 4)}."
        input_text = _text(index + 3, 5) if index % 2 else ""
        output = _text(index + 5, 6) + "."
        rows.append({
            "instruction": instruction,
            "input": input_text,
            "output": output,
            "text": format_prompt(instruction, input_text) + output,
        })
    path = folder / shard
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return folder


def write_wizard_repo(folder: Path, count: int = 96) -> Path:
    """``count`` evol-instruct rows as one JSON array (instruction, output only)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": f"Explain {_text(index, 3)}.", "output": _text(index + 4, 7) + "."} for index in range(count)]
    (folder / WIZARD_JSON).write_text(json.dumps(rows, indent=1))
    return folder


def write_dolly_preference(folder: Path, count: int = 480) -> Path:
    """The DPO recipe's pairs (``tools/dolly_preference.py``: TRL's conversational preference format with an explicit
    prompt, and the category) built by that tool itself from ``count`` Dolly rows, as ``train.jsonl``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dolly_preference", Path(__file__).resolve().parents[1] / "tools" / "dolly_preference.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    records = [json.loads(line) for line in (write_dolly_repo(folder / "dolly", count) / DOLLY_JSONL).read_text().splitlines()]
    tool.write_jsonl(folder / "train.jsonl", tool.pairs_of(records))
    return folder / "train.jsonl"


HUB_FIXTURES.update({
    "data/dolly_preference/train.jsonl": write_dolly_preference,
    "databricks/databricks-dolly-15k": write_dolly_repo,
    "tatsu-lab/alpaca": write_alpaca_repo,
    # 20 clients (the FlowerTune recipe's) of at least 4 records each.
    "vicgalle/alpaca-gpt4": lambda folder: write_alpaca_repo(folder, count=120, shard=ALPACA_GPT4_PARQUET),
    "WizardLM/WizardLM_evol_instruct_70k": write_wizard_repo,
})
