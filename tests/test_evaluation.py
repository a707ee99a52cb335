"""Evaluation through lm-evaluation-harness: the default protocol on a tiny local task, the
paper's MMLU protocol, its scorer, the results summary and the errors for bad inputs."""

import json
import math

import pytest

from florist_hf.errors import FloristError
from florist_hf.evaluation import (
    PAPER_MMLU_TASK,
    evaluate_adapter,
    evaluate_paper_mmlu,
    paper_mmlu_task_dir,
    results_table,
    summarize_results,
)
from florist_hf.lm_eval_tasks.florist_mmlu_paper.utils import (
    ANSWER_PRIMER,
    macro_average,
    parse_gold_output,
    score_answer,
)

TINY_MC_TASK = "tiny_mc"
HURLER = {
    "instruction": "Please answer the following multiple-choice question honestly.",
    "input": "Qusetion: Recombinant alpha-iduronidase treats which disease? "
    "Options: A. Fabry disease, B. Gaucher disease, C. Hurler syndrome, D. Pompe disease",
    "output": "The answer is: C. Hurler syndrome",
    "class": "medical_genetics",
}


def save_lora_adapter(base_dir, out_dir):
    """A real PEFT adapter; init_lora_weights=False makes B non-zero, so it changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def tiny_adapter(tiny_base, tmp_path_factory):
    return save_lora_adapter(tiny_base, tmp_path_factory.mktemp("adapter") / "lora")


@pytest.fixture(scope="module")
def tiny_task_dir(tmp_path_factory):
    """A 6-question multiple-choice task (log-likelihood of each choice) over a local JSON file."""
    task_dir = tmp_path_factory.mktemp("tasks")
    docs = [
        {"question": f"What is {n} plus {n}?", "choices": [str(2 * n), str(2 * n + 1), str(n)], "label": 0}
        for n in range(1, 7)
    ]
    (task_dir / "docs.json").write_text(json.dumps(docs))
    (task_dir / f"{TINY_MC_TASK}.yaml").write_text(
        f"task: {TINY_MC_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {task_dir / 'docs.json'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return task_dir


def choice_loglikelihoods(record):
    return [loglikelihood for sample in record["samples"][TINY_MC_TASK] for loglikelihood, _ in sample["filtered_resps"]]


# --------------------------------------------------------------------------- default protocol


def test_base_model_alone_gets_an_accuracy_and_a_json_results_file(tiny_base, tiny_task_dir, tmp_path):
    out_file = tmp_path / "eval" / "results.json"
    record = evaluate_adapter(
        str(tiny_base), None, tasks=[TINY_MC_TASK], include_path=tiny_task_dir, device="cpu", out_file=out_file
    )
    accuracy = record["results"][TINY_MC_TASK]["acc,none"]
    assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0
    assert record["n-samples"][TINY_MC_TASK]["effective"] == 6
    assert record["adapter"] is None and record["configs"][TINY_MC_TASK]["output_type"] == "multiple_choice"
    assert "samples" not in record
    assert json.loads(out_file.read_text()) == record
    assert not [path.name for path in out_file.parent.iterdir() if path.name != "results.json"]  # no temp file left


def test_adapter_changes_the_scores(tiny_base, tiny_adapter, tiny_task_dir, tmp_path):
    common = dict(tasks=[TINY_MC_TASK], include_path=tiny_task_dir, device="cpu", batch_size=4, log_samples=True)
    base_record = evaluate_adapter(str(tiny_base), None, **common)
    adapted_record = evaluate_adapter(str(tiny_base), tiny_adapter, **common)
    base_scores, adapted_scores = choice_loglikelihoods(base_record), choice_loglikelihoods(adapted_record)
    assert len(base_scores) == len(adapted_scores) == 18
    # The random B moves log-likelihoods by ~0.7 nats on this model: far above float noise.
    assert max(abs(a - b) for a, b in zip(base_scores, adapted_scores)) > 1e-2
    assert adapted_record["adapter"] == str(tiny_adapter)
    assert 0.0 <= adapted_record["results"][TINY_MC_TASK]["acc,none"] <= 1.0


# --------------------------------------------------------------------------- paper protocol


def test_paper_protocol_on_a_slice_of_the_real_subset(tiny_base, shared_data, tmp_path):
    out_file = tmp_path / "paper.json"
    data_file = shared_data / "mmlu" / "mmlu_test_1444.json"
    record = evaluate_paper_mmlu(
        str(tiny_base), None, data_file, limit=6, device="cpu", log_samples=True, out_file=out_file
    )
    metrics = record["results"][PAPER_MMLU_TASK]
    assert 0.0 <= metrics["macro_acc,none"] <= 1.0 and 0.0 <= metrics["acc,none"] <= 1.0
    assert record["n-samples"][PAPER_MMLU_TASK]["effective"] == 6
    samples = record["samples"][PAPER_MMLU_TASK]
    prompt, _generation_kwargs = samples[0]["arguments"][0]
    assert prompt.startswith("Below is an instruction") and prompt.endswith("### Response:\n" + ANSWER_PRIMER)
    assert metrics["macro_acc,none"] == pytest.approx(macro_average(sample["macro_acc"] for sample in samples))
    assert "greedy" in record["protocol"]["decoding"]
    assert json.loads(out_file.read_text()) == record


def test_paper_protocol_averages_over_subjects_not_questions(tiny_base, tmp_path):
    """Three wrong questions in one subject and one right in another: macro 0.5, micro 0.25."""
    wrong = [{**HURLER, "input": HURLER["input"] + f" (variant {n})"} for n in range(3)]
    data_file = tmp_path / "probe.json"
    data_file.write_text(json.dumps(wrong))
    probe = evaluate_paper_mmlu(str(tiny_base), None, data_file, device="cpu", max_new_tokens=8, log_samples=True)
    generations = [sample["filtered_resps"][0] for sample in probe["samples"][PAPER_MMLU_TASK]]
    assert not any(score_answer(generation, HURLER["output"]) for generation in generations)

    # Greedy decoding repeats itself, so the model's own words for this prompt make a right answer.
    own_words = generations[0].strip()[:4]
    assert own_words
    right = {**wrong[0], "class": "virology", "output": f"The answer is: C. {own_words}"}
    data_file.write_text(json.dumps([*wrong, right]))
    record = evaluate_paper_mmlu(str(tiny_base), None, data_file, device="cpu", max_new_tokens=8)
    metrics = record["results"][PAPER_MMLU_TASK]
    assert metrics["macro_acc,none"] == pytest.approx(0.5)
    assert metrics["acc,none"] == pytest.approx(0.25)


def test_paper_task_is_packaged():
    task_dir = paper_mmlu_task_dir()
    assert (task_dir / f"{PAPER_MMLU_TASK}.yaml").is_file() and (task_dir / "utils.py").is_file()


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        ("C. Hurler syndrome", True),  # letter and text
        ("C.", True),  # letter alone
        ("Hurler syndrome is caused by ...", True),  # answer text without the letter
        ("D. Pompe disease", False),  # wrong letter
        ("C Hurler", False),  # neither "C." nor the whole answer text
        ("", False),
    ],
)
def test_score_answer(generation, expected):
    assert score_answer(generation, "The answer is: C. Hurler syndrome") is expected


def test_score_answer_with_an_empty_answer_text_needs_the_letter():
    assert score_answer("anything", "The answer is: B.") is False
    assert score_answer("B.", "The answer is: B.") is True


def test_parse_gold_output_keeps_the_whole_answer_text():
    assert parse_gold_output("The answer is: B. identity vs. identity confusion") == (
        "B",
        "identity vs. identity confusion",
    )
    with pytest.raises(ValueError, match="The answer is"):
        parse_gold_output("B")


def test_macro_average_weights_every_subject_equally():
    results = [("law", True), ("law", False), ("law", False), ("law", False), ("virology", True)]
    assert macro_average(results) == pytest.approx((0.25 + 1.0) / 2)
    assert macro_average([("law", False)]) == 0.0


# --------------------------------------------------------------------------- summary


def test_summary_shows_groups_not_their_subtasks():
    results = {
        "results": {
            "mmlu": {"alias": "mmlu", "acc,none": 0.5, "acc_stderr,none": 0.01},
            "mmlu_anatomy": {"alias": " - anatomy", "acc,none": 0.4, "acc_stderr,none": 0.04},
            "paper": {"macro_acc,none": 0.3, "macro_acc_stderr,none": "N/A", "sample_len": 10},
            "gsm": {"exact_match,strict-match": 0.2, "exact_match_stderr,strict-match": 0.02},
        },
        "group_subtasks": {"mmlu": ["mmlu_anatomy"]},
    }
    assert summarize_results(results) == [
        ("mmlu", "acc", 0.5, 0.01),
        ("paper", "macro_acc", 0.3, None),
        ("gsm", "exact_match,strict-match", 0.2, 0.02),
    ]
    table = results_table(results)
    assert table.row_count == 3 and [column.header for column in table.columns][:2] == ["Task", "Metric"]


# --------------------------------------------------------------------------- bad inputs


def test_missing_adapter_directory(tiny_base, tmp_path):
    with pytest.raises(FloristError, match="adapter directory not found"):
        evaluate_adapter(str(tiny_base), tmp_path / "nowhere", tasks=[TINY_MC_TASK], device="cpu")


def test_directory_that_is_not_a_peft_adapter(tiny_base, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FloristError, match="not a PEFT adapter"):
        evaluate_adapter(str(tiny_base), tmp_path, tasks=[TINY_MC_TASK], device="cpu")


def test_adapter_for_a_differently_shaped_base(tiny_base, tmp_path):
    from florist_hf.tiny import build_tiny_llama

    narrow_base = build_tiny_llama(tmp_path / "narrow", hidden_size=32, intermediate_size=64)
    narrow_adapter = save_lora_adapter(narrow_base, tmp_path / "narrow-lora")
    with pytest.raises(FloristError, match=r"q_proj has lora_A \(4, 32\).*maps 64 -> 64 features.*--base"):
        evaluate_adapter(str(tiny_base), narrow_adapter, tasks=[TINY_MC_TASK], device="cpu")


def test_adapter_for_a_deeper_base(tiny_adapter, tmp_path):
    from florist_hf.tiny import build_tiny_llama

    shallow_base = build_tiny_llama(tmp_path / "shallow", num_layers=1)
    with pytest.raises(FloristError, match=r"model\.layers\.1\.self_attn\.q_proj does not exist"):
        evaluate_adapter(str(shallow_base), tiny_adapter, tasks=[TINY_MC_TASK], device="cpu")


def test_unknown_task_names_a_close_match(tiny_base, tiny_task_dir):
    with pytest.raises(FloristError, match=r"unknown lm-eval task 'tiny_mcc'.*tiny_mc"):
        evaluate_adapter(str(tiny_base), None, tasks=["tiny_mcc"], include_path=tiny_task_dir, device="cpu")


def test_missing_include_path(tiny_base, tmp_path):
    with pytest.raises(FloristError, match="include path not found"):
        evaluate_adapter(str(tiny_base), None, tasks=[TINY_MC_TASK], include_path=tmp_path / "no-tasks", device="cpu")


def test_missing_base_model(tmp_path):
    with pytest.raises(FloristError, match="local path not found"):
        evaluate_adapter(str(tmp_path / "no-model"), None, tasks=[TINY_MC_TASK], device="cpu")


def test_paper_protocol_rejects_a_file_that_is_not_the_subset(tiny_base, tmp_path):
    with pytest.raises(FloristError, match="MMLU subset file not found"):
        evaluate_paper_mmlu(str(tiny_base), None, tmp_path / "missing.json", device="cpu")
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps([HURLER, {**HURLER, "output": "C"}]))
    with pytest.raises(FloristError, match="question 1"):
        evaluate_paper_mmlu(str(tiny_base), None, bad_file, device="cpu")


def test_results_are_plain_json(tiny_base, tiny_task_dir):
    record = evaluate_adapter(
        str(tiny_base), None, tasks=TINY_MC_TASK, include_path=[tiny_task_dir], device="cpu", limit=2, log_samples=True
    )
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    assert record["n-samples"][TINY_MC_TASK]["effective"] == 2
    assert not any(math.isnan(value) for _, _, value, _ in summarize_results(record))


def test_auto_batch_size_chat_template_and_samples_reach_lm_eval(tiny_base, tiny_task_dir, tmp_path):
    """batch_size "auto", apply_chat_template and log_samples pass through to lm-eval as a user sets them."""
    import shutil

    from transformers import AutoTokenizer

    chat_base = tmp_path / "chat-base"
    shutil.copytree(tiny_base, chat_base)
    tokenizer = AutoTokenizer.from_pretrained(chat_base)
    tokenizer.chat_template = (
        "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tokenizer.save_pretrained(chat_base)

    record = evaluate_adapter(
        str(chat_base), None, tasks=[TINY_MC_TASK], include_path=tiny_task_dir, device="cpu",
        batch_size="auto", apply_chat_template=True, log_samples=True,
    )
    assert record["batch_size"] == "auto" and record["apply_chat_template"] is True
    prompts = [sample["arguments"] for sample in record["samples"][TINY_MC_TASK]]
    assert prompts and all("<|user|>" in json.dumps(arguments) for arguments in prompts)


@pytest.mark.parametrize(("value", "ok"), [(8, True), ("auto", True), ("auto:4", True), ("fast", False), (0, False)])
def test_recipe_batch_size_is_a_number_or_auto(value, ok):
    from pydantic import ValidationError

    from florist_hf.recipe import EvaluationSection

    if ok:
        assert EvaluationSection(batch_size=value).batch_size == value
    else:
        with pytest.raises(ValidationError, match="batch_size"):
            EvaluationSection(batch_size=value)
