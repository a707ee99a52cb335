"""Data loading, partitioning, prompt template and tokenization (fast, CPU, offline)."""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from florist_hf import data
from florist_hf.errors import FloristError

PAPER_CLIENT_SIZES = [1579, 685, 3775, 1830, 2152, 1776, 2531, 607]
DOLLY_CATEGORIES = {
    "brainstorming", "classification", "closed_qa", "creative_writing",
    "general_qa", "information_extraction", "open_qa", "summarization",
}


@pytest.fixture(scope="module")
def byte_tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def _label_counts(labels, part):
    return Counter(labels[index] for index in part)


# ------------------------------------------------------------------ FLoRA layout (real Dolly split)


def test_flora_layout_loads_the_papers_dolly_split(shared_data):
    clients, test = data.load_flora_layout(shared_data / "dolly", 8)

    assert [len(records) for records in clients] == PAPER_CLIENT_SIZES
    assert len(test) == 80
    assert Counter(record["label"] for record in test) == dict.fromkeys(DOLLY_CATEGORIES, 10)
    first = clients[0][0]
    assert set(first) == {"instruction", "input", "output", "label"}
    assert first["instruction"].startswith("Give me a bulleted list of things to consider")
    assert first["label"] == "brainstorming"
    assert any(record["input"] for records in clients for record in records)  # context -> input


def test_flora_split_reproduces_the_papers_client_sizes_and_categories(shared_data):
    clients, test = data.load_flora_layout(shared_data / "dolly", 8)
    all_dolly = [record for records in clients for record in records] + test

    split_clients, split_test = data.flora_split(all_dolly, 8, alpha=0.5, seed=42)

    assert [len(records) for records in split_clients] == PAPER_CLIENT_SIZES
    for ours, paper in zip(split_clients, clients):
        assert Counter(r["label"] for r in ours) == Counter(r["label"] for r in paper)
    assert Counter(record["label"] for record in split_test) == dict.fromkeys(DOLLY_CATEGORIES, 10)


def test_flora_layout_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FloristError, match="FLoRA data folder not found: .*nowhere"):
        data.load_flora_layout(tmp_path / "nowhere", 8)

    (tmp_path / "4").mkdir()
    with pytest.raises(FloristError, match=r"no 8-client split in .*expected .*/8/local_training_<k>\.json.*subfolders: 4"):
        data.load_flora_layout(tmp_path, 8)

    split_dir = tmp_path / "2"
    split_dir.mkdir()
    (split_dir / "local_training_0.json").write_text(json.dumps([{"instruction": "i", "response": "o"}]))
    with pytest.raises(FloristError, match=r"missing client file .*local_training_1\.json"):
        data.load_flora_layout(tmp_path, 2)

    # Pointing at the K folder itself gets a hint to use its parent.
    with pytest.raises(FloristError, match="set data.source to its parent"):
        data.load_flora_layout(split_dir, 2)


def test_save_flora_layout_round_trips_and_test_file_is_optional(tmp_path):
    records = data.demo_records()
    split_dir = data.save_flora_layout(tmp_path, [records[:5], records[5:9]])

    assert split_dir == tmp_path / "2"
    assert not (split_dir / "global_test.json").exists()
    clients, test = data.load_flora_layout(tmp_path, 2)
    assert clients == [records[:5], records[5:9]]
    assert test == []
    assert set(json.loads((split_dir / "local_training_0.json").read_text())[0]) == {
        "instruction", "context", "response", "category",
    }


# ------------------------------------------------------------------ local files and field mapping


ROWS = [
    {"question": "What is 2 plus 2?", "hint": "", "answer": "4", "topic": "math"},
    {"question": "Reverse it.", "hint": "abc", "answer": "cba", "topic": "spelling"},
    {"question": "Capital of Peru?", "answer": "Lima", "topic": "capitals"},  # no hint at all
]
CUSTOM_FIELDS = {"instruction": "question", "input": "hint", "output": "answer", "label": "topic"}
EXPECTED = [
    {"instruction": "What is 2 plus 2?", "input": "", "output": "4", "label": "math"},
    {"instruction": "Reverse it.", "input": "abc", "output": "cba", "label": "spelling"},
    {"instruction": "Capital of Peru?", "input": "", "output": "Lima", "label": "capitals"},
]


def test_local_json_and_jsonl_with_custom_field_mapping(tmp_path):
    array_file = tmp_path / "rows.json"
    array_file.write_text(json.dumps(ROWS))
    lines_file = tmp_path / "rows.jsonl"
    lines_file.write_text("\n".join(json.dumps(row) for row in ROWS) + "\n\n")

    assert data.load_records(str(array_file), fields=CUSTOM_FIELDS) == EXPECTED
    assert data.load_records(lines_file, fields=CUSTOM_FIELDS) == EXPECTED


def test_local_format_is_inferred_or_named(tmp_path):
    alpaca_file = tmp_path / "alpaca.jsonl"
    alpaca_file.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."}) + "\n")
    assert data.load_records(alpaca_file) == [
        {"instruction": "Say hi.", "input": "", "output": "Hi.", "label": None}
    ]

    wizard_file = tmp_path / "wizard.json"
    wizard_file.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi."}]))
    assert data.load_records(wizard_file, format="wizard")[0]["input"] == ""
    # Named preset, single field overridden.
    assert data.load_records(wizard_file, format="dolly", fields={"output": "output", "input": None, "label": None}) == [
        {"instruction": "Say hi.", "input": "", "output": "Hi.", "label": None}
    ]


def test_saved_dataset_folder_loads(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS[:2]).save_to_disk(str(tmp_path / "saved"))
    assert data.load_records(tmp_path / "saved", fields=CUSTOM_FIELDS) == EXPECTED[:2]


def test_missing_field_errors_name_source_field_and_fix(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS))

    with pytest.raises(FloristError, match=r"rows\.json: no column 'response' for the output field .*set data\.fields\.output"):
        data.load_records(path, format="dolly", fields={"instruction": "question"})

    rows_with_gap = [dict(ROWS[0]), {"question": "q", "topic": "t"}]
    with pytest.raises(FloristError, match=r"my-data: row 1 has no 'answer' \(output\).*data\.fields\.output"):
        data.normalize_records(rows_with_gap, CUSTOM_FIELDS, source="my-data")

    with pytest.raises(FloristError, match="fit no data format; set data.format to one of dolly.*messages.*prompt_completion"):
        data.load_records(path)

    with pytest.raises(FloristError, match="unknown key"):
        data.load_records(path, fields={**CUSTOM_FIELDS, "answer_text": "answer"})


def test_hub_id_goes_to_load_dataset_with_its_known_format(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, split):
        calls.append((path, split))
        return datasets.Dataset.from_list(
            [{"instruction": "Name a fruit.", "context": "", "response": "Apple.", "category": "open_qa"}]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = data.load_records("databricks/databricks-dolly-15k", split="train[:1]")

    assert calls == [("databricks/databricks-dolly-15k", "train[:1]")]
    assert records == [{"instruction": "Name a fruit.", "input": "", "output": "Apple.", "label": "open_qa"}]


def test_unreachable_hub_dataset_is_one_florist_error():
    with pytest.raises(FloristError, match="dataset 'florist-hf-tests/no-such-dataset': not in the local .*HF_HUB_OFFLINE"):
        data.load_records("florist-hf-tests/no-such-dataset")


#: Each dataset's own columns for instruction, input, output and label (its real Hub schema).
REAL_SCHEMAS = {
    "databricks/databricks-dolly-15k": ("instruction", "context", "response", "category"),
    "tatsu-lab/alpaca": ("instruction", "input", "output", None),
    "WizardLM/WizardLM_evol_instruct_70k": ("instruction", None, "output", None),
}


def _raw_rows(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    (path,) = [p for p in folder.rglob("*") if p.is_file()]
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(path.read_text())


@pytest.mark.parametrize("source", list(REAL_SCHEMAS))
def test_local_copy_in_the_hub_layout_loads_like_the_hub_id(tmp_path, source):
    """A folder laid out like the dataset's Hub repo goes through datasets.load_dataset, as the id does,
    and each real schema maps onto the canonical fields."""
    from dataset_fixtures import HUB_FIXTURES

    folder = HUB_FIXTURES[source](tmp_path / source)
    instruction, input_column, output, label = REAL_SCHEMAS[source]
    expected = [
        {"instruction": row[instruction], "input": row[input_column] if input_column else "",
         "output": row[output], "label": row[label] if label else None}
        for row in _raw_rows(folder)
    ]
    assert any(record["input"] for record in expected) == (input_column is not None)
    assert data.load_records(folder) == expected


def test_single_parquet_file_and_a_missing_split(tmp_path):
    from dataset_fixtures import ALPACA_PARQUET, write_alpaca_repo

    folder = write_alpaca_repo(tmp_path / "alpaca", count=4)
    records = data.load_records(folder / ALPACA_PARQUET)
    assert [record["input"] for record in records] == ["", records[1]["input"], "", records[3]["input"]]
    with pytest.raises(FloristError, match="no split 'test'.*set data.split"):
        data.load_records(folder, split="test")


def test_missing_local_path_is_named(tmp_path):
    missing = tmp_path / "not-here.jsonl"
    with pytest.raises(FloristError, match=f"not found: {missing}"):
        data.load_records(str(missing))
    with pytest.raises(FloristError, match="not found: data/missing.json"):
        data.load_records("data/missing.json")


# ------------------------------------------------------------------ partitioners


def test_iid_partition_covers_every_index_once():
    parts = data.iid_partition(103, 4, seed=0)

    assert sorted(index for part in parts for index in part) == list(range(103))
    assert sorted(len(part) for part in parts) == [25, 26, 26, 26]
    assert parts == data.iid_partition(103, 4, seed=0)
    assert parts != data.iid_partition(103, 4, seed=1)
    assert parts[0] != list(range(26))  # shuffled, not contiguous


LABEL_COUNTS = {"a": 400, "b": 300, "c": 200, "d": 500, "e": 100, "f": 250}  # N = 1750
LABELS = [label for label, count in LABEL_COUNTS.items() for _ in range(count)]


def test_dirichlet_partition_is_deterministic_complete_and_respects_min_size():
    parts = data.dirichlet_partition(LABELS, 5, alpha=0.5, seed=0, min_size=40)

    assert parts == data.dirichlet_partition(LABELS, 5, alpha=0.5, seed=0, min_size=40)
    assert parts != data.dirichlet_partition(LABELS, 5, alpha=0.5, seed=1, min_size=40)
    assert sorted(index for part in parts for index in part) == list(range(len(LABELS)))
    assert min(len(part) for part in parts) >= 40


def test_dirichlet_partition_is_label_skewed():
    parts = data.dirichlet_partition(LABELS, 5, alpha=0.5, seed=0)
    global_share = np.array(list(LABEL_COUNTS.values())) / len(LABELS)
    client_shares = [
        np.array([_label_counts(LABELS, part)[label] for label in LABEL_COUNTS]) / len(part) for part in parts
    ]
    # Total-variation distance from the global label mix; an iid split stays near 0 (< 0.1 here).
    distances = [0.5 * np.abs(share - global_share).sum() for share in client_shares]
    assert max(distances) > 0.3
    iid_distances = [
        0.5 * np.abs(np.array([_label_counts(LABELS, part)[label] for label in LABEL_COUNTS]) / len(part) - global_share).sum()
        for part in data.iid_partition(len(LABELS), 5, seed=0)
    ]
    assert max(iid_distances) < 0.1


def _held_before_last_label(parts):
    """Per client: how many examples it held before it received its last label's chunk."""
    label_order = sorted(LABEL_COUNTS)
    held = []
    for part in parts:
        counts = _label_counts(LABELS, part)
        last_label = [label for label in label_order if counts[label]][-1]
        held.append(len(part) - counts[last_label])
    return held


@pytest.mark.parametrize("seed", range(8))
def test_dirichlet_self_balancing_full_client_takes_no_more(seed):
    # Labels are dealt in sorted order and a client holding >= N/K gets no share of later labels.
    # Exactly asserted: before its last non-empty label chunk, every client held < N/K examples;
    # hence no client exceeds N/K by more than one label's count.
    num_clients = 5
    full_size = len(LABELS) / num_clients
    parts = data.dirichlet_partition(LABELS, num_clients, alpha=0.5, seed=seed)

    assert all(held < full_size for held in _held_before_last_label(parts))
    assert max(len(part) for part in parts) < full_size + max(LABEL_COUNTS.values())


def test_dirichlet_without_self_balancing_breaks_the_cap():
    # Shows the cap test above can fail: without it, full clients keep receiving examples.
    full_size = len(LABELS) / 5
    parts = data.dirichlet_partition(LABELS, 5, alpha=0.5, seed=0, min_size=0, self_balancing=False)
    assert any(held >= full_size for held in _held_before_last_label(parts))


def test_dirichlet_impossible_min_size_raises():
    with pytest.raises(FloristError, match="cannot give each of 5 clients 400 examples out of 1750"):
        data.dirichlet_partition(LABELS, 5, alpha=0.5, seed=0, min_size=400)
    with pytest.raises(FloristError, match="in 3 attempts; lower data.min_client_size"):
        data.dirichlet_partition(LABELS, 5, alpha=0.05, seed=0, min_size=349, max_attempts=3)


def test_holdout_per_label():
    records = [{"instruction": f"q{i}", "input": "", "output": "o", "label": label} for i, label in enumerate(LABELS)]

    train, test = data.holdout_per_label(records, 10, seed=42)

    assert Counter(record["label"] for record in test) == dict.fromkeys(LABEL_COUNTS, 10)
    assert len(train) == len(records) - 60
    assert sorted(r["instruction"] for r in train + test) == sorted(r["instruction"] for r in records)
    assert [r["instruction"] for r in train] == [r["instruction"] for r in records if r not in test]  # order kept
    assert (train, test) == data.holdout_per_label(records, 10, seed=42)
    assert test != data.holdout_per_label(records, 10, seed=7)[1]

    with pytest.raises(FloristError, match="label 'e' has only 100 records"):
        data.holdout_per_label(records, 101, seed=0)
    with pytest.raises(FloristError, match="row 1.*set data.fields.label"):
        data.holdout_per_label([records[0], {**records[1], "label": None}], 1, seed=0)


def test_sample_records_is_a_seeded_draw_that_keeps_the_label_mix():
    grouped = [{"instruction": f"q{i}", "input": "", "output": "o", "label": label}
               for i, label in enumerate(sorted(LABELS))]  # a Dirichlet shard: grouped by label

    sample = data.sample_records(grouped, 40, seed=3)

    assert len(sample) == 40 and len({r["instruction"] for r in sample}) == 40
    assert len({r["label"] for r in sample}) > 1  # the first 40 of the shard would hold one label
    positions = [grouped.index(r) for r in sample]
    assert positions == sorted(positions)  # kept in the shard's order
    assert sample == data.sample_records(grouped, 40, seed=3) and sample != data.sample_records(grouped, 40, seed=4)
    assert data.sample_records(grouped, None, seed=3) == grouped == data.sample_records(grouped, len(grouped), seed=3)


# ------------------------------------------------------------------ prompt and tokenization


def test_prompt_templates_are_alpacas():
    assert data.PROMPT_WITH_INPUT == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    )
    assert data.PROMPT_NO_INPUT == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    )
    assert data.format_prompt("Add.", "2 and 3").endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert data.format_prompt("Add.") == data.format_prompt("Add.", "") == data.PROMPT_NO_INPUT.format(instruction="Add.")


RECORDS = [
    {"instruction": "What is 7 plus 5?", "input": "", "output": "7 plus 5 is 12.", "label": "arithmetic"},
    {"instruction": "Spell the given word backwards.", "input": "garden", "output": "nedrag", "label": "spelling"},
]


def test_tokenize_masks_exactly_the_prompt_when_not_training_on_inputs(byte_tokenizer):
    eos = byte_tokenizer.eos_token_id
    masked = data.tokenize_records(RECORDS, byte_tokenizer, train_on_inputs=False)
    unmasked = data.tokenize_records(RECORDS, byte_tokenizer, train_on_inputs=True)

    assert masked.column_names == ["input_ids", "attention_mask", "labels"]
    for record, row, full_row in zip(RECORDS, masked, unmasked):
        prompt_len = len(data.format_prompt(record["instruction"], record["input"]).encode())  # 1 byte = 1 token
        text_len = prompt_len + len(record["output"].encode())
        assert len(row["input_ids"]) == text_len + 1 and row["input_ids"][-1] == eos
        assert row["labels"][:prompt_len] == [data.IGNORE_INDEX] * prompt_len
        assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
        assert row["attention_mask"] == [1] * len(row["input_ids"])
        assert full_row["labels"] == full_row["input_ids"] == row["input_ids"]
        decoded = byte_tokenizer.decode(row["input_ids"], skip_special_tokens=True)
        assert decoded == data.format_prompt(record["instruction"], record["input"]) + record["output"]


def test_tokenize_respects_cutoff_and_appends_eos_once(byte_tokenizer):
    eos = byte_tokenizer.eos_token_id
    short = data.tokenize_records(RECORDS, byte_tokenizer, cutoff_len=60, train_on_inputs=False)
    assert all(len(ids) == 60 for ids in short["input_ids"])
    assert all(ids[-1] != eos for ids in short["input_ids"])  # no room left: not appended (as FLoRA)
    assert all(labels == [data.IGNORE_INDEX] * 60 for labels in short["labels"])  # prompt only

    ends_with_eos = [{**RECORDS[0], "output": "12" + byte_tokenizer.eos_token}]
    (ids,) = data.tokenize_records(ends_with_eos, byte_tokenizer)["input_ids"]
    assert ids[-1] == eos and ids[-2] != eos

    (no_eos,) = data.tokenize_records(RECORDS[:1], byte_tokenizer, add_eos=False)["input_ids"]
    assert eos not in no_eos

    with pytest.raises(FloristError, match="no records to tokenize"):
        data.tokenize_records([], byte_tokenizer)


def test_tokenize_keeps_a_bos_the_tokenizer_adds_and_masks_it():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")

    (row,) = data.tokenize_records(RECORDS[:1], tokenizer, train_on_inputs=False)
    prompt_tokens = len(tokenizer(data.format_prompt(RECORDS[0]["instruction"]), add_special_tokens=False)["input_ids"])
    assert row["input_ids"][0] == 1 and row["input_ids"].count(1) == 1
    assert row["input_ids"][-1] == 2
    assert row["labels"].count(data.IGNORE_INDEX) == 1 + prompt_tokens


def test_collator_pads_to_multiple_of_eight_with_ignored_labels(byte_tokenizer):
    dataset = data.tokenize_records(RECORDS, byte_tokenizer)
    batch = data.make_collator(byte_tokenizer)([dataset[0], dataset[1]])

    longest = max(len(ids) for ids in dataset["input_ids"])
    assert batch["input_ids"].shape[1] == -(-longest // 8) * 8
    shorter = int(np.argmin([len(ids) for ids in dataset["input_ids"]]))
    pad_len = batch["input_ids"].shape[1] - len(dataset[shorter]["input_ids"])
    assert batch["labels"][shorter, -pad_len:].tolist() == [data.IGNORE_INDEX] * pad_len
    assert batch["attention_mask"][shorter, -pad_len:].tolist() == [0] * pad_len


# ------------------------------------------------------------------ shipped demo data


def test_demo_records_load_with_expected_fields():
    records = data.demo_records()

    assert 300 <= len(records) <= 500
    assert all(set(record) == {"instruction", "input", "output", "label"} for record in records)
    labels = Counter(record["label"] for record in records)
    assert len(labels) == 6 and min(labels.values()) >= 50
    assert all(0 < len(record["output"]) < 80 for record in records)
    assert any(record["input"] for record in records) and any(not record["input"] for record in records)
    assert len({(r["instruction"], r["input"]) for r in records}) == len(records)  # no duplicates
    shipped = resources.files("florist_hf") / "demo_data" / "instructions.json"
    assert len(shipped.read_bytes()) < 100_000
    assert {"instruction": "What is the capital of France?", "input": "",
            "output": "The capital of France is Paris.", "label": "capitals"} in records


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_base(tmp_path):
    """A tiny Llama whose tokenizer carries a chat template, as an instruct base's does."""
    from transformers import AutoTokenizer

    from florist_hf.tiny import PAPER_BASES, build_random_llama, scaled_down_config

    name = "TinyLlama/TinyLlama_v1.1"  # its stand-in's tokenizer: BOS and EOS at the real ids, no pad token
    base = build_random_llama(tmp_path / "chat_base", scaled_down_config(PAPER_BASES[name]), base_name=name)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(base)
    return base


def test_chat_template_prompts_mask_the_users_turn_and_train_on_the_answer(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_base(tmp_path))
    records = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
               {"instruction": "Summarise.", "input": "A long text.", "output": "Short."}]
    dataset = data.tokenize_records(records, tokenizer, cutoff_len=256, train_on_inputs=False, template="chat")
    for record, ids, labels in zip(records, dataset["input_ids"], dataset["labels"]):
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id  # the template's BOS, once
        text = tokenizer.decode(ids)
        user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        bos, eos = tokenizer.bos_token, tokenizer.eos_token
        assert text == f"{bos}<|user|>\n{user}{eos}\n<|assistant|>\n{record['output']}{eos}\n"
        answer = tokenizer.decode([token for token, label in zip(ids, labels) if label != data.IGNORE_INDEX])
        assert answer == f"{record['output']}{eos}\n"  # the answer and the turn's end; the user's turn is masked


def test_chat_template_needs_a_tokenizer_that_has_one(tmp_path):
    from transformers import AutoTokenizer

    from florist_hf.tiny import build_tiny_llama

    base = build_tiny_llama(tmp_path / "plain", num_layers=1, hidden_size=32, intermediate_size=64,
                            num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(FloristError, match="data.template: chat needs a tokenizer with a chat template"):
        data.tokenize_records([{"instruction": "a", "input": "", "output": "b"}], AutoTokenizer.from_pretrained(base),
                              template="chat")


def test_a_federation_trains_on_chat_template_prompts(tmp_path):
    from helpers import quiet_console, write_recipe

    from florist_hf.recipe import load_recipe
    from florist_hf.runner import run_federation

    base = chat_base(tmp_path)
    recipe = load_recipe(write_recipe(tmp_path, ranks=(4, 2), rounds=1, data={"template": "chat", "partition": "dirichlet",
                                                               "holdout_per_label": 2, "min_client_size": 10,
                                                               "cutoff_len": 256}),
                         [f"model.name_or_path={base}"])
    run_dir = run_federation(recipe, console=quiet_console())
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["heldout_loss"] > 0 for r in rounds if r["kind"] == "round"] == [True]


def test_a_client_shard_is_what_prepare_client_data_gives_and_reads_only_its_own_file(tmp_path):
    """A Flower node takes its shard with `client_shard`: the same records as the whole split gives
    it; from FLoRA's layout it reads its own file alone, so the others' files need not be there."""
    from florist_hf.recipe import load_recipe

    records = data.demo_records()
    data.save_flora_layout(tmp_path / "split", [records[:30], records[30:50], records[50:90]])
    base = {"model": {"name_or_path": "builtin:tiny-llama"}, "lora": {"ranks": 2}, "federation": {"num_clients": 3},
            "output_dir": str(tmp_path / "run")}
    flora = tmp_path / "flora.yaml"
    flora.write_text(json.dumps({**base, "data": {"layout": "flora", "source": str(tmp_path / "split"), "max_samples_per_client": 12}}))
    demo = tmp_path / "demo.yaml"
    demo.write_text(json.dumps({**base, "data": {"source": "builtin:demo", "partition": "dirichlet", "min_client_size": 20}}))
    for recipe_file in (flora, demo):
        recipe = load_recipe(recipe_file)
        shards, _ = data.prepare_client_data(recipe)
        assert [data.client_shard(recipe, k) for k in range(3)] == shards
    recipe = load_recipe(flora)
    expected = data.prepare_client_data(recipe)[0][2]
    (tmp_path / "split" / "3" / "local_training_0.json").unlink()
    assert data.client_shard(recipe, 2) == expected
    with pytest.raises(FloristError, match="local_training_0.json"):
        data.client_shard(recipe, 0)
