"""TRL's DPOTrainer clients (``client.trainer: dpo``): preference data in TRL's formats (the real schemas of
Anthropic/hh-rlhf and trl-lib/ultrafeedback_binarized, and prompt/chosen/rejected as texts or conversations)
federates through the CLI and publishes a PEFT adapter; every aggregation method federates DPO adapters; the
reference is what ``training.reference_policy`` says in a round after the first (the round's starting model: the
loss at step 0 is log 2; the base: the loss at step 0 is DPO's loss of the round's starting model against the base,
computed here apart); a DPO federation with FLoRIST raises the held-out reward margin."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import chat_base_copy, delta_weights, quiet_console, write_recipe
from typer.testing import CliRunner

from florist_hf.adapters import read_adapter
from florist_hf.aggregation import METHODS
from florist_hf.cli import app

runner = CliRunner()


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _turns(question: str, answer: str) -> list[dict]:
    return [{"content": question, "role": "user"}, {"content": answer, "role": "assistant"}]


def preference_rows(shape: str, count: int = 16, start: int = 0) -> list[dict]:
    """``count`` pairs in one of the schemas the Hub's preference sets have: the chosen answer is the sum, the
    rejected one a wrong number."""
    rows = []
    for index in range(start, start + count):
        question, good, bad = f"What is {index} plus one?", f"It is {index + 1}.", f"It is {index + 7}."
        if shape == "hh-rlhf":  # Anthropic/hh-rlhf: two texts that share their dialogue up to the last answer
            rows.append({"chosen": f"\n\nHuman: {question}\n\nAssistant: {good}",
                         "rejected": f"\n\nHuman: {question}\n\nAssistant: {bad}"})
        elif shape == "ultrafeedback_binarized":  # trl-lib/ultrafeedback_binarized: conversations sharing the user turn
            rows.append({"chosen": _turns(question, good), "rejected": _turns(question, bad),
                         "score_chosen": 8.0, "score_rejected": 3.0})
        elif shape == "prompt_texts":  # TRL's standard preference format, with its explicit prompt
            rows.append({"prompt": f"Q: {question}\nA:", "chosen": f" {good}", "rejected": f" {bad}"})
        else:  # TRL's conversational preference format, with its explicit prompt
            rows.append({"prompt": [{"role": "user", "content": question}],
                         "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})
    return rows


@pytest.fixture(scope="module")
def chat_base(tiny_base, tmp_path_factory) -> Path:
    """The tiny base with a ChatML template (SmolLM2's turn markup)."""
    return chat_base_copy(tiny_base, tmp_path_factory.mktemp("chat") / "chat_base")


def _dpo_recipe(tmp_path: Path, data_file: Path, *, method: str = "florist", rounds: int = 2, **training) -> Path:
    return write_recipe(tmp_path, method=method, ranks=(4, 4), rounds=rounds, client={"trainer": "dpo"},
                        data={"source": str(data_file), "partition": "iid", "max_samples_per_client": 8, "cutoff_len": 256},
                        federation={"eval_heldout_loss": False},
                        training={key: value for key, value in {"max_steps": 1, "per_device_train_batch_size": 8,
                                  "learning_rate": 1e-2, "beta": 1.0, **training}.items() if value is not None})


def _client_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if record["kind"] == "client"]


def _loads_with_peft(run_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = json.loads((run_dir / "run.json").read_text())["base_model"]
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run_dir / "global_adapter")


@pytest.mark.parametrize("shape", ["hh-rlhf", "ultrafeedback_binarized", "prompt_texts", "prompt_conversations"])
def test_preference_jsonl_federates_through_the_cli_and_publishes_a_peft_adapter(shape, tmp_path, chat_base):
    data_file = _write_jsonl(tmp_path / "pairs.jsonl", preference_rows(shape))
    result = runner.invoke(app, ["run", str(_dpo_recipe(tmp_path, data_file)), "--set", f"model.name_or_path={chat_base}"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"
    clients = _client_records(run_dir)
    assert len(clients) == 4 and all(record["finite"] for record in clients)
    # Round 1 starts from the base, which is the reference: DPO's loss is log 2 at its first step.
    assert all(record["loss"] == pytest.approx(math.log(2), abs=1e-6) for record in clients if record["round"] == 1)
    model = _loads_with_peft(run_dir)
    assert sum(float(p.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n) > 0
    # The client's adapter alone is exported and published, never the reference beside it.
    for adapter in [run_dir / "global_adapter", *(run_dir / "rounds" / "2" / "clients").iterdir()]:
        assert not (adapter / "ref").exists() and (adapter / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_federates_dpo_adapters_from_the_round_start_reference(method, tmp_path, tiny_base):
    """In round 2 every client starts from the round's global model (merged into the base for FLoRIST and FLoRA,
    continued factors for FedIT, FFA-LoRA, FlexLoRA, FedSVD, both for FedEx-LoRA), which is its reference under
    ``reference_policy: round_start`` (the default): policy = reference, so DPO's loss at step 0 is log 2."""
    data_file = _write_jsonl(tmp_path / "pairs.jsonl", preference_rows("prompt_texts"))
    result = runner.invoke(app, ["run", str(_dpo_recipe(tmp_path, data_file, method=method)),
                                 "--set", f"model.name_or_path={tiny_base}"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"
    clients = _client_records(run_dir)
    assert len(clients) == 4 and all(record["finite"] for record in clients)
    for record in clients:
        assert record["loss"] == pytest.approx(math.log(2), abs=1e-6), (record["round"], record["client"])
    # Round 1 moved the model (else round 2 would start at the base, and log 2 would prove nothing).
    first = delta_weights(run_dir / "rounds" / "1" / "global")
    assert sum(float(update.norm()) for update in first.values()) > 1e-3
    if METHODS[method].freezes_lora_a:  # A as the server sent it, though TRL's reference forward switches adapters
        sent = read_adapter(run_dir / "rounds" / "1" / "global")
        for client in (run_dir / "rounds" / "2" / "clients").iterdir():
            for name, module in read_adapter(client).modules.items():
                assert torch.equal(module.lora_a, sent.modules[name].lora_a[: module.rank]), (client.name, name)
    _loads_with_peft(run_dir)


def _step_zero_dpo_loss(policy, reference, dataset, beta: float) -> float:
    """DPO's sigmoid loss at step 0 on the client's tokenized pairs, policy against reference, computed apart from
    TRL: the summed log-probabilities of each completion, given its prompt."""
    from florist_hf.preference import PairTokens, completion_logps

    pairs = [PairTokens(list(row["prompt_ids"]), list(row["chosen_ids"]), list(row["rejected_ids"])) for row in dataset]
    policy_logps, reference_logps = completion_logps(policy, pairs), completion_logps(reference, pairs)
    delta = (policy_logps[:, 0] - reference_logps[:, 0]) - (policy_logps[:, 1] - reference_logps[:, 1])
    return float(-torch.nn.functional.logsigmoid(beta * delta).mean())


@pytest.mark.parametrize("method", ["florist", "fedit", "fedex"])
def test_the_base_reference_is_the_base_in_a_later_round(method, tmp_path, tiny_base, monkeypatch):
    """``reference_policy: base``: in round 2 the client starts from the round's global model and scores it against
    the base alone, with the held global state left out (FLoRIST, FedEx-LoRA) and the continued factors too (FedIT,
    FedEx-LoRA); its step-0 loss is that DPO loss, computed here from the global model the run publishes."""
    from transformers import AutoModelForCausalLM

    from florist_hf.clients import run as client_run
    from florist_hf.heldout import load_global_model
    from florist_hf.recipe import load_recipe
    from florist_hf.runner import run_federation

    data_file = _write_jsonl(tmp_path / "pairs.jsonl", preference_rows("prompt_texts"))
    recipe = load_recipe(_dpo_recipe(tmp_path, data_file, method=method, reference_policy="base"),
                         [f"model.name_or_path={tiny_base}"])
    seen: dict = {}
    build = client_run.build_client_trainer

    def recording(*args, **kwargs):
        import shutil

        built = build(*args, **kwargs)
        plan = next(callback.plan for callback in kwargs["callbacks"] if hasattr(callback, "plan"))
        # The client's tokenized pairs, and a copy of the global model it starts from (its state and factors).
        starts = {}
        for key in ("global_state", "init_adapter"):
            source = getattr(plan, key)
            starts[key] = None if source is None else Path(shutil.copytree(source, tmp_path / f"r{plan.round}c{plan.client_id}" / key))
        seen[(plan.round, plan.client_id)] = (built.train_dataset, starts)
        return built

    monkeypatch.setattr(client_run, "build_client_trainer", recording)
    run_dir = run_federation(recipe, console=quiet_console())
    losses = {(record["round"], record["client"]): record["loss"] for record in _client_records(run_dir)}
    assert losses[(1, 0)] == pytest.approx(math.log(2), abs=1e-6)  # round 1 starts from the base

    base = json.loads((run_dir / "run.json").read_text())["base_model"]
    reference = AutoModelForCausalLM.from_pretrained(base).eval()
    for client in (0, 1):
        dataset, starts = seen[(2, client)]
        assert starts["global_state"] is not None or starts["init_adapter"] is not None
        # Both clients have rank 4, the global factors' rank: the client holds the global model itself.
        policy = load_global_model(base, state=starts["global_state"], adapter=starts["init_adapter"]).eval()
        expected = _step_zero_dpo_loss(policy, reference, dataset, beta=1.0)
        assert abs(expected - math.log(2)) > 1e-4  # round 1 moved the model away from the base
        assert losses[(2, client)] == pytest.approx(expected, abs=2e-5)


def test_a_dpo_federation_with_florist_raises_the_held_out_reward_margin(tmp_path, tiny_base):
    """Clients prefer the polite answer to the curt one on their own questions; the published FLoRIST adapter
    prefers it on questions none of them saw: the held-out reward margin against the base goes from 0 to > 0, and
    the log-likelihood margin chosen − rejected rises."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from florist_hf.preference import completion_logps, margins, tokenize_pairs

    def pairs(start: int, count: int) -> list[dict]:
        return [{"prompt": f"Q: What is {k} plus one?\nA:", "chosen": f" Gladly: it is {k + 1}.", "rejected": " No."}
                for k in range(start, start + count)]

    data_file = _write_jsonl(tmp_path / "pairs.jsonl", pairs(0, 32))
    recipe = _dpo_recipe(tmp_path, data_file, rounds=2, max_steps=4, beta=0.1)
    result = runner.invoke(app, ["run", str(recipe), "--set", f"model.name_or_path={tiny_base}", "--set",
                                 "data.max_samples_per_client=16", "--set", "training.per_device_train_batch_size=4"])
    assert result.exit_code == 0, result.output

    run_dir = tmp_path / "run"
    base_path = json.loads((run_dir / "run.json").read_text())["base_model"]
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    held_out = tokenize_pairs(pairs(100, 16), tokenizer)
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    base_logps = completion_logps(base, held_out, max_length=64)
    before = margins(base_logps, base_logps, beta=0.1)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), run_dir / "global_adapter")
    after = margins(completion_logps(tuned.eval(), held_out, max_length=64), base_logps, beta=0.1)
    assert before["reward_margin"] == 0.0
    assert after["reward_margin"] > 0.05 and after["reward_accuracy"] > 0.9
    assert after["likelihood_margin"] > before["likelihood_margin"] + 0.5


def test_preference_pairs_are_tokenized_as_the_dpo_client_trains_on_them(chat_base, tmp_path, monkeypatch):
    """`preference.tokenize_pairs` (the margins' tokens) gives the DPO client's own tokens, in every format."""
    from transformers import AutoTokenizer

    from florist_hf.clients.config import client_training
    from florist_hf.clients.registry import trainer_kind
    from florist_hf.clients.run import build_client_trainer, build_lora_model
    from florist_hf.data import records_from_rows
    from florist_hf.preference import tokenize_pairs
    from florist_hf.recipe import load_recipe

    tokenizer = AutoTokenizer.from_pretrained(chat_base)
    for shape in ("hh-rlhf", "ultrafeedback_binarized", "prompt_texts", "prompt_conversations"):
        data_file = _write_jsonl(tmp_path / f"{shape}.jsonl", preference_rows(shape, count=4))
        recipe = load_recipe(_dpo_recipe(tmp_path, data_file), [f"model.name_or_path={chat_base}"])
        records = records_from_rows([json.loads(line) for line in data_file.read_text().splitlines()])
        model = build_lora_model(str(chat_base), rank=2, alpha=4, target_modules=["q_proj"], dropout=0.0, use_rslora=False)
        trainer = build_client_trainer(model, tokenizer, trainer_kind("dpo").dataset(records, tokenizer, recipe),
                                       training=client_training(recipe, 0, 1), work_dir=tmp_path / "work", seed=0,
                                       trainer="dpo")
        trained = [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in trainer.train_dataset]
        assert [(p.prompt, p.chosen, p.rejected) for p in tokenize_pairs(records, tokenizer)] == trained, shape


@pytest.mark.parametrize("trainer,shape,expected", [
    ("trainer", "hh-rlhf", "pairs.jsonl: preference records train with TRL's DPOTrainer: set client.trainer: dpo"),
    ("sft", "prompt_texts", "pairs.jsonl: preference records (chosen/rejected) train with TRL's DPOTrainer: set client.trainer: dpo"),
    ("dpo", "instruction", "client.trainer: dpo trains on preference pairs (TRL's chosen and rejected columns, with or "
                           "without a prompt); these are instruction records: use client.trainer: sft"),
])
def test_records_for_another_trainer_are_refused_in_one_line(trainer, shape, expected, tmp_path, tiny_base):
    rows = ([{"instruction": f"Task {k}.", "response": f"Answer {k}."} for k in range(16)] if shape == "instruction"
            else preference_rows(shape))
    data_file = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    recipe = _dpo_recipe(tmp_path, data_file, beta=None)  # a DPOConfig field
    result = runner.invoke(app, ["run", str(recipe), "--set", f"model.name_or_path={tiny_base}", "--set", f"client.trainer={trainer}"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.output
    assert not (tmp_path / "run" / "rounds").exists()
