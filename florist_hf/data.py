"""Training data: loading (Hub, local JSON/JSONL, saved datasets, FLoRA's JSON layout),
federated partitioners, the Alpaca prompt template and tokenization.

Every loader returns records of one format. The instruction presets (dolly, alpaca, wizard, flora)
give *canonical records*: dicts with keys ``instruction``, ``input``, ``output`` and ``label``
(``input`` is "" when the dataset has none, ``label`` is None when it has none). TRL's formats keep
their own keys beside ``label``: ``messages`` (a conversation of role/content turns), ``prompt``
and ``completion`` (two texts, or two conversations), or ``chosen`` and ``rejected`` (preference pairs,
with their ``prompt`` where the data has one). This module does I/O and bookkeeping only; it
contains no aggregation math.

Randomness: the partitioners use ``numpy.random.RandomState`` (the legacy Mersenne Twister), not
``default_rng``, because the paper's Dolly split was drawn with ``np.random.seed(42)`` and the
global legacy generator. With the same stream, ``flora_split`` reproduces the paper's client sizes
exactly. Any function taking ``seed`` also accepts a ``RandomState`` to share one stream.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from florist_hf.errors import FloristError
from florist_hf.loading import describe_load_failure, is_local_reference

if TYPE_CHECKING:
    import datasets
    from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase


CANONICAL_FIELDS = ("instruction", "input", "output", "label")
REQUIRED_FIELDS = ("instruction", "output")

#: Source column for each canonical field, per dataset format (None: the format has no such field).
FIELD_PRESETS: dict[str, dict[str, str | None]] = {
    "dolly": {"instruction": "instruction", "input": "context", "output": "response", "label": "category"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "label": None},
    "wizard": {"instruction": "instruction", "input": None, "output": "output", "label": None},
    # FLoRA's JSON layout as used for the Dolly split; FLoRA's Alpaca and Wizard splits keep the
    # instruction/input/output names, which `infer_format` recognises as "alpaca".
    "flora": {"instruction": "instruction", "input": "context", "output": "response", "label": "category"},
}

#: TRL's dataset formats: their columns, by format name (the first names the format in a record). ``messages`` and
#: ``prompt_completion`` train with ``client.trainer: sft``; ``preference`` (chosen and rejected, and a prompt
#: unless the two share it: the implicit-prompt form) with ``client.trainer: dpo``.
TRL_FORMATS: dict[str, tuple[str, ...]] = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"),
                                           "preference": ("chosen", "rejected")}
#: Columns a TRL format reads where a row has them.
TRL_OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {"preference": ("prompt",)}
#: The trainer that takes each TRL format.
TRL_FORMAT_TRAINERS = {"messages": "sft", "prompt_completion": "sft", "preference": "dpo"}
#: Every data.format, with what its records hold (for the line that names them).
FORMATS_SAID = (
    "dolly, alpaca, wizard, flora (instruction/response columns), messages (TRL's conversational: a list of role/content "
    "turns), prompt_completion (TRL's prompt and completion columns, texts or conversations), preference (TRL's "
    "chosen and rejected columns, with a prompt or sharing one, texts or conversations)"
)

#: Hub dataset ids whose format is known without looking at their columns.
HUB_DATASETS: dict[str, str] = {
    "databricks/databricks-dolly-15k": "dolly",
    "tatsu-lab/alpaca": "alpaca",
    "WizardLM/WizardLM_evol_instruct_70k": "wizard",
}

LOCAL_FILE_SUFFIXES = (".json", ".jsonl")
#: Single data files read by `datasets`' packaged builders, as the Hub's own files are.
DATASETS_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
#: Files `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` leave in their folder.
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

#: Label id the loss ignores (PyTorch's CrossEntropyLoss default, also used by the HF collators).
IGNORE_INDEX = -100

FLORA_TRAIN_FILE = "local_training_{client}.json"
FLORA_TEST_FILE = "global_test.json"


# --------------------------------------------------------------------------------------------
# Field mapping and normalisation
# --------------------------------------------------------------------------------------------


def infer_format(columns: Sequence[str]) -> str | None:
    """The first preset whose instruction and output columns are all present, else the first of TRL's
    formats whose columns are, else None."""
    present = set(columns)
    for name in ("dolly", "alpaca", "wizard"):
        preset = FIELD_PRESETS[name]
        if all(preset[field] in present for field in REQUIRED_FIELDS):
            return name
    return next((name for name, needed in TRL_FORMATS.items() if set(needed) <= present), None)


def resolve_fields(
    columns: Sequence[str],
    *,
    format: str | None = None,
    fields: Mapping[str, str | None] | None = None,
    source: str = "data",
) -> dict[str, str | None]:
    """The column for each canonical field: the named (or inferred) preset, overridden by ``fields``.

    An inferred preset drops optional fields (input, label) whose column the data lacks; a format
    or field the user named is kept as is, so a wrong name fails loudly in `normalize_records`.
    """
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(CANONICAL_FIELDS))
    if unknown:
        raise FloristError(
            f"{source}: unknown key(s) {', '.join(unknown)} in data.fields; "
            f"use {', '.join(CANONICAL_FIELDS)}"
        )
    if format is not None:
        if format not in FIELD_PRESETS:
            raise FloristError(f"{source}: unknown data.format '{format}'; use one of {FORMATS_SAID}")
        return {**FIELD_PRESETS[format], **fields}
    inferred = infer_format(columns)
    if inferred is not None and inferred not in TRL_FORMATS:
        preset = dict(FIELD_PRESETS[inferred])
        for field in ("input", "label"):
            if preset[field] not in set(columns):
                preset[field] = None
        return {**preset, **fields}
    resolved: dict[str, str | None] = {**dict.fromkeys(CANONICAL_FIELDS), **fields}
    if any(resolved[field] is None for field in REQUIRED_FIELDS):
        raise FloristError(
            f"{source}: its columns ({', '.join(sorted(columns))}) fit no data format; set data.format to one of "
            f"{FORMATS_SAID}, or data.fields.instruction and data.fields.output to text columns"
        )
    return resolved


def _as_text(value: Any, *, source: str, index: int, column: str, field: str) -> str:
    """A text field as it is; anything else (a list, a number, an object) is refused, never turned into text."""
    if isinstance(value, str):
        return value
    kind = type(value).__name__
    hint = (" (a conversation of role/content turns is data.format: messages)"
            if isinstance(value, list) and value and all(isinstance(item, dict) for item in value) else "")
    raise FloristError(f"{source}: row {index}'s '{column}' ({field}) is a {kind}, not text{hint}; "
                       f"point data.fields.{field} to a text column")


def normalize_records(
    rows: Sequence[Mapping[str, Any]],
    fields: Mapping[str, str | None],
    *,
    source: str = "records",
) -> list[dict]:
    """Map raw rows to canonical records using ``fields`` (canonical field -> source column).

    Every column named in ``fields`` must exist in the data; instruction and output must be set in
    every row. A null or absent input becomes "", a null or absent label None.
    """
    for field in REQUIRED_FIELDS:
        if not fields.get(field):
            raise FloristError(f"{source}: no column given for {field}; set data.fields.{field}")
    columns: set[str] = set()
    for row in rows:
        columns.update(row)
    for field in (*REQUIRED_FIELDS, "input", "label"):  # the required ones first: the likelier fix
        column = fields.get(field)
        if column is not None and rows and column not in columns:
            raise FloristError(
                f"{source}: no column '{column}' for the {field} field "
                f"(columns: {', '.join(sorted(columns))}); set data.fields.{field} to the right column"
            )

    input_column, label_column = fields.get("input"), fields.get("label")
    records = []
    for index, row in enumerate(rows):
        for field in REQUIRED_FIELDS:
            if row.get(fields[field]) is None:
                raise FloristError(
                    f"{source}: row {index} has no '{fields[field]}' ({field}); "
                    f"fix the row or set data.fields.{field}"
                )
        input_value = row.get(input_column) if input_column else None
        text = {field: _as_text(row[fields[field]], source=source, index=index, column=fields[field], field=field)
                for field in REQUIRED_FIELDS}
        records.append(
            {
                "instruction": text["instruction"],
                "input": "" if input_value is None else _as_text(input_value, source=source, index=index,
                                                                 column=input_column, field="input"),
                "output": text["output"],
                "label": row.get(label_column) if label_column else None,
            }
        )
    return records


def _conversation(value: Any, *, source: str, index: int, column: str) -> str | None:
    """Why ``value`` is not a conversation of role/content text turns, or None when it is one."""
    if not isinstance(value, list) or not value:
        return f"row {index}'s '{column}' is a {type(value).__name__ if value else 'empty list'}, not a list of turns"
    for turn, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"row {index}'s '{column}' turn {turn} is not a {{\"role\": ..., \"content\": ...}} object"
        if not isinstance(message.get("content"), str):
            content = type(message.get("content")).__name__
            return f"row {index}'s '{column}' turn {turn} has content of type {content}, not text"
    return None


def trl_records(rows: Sequence[Mapping[str, Any]], format: str, *, label: str | None = None,  # noqa: A002
                source: str = "records") -> list[dict]:
    """Rows in one of TRL's formats (`TRL_FORMATS`) as records: their own columns and ``label``.

    ``messages``: a conversation with at least one assistant turn. ``prompt_completion``: two texts,
    or two conversations whose completion holds an assistant turn. ``preference``: chosen and rejected
    (and the prompt, where the row has one) all texts, or all conversations whose chosen and rejected
    each hold an assistant turn (without a prompt they share theirs: TRL's implicit-prompt form, as
    Anthropic/hh-rlhf and trl-lib/ultrafeedback_binarized have it). Anything else is refused with
    the row, the column and why, so that nothing is trained on the text of a Python list.
    """
    records = []
    for index, row in enumerate(rows):
        missing = [column for column in TRL_FORMATS[format] if row.get(column) is None]
        if missing:
            raise FloristError(f"{source}: row {index} has no '{missing[0]}' (data.format: {format} needs "
                               f"{' and '.join(TRL_FORMATS[format])}); fix the row or its format")
        columns = [*TRL_FORMATS[format], *(c for c in TRL_OPTIONAL_COLUMNS.get(format, ()) if row.get(c) is not None)]
        if format == "messages":
            conversations, answers = {"messages": row["messages"]}, ["messages"]
        else:
            answers = [column for column in columns if column != "prompt"]
            kinds = {type(row[column]) for column in columns}
            if kinds == {str}:
                conversations = {}
            elif kinds == {list}:
                conversations = {column: row[column] for column in columns}
            else:
                said = " and ".join(f"a {type(row[column]).__name__} {column}" for column in columns)
                every = "both" if len(columns) == 2 else "all"
                raise FloristError(f"{source}: row {index} has {said}; {every} must be text, or {every} conversations "
                                   "(lists of role/content turns)")
        for column, value in conversations.items():
            problem = _conversation(value, source=source, index=index, column=column)
            if problem:
                raise FloristError(f"{source}: {problem}; data.format: {format} needs role/content text turns")
        for column in answers if conversations else ():
            if not any(message["role"] == "assistant" for message in conversations[column]):
                raise FloristError(f"{source}: row {index}'s conversation ('{column}') has no assistant turn, so nothing in "
                                   "it is an answer to train on; add the assistant's reply or drop the row")
        records.append({**{column: row[column] for column in columns}, "label": row.get(label) if label else None})
    return records


def records_from_rows(rows: Sequence[Mapping[str, Any]], *, format: str | None = None,  # noqa: A002
                      fields: Mapping[str, str | None] | None = None, source: str = "records") -> list[dict]:
    """Rows as records of their format: ``format`` if given, else the one their columns fit."""
    columns = sorted(set().union(*(row.keys() for row in rows))) if rows else []
    chosen = format if format is not None else (None if fields and set(fields) - {"label"} else infer_format(columns))
    if chosen in TRL_FORMATS:
        extra = sorted(set(fields or {}) - {"label"})
        if extra:
            raise FloristError(f"{source}: data.fields.{extra[0]} maps instruction records; data.format: {chosen} "
                               "reads its own columns (data.fields.label alone may name a label column)")
        return trl_records(rows, chosen, label=(fields or {}).get("label"), source=source)
    resolved = resolve_fields(columns, format=format, fields=fields, source=source)
    return normalize_records(rows, resolved, source=source)


def record_format(records: Sequence[Mapping[str, Any]]) -> str:
    """``instruction`` (canonical records), or the name of the TRL format the records are in."""
    first = records[0] if records else {}
    return next((name for name, columns in TRL_FORMATS.items() if set(columns) <= set(first)), "instruction")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _parse_json_lines(text: str, path: Path) -> list:
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise FloristError(
                f"{path}: line {line_number} is not valid JSON ({error.msg}); "
                "expected a JSON array of records or one JSON object per line"
            ) from None
    return rows


def _read_json_rows(path: Path) -> list[dict]:
    """A JSON array of objects (.json) or one object per line (.jsonl, or a .json that is not one array)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = _parse_json_lines(text, path)
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            rows = _parse_json_lines(text, path)  # JSON lines saved under a .json name
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise FloristError(f"{path}: expected a JSON array of records (objects) or one JSON object per line")
    return rows


def _rows_from_disk(path: Path, split: str) -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise FloristError(
            f"{path}: not a dataset saved with datasets' save_to_disk ({error}); "
            f"give a .json/.jsonl file or a saved dataset folder"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise FloristError(f"{path}: no split '{split}' (splits: {', '.join(loaded)}); set data.split")
        loaded = loaded[split]
    return loaded.to_list()


def _split_failure(error: Exception, source: str, split: str) -> FloristError | None:
    """A missing split, named with the splits that exist; None for any other failure."""
    message = str(error)
    if isinstance(error, ValueError) and "Unknown split" in message:
        return FloristError(f"{source}: no split '{split}' ({message.splitlines()[0]}); set data.split")
    return None


def _rows_from_hub(source: str, split: str) -> list[dict]:
    """Rows of a Hub dataset, or of a local folder laid out like one (the same builder inference)."""
    import datasets

    try:
        return datasets.load_dataset(source, split=split).to_list()
    except Exception as error:  # noqa: BLE001 - datasets raises many types; the user needs one line
        raise _split_failure(error, source, split) or describe_load_failure(
            error, source, what="dataset", key="data.source", repo_type="dataset"
        ) from None


def _rows_from_file(path: Path, split: str) -> list[dict]:
    """Rows of one .parquet/.csv/.arrow file, through `datasets`' packaged builder for it."""
    import datasets

    try:
        return datasets.load_dataset(DATASETS_FILE_BUILDERS[path.suffix], data_files={split: str(path)}, split=split).to_list()
    except Exception as error:  # noqa: BLE001 - pyarrow and datasets raise many types
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise FloristError(f"{path}: not a readable {path.suffix[1:]} file ({reason}); check data.source") from None


def load_records(
    source: str | os.PathLike,
    *,
    format: str | None = None,
    fields: Mapping[str, str | None] | None = None,
    split: str = "train",
) -> list[dict]:
    """Canonical records from a Hub dataset id or local data.

    Local data is a .json/.jsonl file, a .parquet/.csv/.arrow file, a folder saved with
    ``save_to_disk``, or a folder laid out like a Hub dataset repository (e.g. a clone or
    ``hf download --repo-type dataset``), which `datasets.load_dataset` reads exactly as it reads
    the Hub id. The format is ``format`` if given, else known from `HUB_DATASETS`, else inferred
    from the columns; ``fields`` overrides single columns of it. Local data never touches the network.
    """
    source_text = os.fspath(source)
    path = Path(source_text).expanduser()
    if path.is_dir():
        if any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS):
            rows = _rows_from_disk(path, split)
        else:
            rows = _rows_from_hub(str(path), split)
    elif path.is_file():
        if path.suffix in DATASETS_FILE_BUILDERS:
            rows = _rows_from_file(path, split)
        elif path.suffix in LOCAL_FILE_SUFFIXES:
            rows = _read_json_rows(path)
        else:
            raise FloristError(
                f"{path}: unsupported data file type '{path.suffix}'; use .json (array), .jsonl, .parquet, .csv, "
                "a folder saved with datasets' save_to_disk, or a folder laid out like a Hub dataset"
            )
    elif source_text.endswith((*LOCAL_FILE_SUFFIXES, *DATASETS_FILE_BUILDERS)) or is_local_reference(source_text):
        raise FloristError(f"data file or folder not found: {path}; check data.source")
    else:
        rows = _rows_from_hub(source_text, split)
        format = format or HUB_DATASETS.get(source_text)
    if not rows:
        raise FloristError(f"{source_text}: no records found; check data.source and data.split")
    return records_from_rows(rows, format=format, fields=fields, source=source_text)


def load_flora_layout(
    data_dir: str | os.PathLike,
    num_clients: int,
    *,
    format: str | None = None,
    fields: Mapping[str, str | None] | None = None,
) -> tuple[list[list[dict]], list[dict]]:
    """Client and test records from FLoRA's layout: ``<data_dir>/<K>/local_training_<k>.json``
    for k < K, plus an optional ``global_test.json`` (absent: empty test list).

    The format is inferred from the first client file's columns unless ``format`` is given.
    """
    root = Path(data_dir).expanduser()
    split_dir = root / str(num_clients)
    expected = f"{split_dir}/{FLORA_TRAIN_FILE.format(client='<k>')} for k < {num_clients}"
    if not root.is_dir():
        raise FloristError(f"FLoRA data folder not found: {root}; expected {expected}")
    if not split_dir.is_dir():
        found = sorted(child.name for child in root.iterdir() if child.is_dir())
        hint = (
            f"; {root} itself holds client files, so set data.source to its parent {root.parent}"
            if (root / FLORA_TRAIN_FILE.format(client=0)).is_file()
            else f" (subfolders: {', '.join(found) or 'none'})"
        )
        raise FloristError(f"no {num_clients}-client split in {root}: expected {expected}{hint}")

    resolved: dict[str, str | None] | None = None

    def read(path: Path) -> list[dict]:
        nonlocal resolved
        records, resolved = _read_flora_file(path, format, fields, resolved)
        return records

    client_records = []
    for client in range(num_clients):
        path = split_dir / FLORA_TRAIN_FILE.format(client=client)
        if not path.is_file():
            raise FloristError(f"missing client file {path}; expected {expected}")
        client_records.append(read(path))
    test_path = split_dir / FLORA_TEST_FILE
    test_records = read(test_path) if test_path.is_file() else []
    return client_records, test_records


def _read_flora_file(path: Path, format: str | None, fields, resolved: dict | None) -> tuple[list[dict], dict]:  # noqa: A002
    """One file of FLoRA's layout as records, and the field mapping (inferred from its columns
    unless ``resolved`` or ``format`` says)."""
    rows = _read_json_rows(path)
    columns = sorted(set().union(*(row.keys() for row in rows)))
    if resolved is None and (format in TRL_FORMATS or (format is None and not fields and infer_format(columns) in TRL_FORMATS)):
        return records_from_rows(rows, format=format, fields=fields, source=str(path)), None
    if resolved is None:
        resolved = resolve_fields(columns, format=format, fields=fields, source=str(path))
    return normalize_records(rows, resolved, source=str(path)), resolved


def save_flora_layout(
    data_dir: str | os.PathLike,
    client_records: Sequence[Sequence[Mapping[str, Any]]],
    test_records: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write canonical records in FLoRA's layout (Dolly column names); returns ``<data_dir>/<K>``."""
    split_dir = Path(data_dir).expanduser() / str(len(client_records))
    split_dir.mkdir(parents=True, exist_ok=True)
    names = FIELD_PRESETS["flora"]

    def dump(records: Sequence[Mapping[str, Any]], path: Path) -> None:
        rows = [{names[field]: record[field] for field in CANONICAL_FIELDS} for record in records]
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")

    for client, records in enumerate(client_records):
        dump(records, split_dir / FLORA_TRAIN_FILE.format(client=client))
    if test_records:
        dump(test_records, split_dir / FLORA_TEST_FILE)
    return split_dir


def demo_records() -> list[dict]:
    """The small instruction set shipped with the package (written for demos and tests)."""
    resource = resources.files("florist_hf") / "demo_data" / "instructions.json"
    rows = json.loads(resource.read_text(encoding="utf-8"))
    return normalize_records(rows, FIELD_PRESETS["dolly"], source="florist_hf/demo_data/instructions.json")


# --------------------------------------------------------------------------------------------
# Partitioners
# --------------------------------------------------------------------------------------------
# flwr-datasets has a comparable DirichletPartitioner, but installing it downgrades datasets and
# huggingface_hub here, so we keep our own (it is also the exact algorithm of FLoRA's split script).


def _random_state(seed: int | np.random.RandomState) -> np.random.RandomState:
    return seed if isinstance(seed, np.random.RandomState) else np.random.RandomState(seed)


def _check_num_clients(num_clients: int, num_examples: int) -> None:
    if num_clients < 1:
        raise FloristError(f"num_clients must be at least 1, got {num_clients}")
    if num_examples < num_clients:
        raise FloristError(
            f"cannot split {num_examples} examples over {num_clients} clients; use fewer clients or more data"
        )


def iid_partition(num_examples: int, num_clients: int, seed: int | np.random.RandomState) -> list[list[int]]:
    """A random permutation cut into ``num_clients`` parts whose sizes differ by at most one."""
    _check_num_clients(num_clients, num_examples)
    permutation = _random_state(seed).permutation(num_examples)
    return [part.tolist() for part in np.array_split(permutation, num_clients)]


def labels_of(records: Sequence[Mapping[str, Any]], *, source: str = "records", needed_by: str = "a label-based split",
              otherwise: str = "use an iid split") -> list[Hashable]:
    """The label of every record; a record without one is an error naming the ``source`` and the
    setting that needs labels (``needed_by``), with the way to do without them (``otherwise``)."""
    labels = [record.get("label") for record in records]
    missing = [index for index, label in enumerate(labels) if label is None]
    if missing:
        raise FloristError(
            f"{source}: {len(missing)} record(s) have no label (first: row {missing[0]}); {needed_by} needs every "
            f"record's label: set data.fields.label to the category column, or {otherwise}"
        )
    return labels


def dirichlet_partition(
    labels: Sequence[Hashable],
    num_clients: int,
    alpha: float,
    seed: int | np.random.RandomState,
    min_size: int = 40,
    self_balancing: bool = True,
    max_attempts: int = 1000,
) -> list[list[int]]:
    """Label-skewed split (Hsu et al. 2019, as in FLoRA's ``client_data_allocation.py``).

    For each label in sorted order: shuffle its examples, draw client proportions from
    Dirichlet(alpha), and cut. With ``self_balancing``, a client already holding >= N/K examples
    gets proportion 0 for the remaining labels (a full client takes no more). The whole draw is
    repeated until every client holds >= ``min_size`` examples, at most ``max_attempts`` times.
    Each client's indices come grouped by label, in label order, shuffled within a label.
    """
    num_examples = len(labels)
    _check_num_clients(num_clients, num_examples)
    if alpha <= 0:
        raise FloristError(f"Dirichlet alpha must be positive, got {alpha}")
    if min_size * num_clients > num_examples:
        raise FloristError(
            f"cannot give each of {num_clients} clients {min_size} examples out of {num_examples}; "
            "lower data.min_client_size or federation.num_clients"
        )
    random_state = _random_state(seed)
    label_array = np.asarray(labels, dtype=object)
    indices_by_label = [np.flatnonzero(label_array == label) for label in sorted(set(labels))]
    full_size = num_examples / num_clients

    for _ in range(max_attempts):
        client_indices: list[list[int]] = [[] for _ in range(num_clients)]
        for label_indices in indices_by_label:
            label_indices = label_indices.copy()
            random_state.shuffle(label_indices)
            proportions = random_state.dirichlet(np.repeat(alpha, num_clients))
            if self_balancing:
                has_room = np.array([len(indices) < full_size for indices in client_indices])
                proportions = proportions * has_room
                if not proportions.sum() > 0:  # every open client drew 0 (tiny alpha underflow)
                    proportions = has_room.astype(float)
            cumulative = np.cumsum(proportions / proportions.sum())
            # The float cumsum can end just below 1, which would leak a rounding example to a
            # trailing client with proportion 0 (e.g. a full one); pin it to 1 from the last
            # client with a share on. FLoRA's script has this leak; the paper's split is unaffected.
            cumulative[np.flatnonzero(proportions)[-1]:] = 1.0
            cut_points = (cumulative * len(label_indices)).astype(int)[:-1]
            for indices, chunk in zip(client_indices, np.split(label_indices, cut_points)):
                indices.extend(chunk.tolist())
        if min(len(indices) for indices in client_indices) >= min_size:
            return client_indices
    raise FloristError(
        f"no Dirichlet(alpha={alpha}) split gave every one of {num_clients} clients {min_size} "
        f"examples in {max_attempts} attempts; lower data.min_client_size, raise data.dirichlet_alpha, or lower "
        "federation.num_clients"
    )


def holdout_per_label(
    records: Sequence[Mapping[str, Any]],
    per_label: int,
    seed: int | np.random.RandomState,
) -> tuple[list[dict], list[dict]]:
    """Move ``per_label`` random records of every label to a test list.

    Labels are visited in sorted order and each draws ``permutation(count)[:per_label]``, the
    stream FLoRA's ``groupby(...).sample(n)`` consumed. Train keeps the input order; test is
    grouped by label.
    """
    labels = labels_of(records, needed_by="a per-label hold-out", otherwise="hold none out")
    random_state = _random_state(seed)
    label_array = np.asarray(labels, dtype=object)
    test_indices: list[int] = []
    for label in sorted(set(labels)):
        label_indices = np.flatnonzero(label_array == label)
        if len(label_indices) < per_label:
            raise FloristError(
                f"label '{label}' has only {len(label_indices)} records, fewer than the "
                f"{per_label} to hold out per label; lower the held-out count"
            )
        test_indices.extend(label_indices[random_state.permutation(len(label_indices))[:per_label]].tolist())
    held_out = set(test_indices)
    train = [dict(record) for index, record in enumerate(records) if index not in held_out]
    test = [dict(records[index]) for index in test_indices]
    return train, test


def sample_records(
    records: Sequence[Mapping[str, Any]], count: int | None, seed: int | np.random.RandomState
) -> list[dict]:
    """At most ``count`` records drawn without replacement by a seeded shuffle, kept in their order.

    A Dirichlet shard comes grouped by label, so its first ``count`` records would hold only its
    first categories; a random draw keeps the shard's label mix. None or a count >= the size: all.
    """
    if count is None or count >= len(records):
        return [dict(record) for record in records]
    chosen = np.sort(_random_state(seed).permutation(len(records))[:count])
    return [dict(records[index]) for index in chosen]


def flora_split(
    records: Sequence[Mapping[str, Any]],
    num_clients: int,
    *,
    alpha: float = 0.5,
    seed: int = 42,
    test_per_label: int = 10,
    min_size: int = 40,
) -> tuple[list[list[dict]], list[dict]]:
    """The paper's Dolly procedure: hold out ``test_per_label`` per label, then a self-balancing
    Dirichlet split of the rest, all from one ``RandomState(seed)`` stream. On Dolly-15k with the
    defaults this gives the paper's client sizes [1579, 685, 3775, 1830, 2152, 1776, 2531, 607].
    """
    random_state = np.random.RandomState(seed)
    train, test = holdout_per_label(records, test_per_label, random_state)
    parts = dirichlet_partition(labels_of(train), num_clients, alpha, random_state, min_size=min_size)
    return [[train[index] for index in part] for part in parts], test


# --------------------------------------------------------------------------------------------
# A recipe's shards
# --------------------------------------------------------------------------------------------


def client_sample_seed(data_seed: int, client_id: int) -> int:
    """The seed of client ``client_id``'s draw of ``data.max_samples_per_client`` records."""
    return data_seed * 1_000_003 + client_id


def prepare_client_data(recipe) -> tuple[list[list[dict]], list[dict]]:
    """Every client's records and the held-out test records, as the recipe's data section says."""
    section, num_clients = recipe.data, recipe.federation.num_clients
    # What needs the records' labels, and the setting that does without them.
    label_needs = [(f"data.partition: {section.partition}", "data.partition: iid")] if section.partition == "dirichlet" else []
    if section.holdout_per_label:
        label_needs.append((f"data.holdout_per_label: {section.holdout_per_label}", "data.holdout_per_label: 0"))
    if section.layout == "flora":
        shards, test = load_flora_layout(section.source, num_clients, format=section.format, fields=section.fields)
    else:
        if section.source == "builtin:demo":
            records = demo_records()
        else:
            records = load_records(section.source, format=section.format, fields=section.fields, split=section.split)
        if label_needs:
            labels_of(records, source=section.source, needed_by=" and ".join(need for need, _ in label_needs),
                      otherwise=" and ".join(fix for _, fix in label_needs))
        if section.partition == "dirichlet":
            shards, test = flora_split(
                records, num_clients, alpha=section.dirichlet_alpha, seed=section.seed,
                test_per_label=section.holdout_per_label, min_size=section.min_client_size,
            )
        else:
            random_state = np.random.RandomState(section.seed)
            # A per-label hold-out needs labels; an iid split of unlabelled data (Alpaca, WizardLM) does not.
            if section.holdout_per_label:
                train, test = holdout_per_label(records, section.holdout_per_label, random_state)
            else:
                train, test = records, []
            parts = iid_partition(len(train), num_clients, random_state)
            shards = [[train[index] for index in part] for part in parts]
    return [_client_sample(recipe, client_id, shard) for client_id, shard in enumerate(shards)], test


def _client_sample(recipe, client_id: int, shard: list[dict]) -> list[dict]:
    """A client's shard as it trains on it: its ``max_samples_per_client`` draw; never empty."""
    section, num_clients = recipe.data, recipe.federation.num_clients
    if section.max_samples_per_client:
        shard = sample_records(shard, section.max_samples_per_client, client_sample_seed(section.seed, client_id))
    if not shard:
        fix = (
            f"add records to {num_clients}/local_training_{client_id}.json or use a split with more data"
            if section.layout == "flora"
            else "lower federation.num_clients or raise data.min_client_size"
        )
        raise FloristError(f"{section.source}: client {client_id}'s shard is empty; {fix}")
    return shard


def client_shard(recipe, client_id: int) -> list[dict]:
    """One client's training records, exactly as `prepare_client_data` gives them. From FLoRA's
    layout only that client's own file is read (a Flower node need not hold the others'); a
    partition of one dataset (Dirichlet, iid) needs the whole of it, so that is split."""
    section = recipe.data
    if section.layout != "flora":
        return prepare_client_data(recipe)[0][client_id]
    path = Path(section.source).expanduser() / str(recipe.federation.num_clients) / FLORA_TRAIN_FILE.format(client=client_id)
    if not path.is_file():
        raise FloristError(f"missing client file {path}: FLoRA's layout needs local_training_{client_id}.json for client {client_id}")
    records, _ = _read_flora_file(path, section.format, section.fields, None)
    return _client_sample(recipe, client_id, records)


# --------------------------------------------------------------------------------------------
# Prompt and tokenization
# --------------------------------------------------------------------------------------------


def format_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - the field's name
    """The Alpaca prompt, up to and including "### Response:\\n"."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def chat_texts(records: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], list[str]]:
    """(prompt, prompt + response) texts of each record through the tokenizer's chat template:
    the instruction (and input, after a blank line) as the user's turn, the output as the
    assistant's. The prompt ends where the assistant's answer starts (the generation prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise FloristError(
            f"data.template: chat needs a tokenizer with a chat template, and {tokenizer.name_or_path!r} has none; "
            "use an instruct base or data.template: alpaca"
        )
    prompts, full_texts = [], []
    for record in records:
        user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        conversation = [{"role": "user", "content": user}]
        prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(conversation + [{"role": "assistant", "content": record["output"]}], tokenize=False)
        if not full.startswith(prompt):  # a template that rewrites earlier turns: the prompt mask would be wrong
            raise FloristError(
                f"data.template: chat: {tokenizer.name_or_path!r}'s chat template does not extend the prompt with the "
                "answer (the prompt is not a prefix of the full conversation); use data.template: alpaca"
            )
        prompts.append(prompt)
        full_texts.append(full)
    return prompts, full_texts


def prompt_ids(records: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, *,
               template: str = "alpaca") -> list[list[int]]:
    """The token ids of each record's prompt, up to where its answer starts, exactly as
    `tokenize_records` writes them (what a model is asked to continue when it answers)."""
    if template == "chat":
        prompts = chat_texts([{**record, "output": record.get("output") or ""} for record in records], tokenizer)[0]
        prefix = []
    else:
        prompts = [format_prompt(record["instruction"], record.get("input", "")) for record in records]
        prefix = [tokenizer.bos_token_id] if _tokenizer_adds_bos(tokenizer) else []
    return [prefix + list(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]


def _tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    # We tokenize without special tokens so that EOS handling is ours for every tokenizer, but keep
    # a BOS where the tokenizer would add one itself (Llama does; FLoRA trained with it).
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def tokenize_records(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    cutoff_len: int = 512,
    train_on_inputs: bool = True,
    add_eos: bool = True,
    template: str = "alpaca",
) -> datasets.Dataset:
    """A Dataset of input_ids, attention_mask and labels for causal-LM training (FLoRA's `tokenize`).

    Text = prompt + output, truncated to ``cutoff_len`` tokens; EOS is appended when it is not
    already last and there is room. Labels equal input_ids, except that the prompt tokens are
    IGNORE_INDEX when ``train_on_inputs`` is False. With ``template="chat"`` the text is the
    tokenizer's chat template applied to the record as a user turn and an assistant turn (see
    `chat_texts`): the template writes BOS and ends the assistant's turn itself.
    """
    import datasets

    if not records:
        raise FloristError("no records to tokenize; check the data source and the client split")
    eos = tokenizer.eos_token_id
    if template == "chat":
        prompts, full_texts = chat_texts(records, tokenizer)
        prefix, add_eos = [], False
    else:
        if add_eos and eos is None:
            raise FloristError("the tokenizer has no eos_token; set one on the tokenizer or pass add_eos=False")
        prefix = [tokenizer.bos_token_id] if _tokenizer_adds_bos(tokenizer) else []
        prompts = [format_prompt(record["instruction"], record["input"]) for record in records]
        full_texts = [prompt + record["output"] for prompt, record in zip(prompts, records)]
    full_ids = tokenizer(full_texts, add_special_tokens=False)["input_ids"]
    prompt_ids = [] if train_on_inputs else tokenizer(prompts, add_special_tokens=False)["input_ids"]

    columns: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for index, ids in enumerate(full_ids):
        input_ids = (prefix + list(ids))[:cutoff_len]
        if add_eos and len(input_ids) < cutoff_len and (not input_ids or input_ids[-1] != eos):
            input_ids.append(eos)
        labels = list(input_ids)
        if not train_on_inputs:
            prompt_len = min(len(prefix) + len(prompt_ids[index]), len(labels))
            labels[:prompt_len] = [IGNORE_INDEX] * prompt_len
        columns["input_ids"].append(input_ids)
        columns["attention_mask"].append([1] * len(input_ids))
        columns["labels"].append(labels)
    return datasets.Dataset.from_dict(columns)


class PackedRowsCollator:
    """Padding-free batches: a batch's records packed into rows, each record's positions restarting
    at 0 and its first label IGNORE_INDEX, and no attention mask, so that transformers' attention
    (sdpa, eager, flex, FlashAttention) keeps the records of a row apart from the positions alone.

    With ``one_row`` the whole batch is one row (for FlashAttention's variable-length kernels,
    which skip what the records do not share). Otherwise the records go longest first into the
    first row with room for them, rows no longer than the batch's longest record: attention
    without such a kernel computes a row's whole square, so no row then costs more than a padded
    row of the same batch, and there are never more rows. Rows are filled up to the longest with
    a last block of pad tokens, positions of their own and labels IGNORE_INDEX, which nothing else
    attends to.

    The trained tokens are those of the padded batch: a padded row never predicts its first token
    either (the causal shift drops it), so the loss and the Trainer's token count are the same.
    """

    def __init__(self, pad_token_id: int, one_row: bool = False):
        self.pad_token_id = pad_token_id
        self.one_row = one_row

    def rows(self, lengths: Sequence[int]) -> list[list[int]]:
        """The records (indices into ``lengths``) of each row, first fit, longest first."""
        if self.one_row:
            return [list(range(len(lengths)))]
        capacity = max(lengths)
        rows: list[list[int]] = []
        filled: list[int] = []
        for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            row = next((r for r, used in enumerate(filled) if used + lengths[index] <= capacity), None)
            if row is None:
                rows.append([])
                filled.append(0)
                row = len(rows) - 1
            rows[row].append(index)
            filled[row] += lengths[index]
        return rows

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict:
        import torch

        lengths = [len(feature["input_ids"]) for feature in features]
        rows = self.rows(lengths)
        width = max(sum(lengths[i] for i in row) for row in rows)
        input_ids, position_ids, labels = [], [], []
        for row in rows:
            ids, positions, row_labels = [], [], []
            for index in row:
                feature = features[index]
                ids += list(feature["input_ids"])
                positions += range(lengths[index])
                row_labels += [IGNORE_INDEX, *list(feature.get("labels", feature["input_ids"]))[1:]]
            padding = width - len(ids)
            input_ids.append(ids + [self.pad_token_id] * padding)
            position_ids.append(positions + list(range(padding)))
            row_labels += [IGNORE_INDEX] * padding
            labels.append(row_labels)
        return {"input_ids": torch.tensor(input_ids), "position_ids": torch.tensor(position_ids),
                "labels": torch.tensor(labels)}


def make_collator(tokenizer: PreTrainedTokenizerBase, batching: str = "padded", one_row: bool = False):
    """The batches of `tokenize_records`' rows, labels masked as they are.

    ``padded``: dynamic padding (to a multiple of 8) with labels padded by IGNORE_INDEX. A
    tokenizer without a pad token (Llama) gets its EOS as pad token: padded positions have
    attention 0 and label IGNORE_INDEX, so the choice does not change the loss.

    ``padding_free``: `PackedRowsCollator` (``one_row``: the whole batch in one row).
    """
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise FloristError("the tokenizer has neither a pad_token nor an eos_token; set a pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    if batching == "padding_free":
        return PackedRowsCollator(tokenizer.pad_token_id, one_row)
    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8
    )
