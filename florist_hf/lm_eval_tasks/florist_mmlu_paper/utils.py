"""Dataset hook, prompt and scoring of the paper's MMLU protocol (see florist_mmlu_paper.yaml).

lm-eval loads this file by path from the YAML; the scoring functions are pure so that tests and
other code can import them as ``florist_hf.lm_eval_tasks.florist_mmlu_paper.utils``.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from statistics import fmean

from florist_hf.errors import FloristError

#: The Alpaca "prompt_input" template the reference used, followed by its answer primer.
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ANSWER_PRIMER = "The answer is: "
REQUIRED_FIELDS = ("instruction", "input", "output", "class")

_GOLD_OUTPUT = re.compile(r"^The answer is: (?P<letter>[A-Z])\.(?: (?P<text>.*))?$", re.DOTALL)


def parse_gold_output(gold_output: str) -> tuple[str, str]:
    """Split ``"The answer is: C. Hurler syndrome"`` into ``("C", "Hurler syndrome")``."""
    match = _GOLD_OUTPUT.match(gold_output.strip())
    if match is None:
        raise ValueError(f'gold output {gold_output!r} is not of the form "The answer is: <letter>. <answer text>"')
    return match["letter"], (match["text"] or "").strip()


def score_answer(generation: str, gold_output: str) -> bool:
    """The paper's rule: right when the generation contains ``"<letter>."`` or the answer text.

    ``generation`` is what the model wrote after the primer. The reference matched against the
    primer plus the generation, which is the same test since the primer holds no ``"X."``. It
    also cut the answer text at its first ``". "`` (14 of the 1,444 answers contain one); we match
    the whole answer text, which is what the rule says.
    """
    letter, answer_text = parse_gold_output(gold_output)
    # An empty answer text would be "contained" in every generation.
    return f"{letter}." in generation or (bool(answer_text) and answer_text in generation)


def macro_average(subject_results: Iterable[tuple[str, bool | float]]) -> float:
    """Mean over subjects of each subject's accuracy, from per-question ``(subject, correct)``."""
    correct_by_subject: dict[str, list[float]] = defaultdict(list)
    for subject, correct in subject_results:
        correct_by_subject[subject].append(float(correct))
    return fmean(fmean(marks) for marks in correct_by_subject.values())


def paper_prompt(doc: dict) -> str:
    return PROMPT_TEMPLATE.format(instruction=doc["instruction"], input=doc["input"]) + ANSWER_PRIMER


def process_results(doc: dict, results: list[str]) -> dict:
    correct = score_answer(results[0], doc["output"])
    return {"macro_acc": (doc["class"], correct), "acc": float(correct)}


def read_paper_subset(data_file: str | Path) -> list[dict]:
    """Read and check the subset: a JSON array of {instruction, input, output, class} records."""
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
            parse_gold_output(record["output"])
        except ValueError as error:
            raise FloristError(f"{data_file}: question {index}: {error}") from None
    return records


def load_paper_subset(data_file: str | None = None, **other_metadata):
    """lm-eval's ``custom_dataset`` hook: the task metadata's ``data_file`` as a test split.

    lm-eval passes every metadata entry (its own config_source and version, and with a model
    string also the model arguments) as keyword arguments, hence ``other_metadata``.
    """
    import datasets

    if data_file is None:
        raise FloristError(
            "florist_mmlu_paper: no data_file in the task metadata; "
            'pass --metadata \'{"data_file": "PATH/mmlu_test_1444.json"}\' or use evaluate_paper_mmlu'
        )
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_paper_subset(data_file))})
