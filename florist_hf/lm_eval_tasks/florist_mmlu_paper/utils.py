"""Prompts and scoring of the paper's MMLU protocol (florist_mmlu_paper.yaml, florist_mmlu_paper_chat.yaml),
with the measures of what its rule credits.

lm-eval loads this file by path from the YAMLs; the scoring functions are pure so that tests and
other code can import them as ``florist_hf.lm_eval_tasks.florist_mmlu_paper.utils``.

The reference (FLoRIST's ``fed_utils/evaluation.py``, after FLoRA's) credits a question when
``tgt_ans_idx + '.' in ans or tgt_ans in ans``: plain, case-sensitive substring tests on the raw
text, with no lower-casing or other normalisation beyond ``strip()``. We keep that case rule, so
``"1. A deletion."`` is not credited for ``"A. a deletion."``; ``case_miss`` counts such answers.
(It also read all 32 generated tokens, where these tasks stop at the next "###" section or the
end of the assistant's turn.)
"""

from __future__ import annotations

import re

from florist_hf.lm_eval_tasks.mmlu_subset import load_subset, macro_average, parse_gold_output  # noqa: F401 (the YAMLs name macro_average)

#: The Alpaca "prompt_input" template the reference used, followed by its answer primer.
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ANSWER_PRIMER = "The answer is: "

# An option letter the answer names: a capital A-D not inside a word or number, followed by ".",
# ")", ":", "," or the end ("B.", "(C)", "D:", "A, C", "B"); "A deletion" (the article) is not one.
_OPTION_LETTER = re.compile(r"(?<![A-Za-z0-9])([ABCD])(?=[.):,]|\s*$)")


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


def named_letters(generation: str) -> list[str]:
    """The option letters ``generation`` names, in order of first mention, each once."""
    letters: list[str] = []
    for letter in _OPTION_LETTER.findall(generation):
        if letter not in letters:
            letters.append(letter)
    return letters


def answer_marks(generation: str, gold_output: str) -> dict[str, bool]:
    """How the paper's rule and a strict reading judge one generation, and what the rule leans on.

    ``correct``: the paper's rule. ``strict``: the first option letter named is the gold one.
    ``no_letter``: no option letter named. ``multi_letter``: two or more different letters named
    (an answer echoing the options). ``substring_only``: credited by the answer text alone, not by
    ``"<letter>."``. ``case_miss``: not credited, but would be if case were ignored.
    """
    letter, answer_text = parse_gold_output(gold_output)
    letters = named_letters(generation)
    by_letter = f"{letter}." in generation
    correct = score_answer(generation, gold_output)
    ignoring_case = f"{letter}.".lower() in generation.lower() or (
        bool(answer_text) and answer_text.lower() in generation.lower()
    )
    return {
        "correct": correct,
        "strict": bool(letters) and letters[0] == letter,
        "no_letter": not letters,
        "multi_letter": len(letters) >= 2,
        "substring_only": correct and not by_letter,
        "case_miss": not correct and ignoring_case,
    }


def paper_prompt(doc: dict) -> str:
    return PROMPT_TEMPLATE.format(instruction=doc["instruction"], input=doc["input"]) + ANSWER_PRIMER


def chat_prompt(doc: dict) -> str:
    """The user turn of the chat-template variant: the instruction and the question with its options
    (the assistant turn opens with the primer, the task's ``gen_prefix``)."""
    return f"{doc['instruction']}\n\n{doc['input']}"


def process_results(doc: dict, results: list[str]) -> dict:
    marks = answer_marks(results[0], doc["output"])
    subject = doc["class"]
    return {
        "macro_acc": (subject, marks["correct"]),
        "acc": float(marks["correct"]),
        "strict_macro_acc": (subject, marks["strict"]),
        "strict_acc": float(marks["strict"]),
        **{name: float(marks[name]) for name in ("no_letter", "multi_letter", "substring_only", "case_miss")},
    }


def load_paper_subset(data_file: str | None = None, **other_metadata):
    """lm-eval's ``custom_dataset`` hook: the task metadata's ``data_file`` as a test split."""
    return load_subset(data_file, task="florist_mmlu_paper", **other_metadata)
