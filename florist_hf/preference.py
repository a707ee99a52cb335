"""Preference margins of a model on held-out pairs: each pair's log-likelihood margin log π(chosen) − log π(rejected),
and DPO's implicit reward margin β·[(log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)] against a reference
(the base); the pairs tokenized as TRL's DPOTrainer tokenizes them for training (trl 1.16), completions scored alone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass
class PairTokens:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def tokenize_pairs(records: Sequence[Mapping], tokenizer) -> list[PairTokens]:
    """Preference records (``chosen``/``rejected``, with a ``prompt`` or sharing one) as the DPO client's tokens: the
    implicit prompt extracted, EOS ended onto texts, conversations through the chat template, the completion starting
    where the tokenized prompt and prompt+completion part (TRL's ``DPOTrainer._prepare_dataset``)."""
    from trl.data_utils import _tokenize, common_prefix_length, extract_prompt, is_conversational

    pairs = []
    for record in records:
        example = {key: record[key] for key in ("prompt", "chosen", "rejected") if key in record}
        if "prompt" not in example:
            example = extract_prompt(example)
        if not is_conversational(example):
            eos = tokenizer.eos_token
            example = {**example, **{key: example[key] if example[key].endswith(eos) else example[key] + eos
                                     for key in ("chosen", "rejected")}}
            prompt_ids = _tokenize(tokenizer, example["prompt"])["input_ids"]
        else:
            prompt_ids = _tokenize(tokenizer, example["prompt"], add_generation_prompt=True)["input_ids"]
        full = {key: _tokenize(tokenizer, example["prompt"] + example[key])["input_ids"] for key in ("chosen", "rejected")}
        length = min(common_prefix_length(prompt_ids, ids) for ids in full.values())
        pairs.append(PairTokens(list(prompt_ids[:length]), list(full["chosen"][length:]), list(full["rejected"][length:])))
    return pairs


@torch.no_grad()
def completion_logps(model, pairs: Sequence[PairTokens], max_length: int | None = None) -> torch.Tensor:
    """(pairs, 2): the summed log-probability of each pair's chosen and rejected completion given its prompt, each
    sequence cut to ``max_length`` tokens from its start as the DPO client cuts it; one sequence per forward."""
    device = next(model.parameters()).device
    values = []
    for pair in pairs:
        row = []
        for completion in (pair.chosen, pair.rejected):
            ids = (pair.prompt + completion)[:max_length]
            scored = len(ids) - len(pair.prompt)  # completion tokens left after the cut
            if scored <= 0:
                row.append(0.0)
                continue
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].double()
            logps = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids[1:], device=device)[:, None])[:, 0]
            row.append(float(logps[-scored:].sum()))
        values.append(row)
    return torch.tensor(values, dtype=torch.float64)


def margins(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> dict[str, float]:
    """The mean over pairs of the policy's log-likelihood margin (chosen − rejected), of DPO's implicit reward margin
    against the reference (β · the difference of log-ratios), and the share of pairs whose reward margin is > 0."""
    likelihood = policy_logps[:, 0] - policy_logps[:, 1]
    reward = beta * ((policy_logps[:, 0] - reference_logps[:, 0]) - (policy_logps[:, 1] - reference_logps[:, 1]))
    return {"likelihood_margin": float(likelihood.mean()), "reward_margin": float(reward.mean()),
            "reward_accuracy": float((reward > 0).double().mean()), "pairs": len(policy_logps)}
