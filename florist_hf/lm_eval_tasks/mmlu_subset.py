"""The FLoRA/FLoRIST 1,444-question MMLU subset: read and check its file, parse its records into
lm-eval's MMLU fields, and average accuracy over subjects. The packaged tasks' dataset hooks call it.

A record is ``{"instruction", "input", "output", "class"}`` with the question and its four options
folded into ``input`` (``"Qusetion: <question> Options: A. <a>, B. <b>, C. <c>, D. <d>"``, the
misspelling is the file's) and the answer in ``output`` (``"The answer is: C. <answer text>"``).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from statistics import fmean

from florist_hf.errors import FloristError

REQUIRED_FIELDS = ("instruction", "input", "output", "class")
LETTERS = ("A", "B", "C", "D")

_GOLD_OUTPUT = re.compile(r"^The answer is: (?P<letter>[A-Z])\.(?: (?P<text>.*))?$", re.DOTALL)
# Every record of the subset holds each of the four markers exactly once, so this split is unique.
_QUESTION_AND_OPTIONS = re.compile(
    r"^Qusetion: (?P<question>.*) Options: A\. (?P<A>.*), B\. (?P<B>.*), C\. (?P<C>.*), D\. (?P<D>.*)$", re.DOTALL
)


def parse_gold_output(gold_output: str) -> tuple[str, str]:
    """Split ``"The answer is: C. Hurler syndrome"`` into ``("C", "Hurler syndrome")``."""
    match = _GOLD_OUTPUT.match(gold_output.strip())
    if match is None:
        raise ValueError(f'gold output {gold_output!r} is not of the form "The answer is: <letter>. <answer text>"')
    return match["letter"], (match["text"] or "").strip()


def parse_question(record_input: str) -> tuple[str, list[str]]:
    """The question and its four options from a record's ``input``."""
    match = _QUESTION_AND_OPTIONS.match(record_input)
    if match is None:
        raise ValueError('input is not of the form "Qusetion: <question> Options: A. <a>, B. <b>, C. <c>, D. <d>"')
    return match["question"], [match[letter] for letter in LETTERS]


def mmlu_fields(record: dict) -> dict:
    """lm-eval's ``cais/mmlu`` fields of a record: question, choices, answer (0-3), subject."""
    question, choices = parse_question(record["input"])
    letter, _ = parse_gold_output(record["output"])
    return {"question": question, "choices": choices, "answer": LETTERS.index(letter), "subject": record["class"]}


def read_subset(data_file: str | Path) -> list[dict]:
    """Read and check the subset: a JSON array of {instruction, input, output, class} records whose
    ``input`` holds a question with options A-D and whose ``output`` names one of them."""
    data_file = Path(data_file)
    if not data_file.is_file():
        raise FloristError(f"{data_file}: MMLU subset file not found; pass the path of mmlu_test_1444.json")
    try:
        records = json.loads(data_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FloristError(f"{data_file}: not valid JSON ({error}); pass the MMLU subset's JSON array") from None
    if not isinstance(records, list) or not records:
        raise FloristError(f"{data_file}: expected a non-empty JSON array of questions")
    for index, record in enumerate(records):
        missing = [name for name in REQUIRED_FIELDS if not isinstance(record, dict) or name not in record]
        if missing:
            raise FloristError(
                f"{data_file}: question {index} lacks {', '.join(missing)}; every question needs {', '.join(REQUIRED_FIELDS)}"
            )
        try:
            letter, _ = parse_gold_output(record["output"])
            parse_question(record["input"])
        except ValueError as error:
            raise FloristError(f"{data_file}: question {index}: {error}") from None
        if letter not in LETTERS:
            raise FloristError(f"{data_file}: question {index}: the answer letter {letter} is not one of A, B, C, D")
    return records


def load_subset(data_file: str | None = None, *, task: str, **other_metadata):
    """The subset as a ``datasets`` test split: each record's own fields and its ``mmlu_fields``.

    lm-eval's ``custom_dataset`` hooks call this with every metadata entry (its own config_source
    and version, and with a model string also the model arguments), hence ``other_metadata``.
    """
    import datasets

    if data_file is None:
        raise FloristError(
            f"{task}: no data_file in the task metadata; "
            'pass --metadata \'{"data_file": "PATH/mmlu_test_1444.json"}\' or florist-hf evaluate --mmlu-file'
        )
    records = [{**record, **mmlu_fields(record)} for record in read_subset(data_file)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})


def macro_average(subject_results: Iterable[tuple[str, bool | float]]) -> float:
    """Mean over subjects of each subject's accuracy, from per-question ``(subject, correct)``."""
    correct_by_subject: dict[str, list[float]] = defaultdict(list)
    for subject, correct in subject_results:
        correct_by_subject[subject].append(float(correct))
    return fmean(fmean(marks) for marks in correct_by_subject.values())
