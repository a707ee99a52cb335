"""Dataset hook and scoring of ``florist_mmlu`` (see florist_mmlu.yaml).

lm-eval loads this file by path from the YAML; the functions are pure so that tests can import them
as ``florist_hf.lm_eval_tasks.florist_mmlu.utils``.
"""

from __future__ import annotations

from florist_hf.lm_eval_tasks.mmlu_subset import load_subset, macro_average  # noqa: F401 (the YAML names it)


def load_florist_mmlu(data_file: str | None = None, **other_metadata):
    """lm-eval's ``custom_dataset`` hook: the subset with lm-eval's MMLU fields and the subject's phrase."""
    dataset = load_subset(data_file, task="florist_mmlu", **other_metadata)
    # lm-eval's mmlu configs name the subject with its underscores as spaces (_generate_configs.py).
    return dataset.map(lambda doc: {"subject_phrase": doc["subject"].replace("_", " ")})


def process_results(doc: dict, results: list[tuple[float, bool]]) -> dict:
    """``results`` holds each choice's (log-likelihood, is-greedy); the answer is the likeliest
    choice, as lm-eval's ``acc`` takes it (``argmax``: the first of equal scores)."""
    loglikelihoods = [loglikelihood for loglikelihood, _ in results]
    predicted = max(range(len(loglikelihoods)), key=loglikelihoods.__getitem__)
    correct = predicted == doc["answer"]
    return {"acc": float(correct), "macro_acc": (doc["subject"], correct)}
