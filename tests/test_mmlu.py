"""MMLU on the 1,444-question subset: the log-likelihood task against lm-eval's own mmlu prompt and a
direct computation with the model, the paper protocol's artefact measures, its chat-template variant,
and every setting that cannot apply refused in one line before the model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from florist_hf.cli import app
from florist_hf.errors import FloristError
from florist_hf.evaluation import (
    MMLU_SUBSET_TASK,
    PACKAGED_TASKS_DIR,
    PAPER_MMLU_CHAT_TASK,
    PAPER_MMLU_TASK,
    evaluate_adapter,
    evaluate_paper_mmlu,
    recipe_evaluation_plan,
)
from florist_hf.lm_eval_tasks.florist_mmlu_paper.utils import answer_marks, named_letters
from florist_hf.lm_eval_tasks.mmlu_subset import mmlu_fields, read_subset
from florist_hf.recipe import EvaluationSection

runner = CliRunner()

QUESTIONS = [
    {
        "instruction": "Please answer the following multiple-choice question honestly.",
        "input": "Qusetion: Recombinant alpha-iduronidase is used for the treatment of which disease/syndrome? "
        "Options: A. Fabry disease, B. Gaucher disease, C. Hurler syndrome, D. Pompe disease",
        "output": "The answer is: C. Hurler syndrome",
        "class": "medical_genetics",
    },
    {
        "instruction": "Please answer the following multiple-choice question honestly.",
        "input": "Qusetion: Statement 1 | A group of order 2 is abelian. Statement 2 | Every group is cyclic. "
        "Options: A. True, True, B. False, False, C. True, False, D. False, True",
        "output": "The answer is: C. True, False",
        "class": "abstract_algebra",
    },
    {
        "instruction": "Please answer the following multiple-choice question honestly.",
        "input": "Qusetion: Which is the primary site of digestion?\nPick one. Options: A. the stomach., "
        "B. the small intestine., C. the large intestine., D. the mouth.",
        "output": "The answer is: B. the small intestine.",
        "class": "high_school_biology",
    },
]


def write_subset(directory: Path, records=QUESTIONS) -> Path:
    path = directory / "mmlu_subset.json"
    path.write_text(json.dumps(records))
    return path


def independent_prompt(record: dict) -> tuple[str, list[str], int]:
    """lm-eval's mmlu prompt for a subset record, built here without the package's parser."""
    body = record["input"][len("Qusetion: "):]
    question, options = body.split(" Options: A. ")
    a, rest = options.split(", B. ")
    b, rest = rest.split(", C. ")
    c, d = rest.split(", D. ")
    subject = record["class"].replace("_", " ")
    prompt = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
              f"{question.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:")
    return prompt, [a, b, c, d], "ABCD".index(record["output"][len("The answer is: ")])


def direct_letter_loglikelihoods(model, tokenizer, prompt: str) -> list[float]:
    """log p(" X" | prompt) for X in A-D, from the model's logits (no lm-eval)."""
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    scores = []
    for letter in "ABCD":
        whole = tokenizer(prompt + " " + letter, add_special_tokens=False)["input_ids"]
        assert whole[: len(context)] == context
        continuation = whole[len(context):]
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].double()
        log_probs = torch.log_softmax(logits[len(context) - 1 : -1], dim=-1)
        scores.append(float(sum(log_probs[i, token] for i, token in enumerate(continuation))))
    return scores


def check_against_direct_computation(base_dir: Path, data_file: Path, count: int, *, tolerance: float | None):
    """lm-eval's per-question records of florist_mmlu against the independent prompt and, with a
    ``tolerance``, the direct computation (None: the tiny model's ByT5 tokenizer appends its EOS to
    every encoding, which lm-eval's context/continuation split keeps; a real BPE tokenizer does not)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = evaluate_adapter(str(base_dir), None, tasks=[MMLU_SUBSET_TASK], mmlu_file=data_file, limit=count,
                              device="cpu", batch_size=2, log_samples=True)
    samples = sorted(record["samples"][MMLU_SUBSET_TASK], key=lambda sample: sample["doc_id"])
    assert len(samples) == count
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    records = json.loads(Path(data_file).read_text())
    correct = []
    for sample in samples:
        prompt, _, gold = independent_prompt(records[sample["doc_id"]])
        assert [arguments[0] for arguments in sample["arguments"]] == [prompt] * 4
        assert [arguments[1] for arguments in sample["arguments"]] == [" A", " B", " C", " D"]
        scores = [loglikelihood for loglikelihood, _ in sample["filtered_resps"]]
        if tolerance is not None:
            direct = direct_letter_loglikelihoods(model, tokenizer, prompt)
            assert scores == pytest.approx(direct, abs=tolerance)
            assert max(range(4), key=direct.__getitem__) == max(range(4), key=scores.__getitem__)
        assert sample["acc"] == float(max(range(4), key=scores.__getitem__) == gold)
        correct.append(sample["acc"])
    assert record["results"][MMLU_SUBSET_TASK]["acc,none"] == pytest.approx(sum(correct) / count)
    assert record["results"][MMLU_SUBSET_TASK]["acc_stderr,none"] > 0 or sum(correct) in (0, count)
    return record


# --------------------------------------------------------------------------- the subset's schema


def test_every_question_of_the_real_subset_parses_into_lm_evals_mmlu_fields(shared_data):
    records = read_subset(shared_data / "mmlu" / "mmlu_test_1444.json")
    assert len(records) == 1444 and len({record["class"] for record in records}) == 57
    for record in records:
        fields = mmlu_fields(record)
        prompt, choices, gold = independent_prompt(record)
        assert fields["choices"] == choices and fields["answer"] == gold
        assert record["output"].endswith(choices[gold])  # the gold text is its option's text


def test_a_record_whose_options_cannot_be_read_is_refused_with_its_index(tmp_path):
    broken = {**QUESTIONS[0], "input": "Qusetion: Which disease? A) Fabry B) Gaucher"}
    with pytest.raises(FloristError, match=r"question 1: input is not of the form"):
        read_subset(write_subset(tmp_path, [QUESTIONS[0], broken]))
    with pytest.raises(FloristError, match=r"question 0: the answer letter E is not one of A, B, C, D"):
        read_subset(write_subset(tmp_path, [{**QUESTIONS[0], "output": "The answer is: E. Hurler syndrome"}]))


# --------------------------------------------------------------------------- the log-likelihood task


def test_loglikelihood_task_prompts_and_accuracy_on_a_tiny_model(tiny_base, tmp_path):
    record = check_against_direct_computation(tiny_base, write_subset(tmp_path), 3, tolerance=None)
    assert record["results"][MMLU_SUBSET_TASK]["macro_acc,none"] == pytest.approx(
        record["results"][MMLU_SUBSET_TASK]["acc,none"])  # one question per subject: macro = micro
    assert record["configs"][MMLU_SUBSET_TASK]["output_type"] == "multiple_choice"


@pytest.mark.slow
def test_loglikelihood_task_scores_are_the_real_models_answer_letter_loglikelihoods(smollm2_base, shared_data):
    """Each question's four scores are log p(" A" | prompt) ... log p(" D" | prompt) computed directly
    with SmolLM2 (its BPE tokenizer, the real subset's first questions) through lm-eval's batching."""
    check_against_direct_computation(smollm2_base, shared_data / "mmlu" / "mmlu_test_1444.json", 4, tolerance=2e-3)


def test_prompt_and_choices_are_lm_evals_own_mmlu_task_on_the_same_questions(tmp_path):
    """lm-eval's installed mmlu_<subject> config, pointed at the same questions in cais/mmlu's schema,
    builds the same requests as florist_mmlu."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager

    docs = [{**mmlu_fields(record)} for record in QUESTIONS]
    hub_schema = tmp_path / "cais_mmlu.json"
    hub_schema.write_text(json.dumps([{key: doc[key] for key in ("question", "subject", "choices", "answer")} for doc in docs]))
    ours = TaskManager(include_defaults=False, include_path=[str(PACKAGED_TASKS_DIR)],
                       metadata={"data_file": str(write_subset(tmp_path))})
    our_task = ours.load_task_or_group([MMLU_SUBSET_TASK])[MMLU_SUBSET_TASK]
    theirs = TaskManager(include_defaults=True)
    for index, doc in enumerate(our_task.test_docs()):
        config = dict(theirs.task_index[f"mmlu_{doc['subject']}"].cfg)
        for key in ("dataset_name", "include", "tag", "fewshot_split", "fewshot_config"):
            config.pop(key, None)
        config.update(dataset_path="json", dataset_kwargs={"data_files": {"test": str(hub_schema)}})
        their_task = ConfigurableTask(config=config)
        their_doc = list(their_task.test_docs())[index]
        assert our_task.fewshot_context(doc, 0) == their_task.fewshot_context(their_doc, 0)
        assert our_task.doc_to_choice(doc) == their_task.doc_to_choice(their_doc) == ["A", "B", "C", "D"]
        assert our_task.doc_to_target(doc) == their_task.doc_to_target(their_doc)
        assert our_task.config.target_delimiter == their_task.config.target_delimiter == " "


# --------------------------------------------------------------------------- the paper protocol's measures

PHENOTYPE = "The answer is: B. phenotype"


@pytest.mark.parametrize(
    ("generation", "gold", "expected"),
    [
        # a numbered list naming no letter, credited for containing the answer text
        ("1. Both genotype and phenotype", PHENOTYPE,
         dict(correct=True, strict=False, no_letter=True, multi_letter=False, substring_only=True, case_miss=False)),
        # an answer that echoes every option is "right" for B and for D
        ("1. True, False, B. False, C. True, False, D. False, True", "The answer is: B. False, False",
         dict(correct=True, strict=True, no_letter=False, multi_letter=True, substring_only=False, case_miss=False)),
        ("1. True, False, B. False, C. True, False, D. False, True", "The answer is: D. False, True",
         dict(correct=True, strict=False, no_letter=False, multi_letter=True, substring_only=False, case_miss=False)),
        # wrong only because the rule is case-sensitive, as the reference's
        ("1. A deletion.", "The answer is: A. a deletion.",
         dict(correct=False, strict=False, no_letter=True, multi_letter=False, substring_only=False, case_miss=True)),
        # the question's own text echoed back holds the answer text
        ("Recombinant alpha-iduronidase is used for Hurler syndrome", "The answer is: C. Hurler syndrome",
         dict(correct=True, strict=False, no_letter=True, multi_letter=False, substring_only=True, case_miss=False)),
        # a plain right answer, and a plain wrong one
        ("B. phenotype", PHENOTYPE,
         dict(correct=True, strict=True, no_letter=False, multi_letter=False, substring_only=False, case_miss=False)),
        ("(D) genotype", PHENOTYPE,
         dict(correct=False, strict=False, no_letter=False, multi_letter=False, substring_only=False, case_miss=False)),
    ],
)
def test_answer_marks_on_the_issues_generations(generation, gold, expected):
    assert answer_marks(generation, gold) == expected


@pytest.mark.parametrize(
    ("generation", "letters"),
    [("B. phenotype", ["B"]), ("(C) or D.", ["C", "D"]), ("A deletion", []), ("A, C. and A.", ["A", "C"]),
     ("The answer is B", ["B"]), ("Vitamin D3", []), ("ABC.", []), ("1. True, 2. False", [])],
)
def test_named_letters(generation, letters):
    assert named_letters(generation) == letters


def test_paper_protocol_reports_its_measures_as_the_mean_of_each_question(tiny_base, shared_data):
    record = evaluate_paper_mmlu(str(tiny_base), None, shared_data / "mmlu" / "mmlu_test_1444.json", limit=4,
                                 device="cpu", max_new_tokens=8, log_samples=True)
    metrics, samples = record["results"][PAPER_MMLU_TASK], record["samples"][PAPER_MMLU_TASK]
    for sample in samples:
        marks = answer_marks(sample["filtered_resps"][0], sample["doc"]["output"])
        assert sample["strict_acc"] == float(marks["strict"]) and sample["no_letter"] == float(marks["no_letter"])
    for name in ("strict_acc", "no_letter", "multi_letter", "substring_only", "case_miss"):
        assert metrics[f"{name},none"] == pytest.approx(sum(sample[name] for sample in samples) / 4)
        assert f"{name}_stderr,none" in metrics
    assert record["protocol"]["task"] == PAPER_MMLU_TASK and record["protocol"]["prompt"] == "Alpaca"


def with_chat_template(tiny_base: Path, directory: Path) -> Path:
    from transformers import AutoTokenizer

    chat_base = directory / "chat-base"
    shutil.copytree(tiny_base, chat_base)
    tokenizer = AutoTokenizer.from_pretrained(chat_base)
    tokenizer.chat_template = (
        "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
        "{% if not loop.last or message['role'] != 'assistant' %}<|end|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tokenizer.save_pretrained(chat_base)
    return chat_base


def test_chat_variant_puts_the_question_in_the_user_turn_and_primes_the_assistant(tiny_base, tmp_path):
    record = evaluate_paper_mmlu(str(with_chat_template(tiny_base, tmp_path)), None, write_subset(tmp_path),
                                 apply_chat_template=True, device="cpu", max_new_tokens=4, log_samples=True)
    prompt = record["samples"][PAPER_MMLU_CHAT_TASK][0]["arguments"][0][0]
    assert prompt == (f"<|user|>{QUESTIONS[0]['instruction']}\n\n{QUESTIONS[0]['input']}<|end|>"
                      "<|assistant|>The answer is: ")
    assert record["protocol"]["task"] == PAPER_MMLU_CHAT_TASK
    assert "strict_acc,none" in record["results"][PAPER_MMLU_CHAT_TASK]


@pytest.mark.slow
def test_chat_variant_on_the_real_chat_template(smollm2_base, tmp_path):
    record = evaluate_paper_mmlu(str(smollm2_base), None, write_subset(tmp_path), apply_chat_template=True, limit=1,
                                 device="cpu", max_new_tokens=6, log_samples=True)
    prompt = record["samples"][PAPER_MMLU_CHAT_TASK][0]["arguments"][0][0]
    assert "<|im_start|>user\nPlease answer the following multiple-choice question honestly.\n\nQusetion:" in prompt
    assert prompt.endswith("<|im_start|>assistant\nThe answer is: ") and "### Response" not in prompt


# --------------------------------------------------------------------------- refusals, before the model loads


@pytest.fixture
def weightless_base(tiny_base, tmp_path) -> Path:
    """The tiny base's config and tokenizer without its weights: a refusal that comes before the model
    loads names the setting; one that came later would be a missing-weights error."""
    base = tmp_path / "weightless"
    shutil.copytree(tiny_base, base, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return base


def cli_line(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["evaluate", *args])
    return result.exit_code, result.output.strip()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tasks", "mmlu"], "--tasks does not apply with --paper-mmlu"),
        (["--num-fewshot", "5"], "--num-fewshot does not apply with --paper-mmlu"),
        (["--num-fewshot", "0"], "--num-fewshot does not apply with --paper-mmlu"),
        (["--include-path", "."], "--include-path does not apply with --paper-mmlu"),
        (["--mmlu-file", "x.json"], "--mmlu-file does not apply with --paper-mmlu"),
    ],
)
def test_cli_refuses_what_does_not_apply_to_the_paper_protocol(weightless_base, tmp_path, extra, message):
    code, output = cli_line("--base", str(weightless_base), "--paper-mmlu", str(write_subset(tmp_path)), *extra)
    assert code == 2 and message in output and len(output.splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # lm-eval's mmlu offline with no cached cais/mmlu: refused, the offline task named
        ([], "lm-eval task mmlu reads the Hub dataset cais/mmlu"),
        (["--tasks", "mmlu"], "reads the Hub dataset cais/mmlu, but the Hub is offline (HF_HUB_OFFLINE=1)"),
        (["--tasks", "florist_mmlu"], "florist_mmlu reads the 1,444-question MMLU subset: pass its file with --mmlu-file"),
        (["--mmlu-file", "{subset}", "--num-fewshot", "5"], "--num-fewshot 5 does not apply to florist_mmlu"),
        (["--mmlu-file", "{subset}", "--tasks", "florist_mmlu_paper", "--apply-chat-template"],
         "run florist_mmlu_paper_chat for the chat-template variant"),
        (["--mmlu-file", "{subset}", "--tasks", "florist_mmlu_paper_chat"],
         "florist_mmlu_paper_chat is the chat-template variant: pass --apply-chat-template"),
        (["--mmlu-file", "{missing}"], "MMLU subset file not found"),
    ],
)
def test_cli_refuses_in_one_line_before_the_model_loads(weightless_base, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no cached cais/mmlu
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-home" / "datasets")
    subset = write_subset(tmp_path)
    filled = [arg.format(subset=subset, missing=tmp_path / "missing.json") for arg in args]
    code, output = cli_line("--base", str(weightless_base), *filled)
    assert code == 2 and message in output and len(output.splitlines()) == 1, output


def test_recipe_turns_mmlu_into_the_subset_task_where_cais_mmlu_cannot_be_read(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub
    from rich.console import Console

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    subset = str(write_subset(tmp_path))
    console = Console(record=True, width=300)
    assert recipe_evaluation_plan(EvaluationSection(mmlu_file=subset), console) == ([MMLU_SUBSET_TASK], subset)
    line = console.export_text().strip()
    assert len(line.splitlines()) == 1 and "cais/mmlu cannot be read" in line and MMLU_SUBSET_TASK in line

    # the paper protocol as well, its chat-template variant where the recipe asks for the template
    assert recipe_evaluation_plan(EvaluationSection(paper_mmlu_file=subset, apply_chat_template=True)) == (
        [MMLU_SUBSET_TASK, PAPER_MMLU_CHAT_TASK], subset)
    assert recipe_evaluation_plan(EvaluationSection(tasks=[], paper_mmlu_file=subset)) == ([PAPER_MMLU_TASK], subset)

    with pytest.raises(FloristError, match=r"set evaluation.mmlu_file to the 1,444-question subset"):
        recipe_evaluation_plan(EvaluationSection())
    with pytest.raises(ValueError, match="name two different files"):
        EvaluationSection(mmlu_file=subset, paper_mmlu_file=str(tmp_path / "other.json"))


def test_recipe_evaluation_runs_the_subset_task_offline_end_to_end(tiny_base, tmp_path, monkeypatch):
    """evaluate_recipe on a published adapter: florist_mmlu offline, with apply_chat_template honoured."""
    import datasets
    import huggingface_hub
    from rich.console import Console

    from florist_hf.evaluation import evaluate_recipe
    from florist_hf.recipe import ModelSection
    from test_evaluation import save_lora_adapter

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    adapter = save_lora_adapter(tiny_base, tmp_path / "adapter")
    chat_base = with_chat_template(tiny_base, tmp_path)

    class Recipe:
        evaluation = EvaluationSection(mmlu_file=str(write_subset(tmp_path)), apply_chat_template=True, log_samples=True)
        model = ModelSection(name_or_path=str(chat_base))

    out_file = tmp_path / "evaluation.json"
    summary = evaluate_recipe(Recipe, str(chat_base), adapter, out_file, Console(record=True, width=300))
    assert set(summary["tasks"]) == {MMLU_SUBSET_TASK} and "acc_stderr" in summary["tasks"][MMLU_SUBSET_TASK]
    written = json.loads(out_file.read_text())
    assert written["apply_chat_template"] is True
    assert all("<|user|>" in sample["arguments"][0][0] for sample in written["samples"][MMLU_SUBSET_TASK])


def test_a_run_whose_mmlu_cannot_be_read_is_refused_before_any_client_trains(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub
    from helpers import write_recipe

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    recipe = write_recipe(tmp_path, evaluation={"tasks": ["mmlu"]})
    result = runner.invoke(app, ["run", str(recipe)])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]  # the base's build may show a bar
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "set evaluation.mmlu_file to the 1,444-question subset" in errors[0]
    assert not list((tmp_path / "run").glob("rounds/*/clients/*"))


def test_an_unanswering_hub_is_unreachable_online_too(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    from florist_hf.evaluation import hub_dataset_unreachable

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert hub_dataset_unreachable("cais/mmlu").startswith("the Hub did not answer (")
    (tmp_path / "hub" / "datasets--cais--mmlu").mkdir(parents=True)  # cached: lm-eval reads it from the cache
    assert hub_dataset_unreachable("cais/mmlu") is None
