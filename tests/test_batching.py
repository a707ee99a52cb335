"""Padding-free batches: the same trained tokens, loss and gradients as padded ones, no token
attending across records, a padded fallback where attention cannot keep records apart, and the
speed options' one-line refusals."""

from __future__ import annotations

import pytest
import torch

from florist_hf.errors import FloristError

RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Summarise the text in one short sentence, please.", "input": "Cats sleep a lot and purr.",
     "output": "Cats sleep and purr a lot."},
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Translate to French: good morning, my friend, how are you today?", "input": "",
     "output": "Bonjour mon ami, comment vas-tu aujourd'hui ?"},
    {"instruction": "Spell cat backwards.", "input": "", "output": "tac"},
    {"instruction": "What is the opposite of hot?", "input": "", "output": "The opposite of hot is cold."},
]


#: A record as long as three or four of the others: they share rows no longer than it.
LONG_RECORD = {"instruction": "Write a short story about a lighthouse keeper.", "input": "",
               "output": " ".join(["The keeper climbed the stairs and lit the lamp again."] * 9)}


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def _lora_model(tiny_base, attn_implementation="sdpa"):
    from florist_hf.clients.run import build_lora_model

    return build_lora_model(str(tiny_base), rank=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.0,
                            use_rslora=False, seed=3, attn_implementation=attn_implementation)


class _Gradients:
    """Keeps the LoRA gradients of every optimizer step (before clipping's effect is applied)."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                outer.steps.append({name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None})

        self.steps: list[dict] = []
        self.callback = Callback()


@pytest.mark.parametrize("one_row", [True, False])
@pytest.mark.parametrize("train_on_inputs", [False, True])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_padding_free_trains_like_padded(tiny_base, tokenizer, tmp_path, attn_implementation, train_on_inputs, one_row):
    """Same first steps, loss and gradients (batch 4, 2 accumulation steps: the Trainer's token
    count spans both), whichever way the batch is laid out."""
    from florist_hf.clients.run import build_client_trainer
    from florist_hf.data import tokenize_records

    # Batches of 4 of these 7 records: where the long one is in a batch, the others share rows.
    dataset = tokenize_records([*RECORDS, LONG_RECORD], tokenizer, cutoff_len=1024, train_on_inputs=train_on_inputs)
    results = {}
    for batching in ("padded", "padding_free"):
        gradients = _Gradients()
        trainer = build_client_trainer(
            _lora_model(tiny_base, attn_implementation), tokenizer, dataset, work_dir=tmp_path / batching, seed=0,
            training={"max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                      "learning_rate": 1e-2, "max_grad_norm": 0.0, "logging_steps": 1},
            callbacks=[gradients.callback], batching=batching, one_row=one_row,
        )
        output = trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        results[batching] = (output.training_loss, losses, gradients.steps)
    (padded_loss, padded_steps, padded_grads), (free_loss, free_steps, free_grads) = results["padded"], results["padding_free"]
    assert free_loss == pytest.approx(padded_loss, rel=1e-5)
    assert free_steps == pytest.approx(padded_steps, rel=1e-5)
    assert len(padded_grads) == len(free_grads) == 2
    for padded, free in zip(padded_grads, free_grads):
        assert padded.keys() == free.keys() and padded
        assert any(float(grad.norm()) > 0 for grad in padded.values())
        for name in padded:  # (lora_A's first gradient is 0: lora_B starts at zero)
            error = float((free[name] - padded[name]).norm()) / max(float(padded[name].norm()), 1e-12)
            assert error < 1e-4 or float(free[name].norm()) == float(padded[name].norm()) == 0.0, \
                f"{name}: gradients differ by {error:.2e}"


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_no_token_attends_across_a_record_boundary(tiny_base, tokenizer, attn_implementation):
    from florist_hf.data import make_collator, tokenize_records

    model = _lora_model(tiny_base, attn_implementation).eval()
    first, second, other = tokenize_records(RECORDS[:3], tokenizer, cutoff_len=256)
    collate = make_collator(tokenizer, "padding_free", one_row=True)
    # Without a KV cache, as in training (the Trainer sets use_cache from TrainingArguments): with
    # one, transformers reads positions as a continuation, not as packed records.
    with torch.no_grad():
        packed = model(**{k: v for k, v in collate([first, second]).items() if k != "labels"}, use_cache=False).logits[0]
        changed = model(**{k: v for k, v in collate([first, other]).items() if k != "labels"}, use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([second["input_ids"]]), use_cache=False).logits[0]
    n = len(first["input_ids"])
    # Record 1's logits do not see record 2, and record 2 in the row is computed as if alone.
    assert torch.equal(packed[:n], changed[:n]) or torch.allclose(packed[:n], changed[:n], atol=1e-6)
    assert torch.allclose(packed[n:], alone, atol=1e-5)
    # Rows of bounded length, the shorter ones ending in a pad block: each record as if alone too.
    rows = tokenize_records([*RECORDS, LONG_RECORD], tokenizer, cutoff_len=1024)
    bounded = make_collator(tokenizer, "padding_free")
    batch = bounded(list(rows))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for row_index, row in enumerate(bounded.rows([len(r["input_ids"]) for r in rows])):
            start = 0
            for index in row:
                length = len(rows[index]["input_ids"])
                single = model(input_ids=torch.tensor([rows[index]["input_ids"]]), use_cache=False).logits[0]
                assert torch.allclose(logits[row_index, start:start + length], single, atol=1e-5)
                start += length


def test_rows_of_bounded_length_hold_every_record_once_with_a_pad_block_of_their_own(tokenizer):
    from florist_hf.data import IGNORE_INDEX, PackedRowsCollator, tokenize_records

    records = [*RECORDS, LONG_RECORD]
    rows = tokenize_records(records, tokenizer, cutoff_len=1024, train_on_inputs=True)
    lengths = [len(row["input_ids"]) for row in rows]
    collate = PackedRowsCollator(tokenizer.pad_token_id)
    members = collate.rows(lengths)
    assert sorted(i for row in members for i in row) == list(range(len(records)))
    # No row longer than the longest record (no more attention than a padded row), fewer rows.
    assert all(sum(lengths[i] for i in row) <= max(lengths) for row in members) and 1 < len(members) < len(records)
    batch = collate(list(rows))
    assert batch["input_ids"].shape == (len(members), max(sum(lengths[i] for i in row) for row in members))
    for row, ids, positions, labels in zip(members, batch["input_ids"], batch["position_ids"], batch["labels"]):
        used = sum(lengths[i] for i in row)
        assert positions[:used].tolist() == [p for i in row for p in range(lengths[i])]
        assert positions[used:].tolist() == list(range(len(ids) - used))  # the pad block: positions of its own
        assert bool((ids[used:] == tokenizer.pad_token_id).all()) and bool((labels[used:] == IGNORE_INDEX).all())
        trained = sum(1 for i in row for label in rows[i]["labels"][1:] if label != IGNORE_INDEX)
        assert int((labels != IGNORE_INDEX).sum()) == trained


def test_padding_free_collator_masks_each_records_first_label_only(tokenizer):
    from florist_hf.data import IGNORE_INDEX, make_collator, tokenize_records

    rows = tokenize_records(RECORDS[:2], tokenizer, cutoff_len=256, train_on_inputs=True)
    batch = make_collator(tokenizer, "padding_free", one_row=True)([rows[0], rows[1]])
    n0, n1 = len(rows[0]["input_ids"]), len(rows[1]["input_ids"])
    assert batch["input_ids"].shape == (1, n0 + n1) and "attention_mask" not in batch
    assert batch["position_ids"][0].tolist() == list(range(n0)) + list(range(n1))
    labels = batch["labels"][0].tolist()
    assert labels[0] == labels[n0] == IGNORE_INDEX
    assert labels[1:n0] == rows[0]["labels"][1:] and labels[n0 + 1:] == rows[1]["labels"][1:]


def test_padding_free_falls_back_to_padded_with_one_line_where_attention_cannot_keep_records_apart(tiny_base):
    import io

    from rich.console import Console

    from florist_hf.clients.batching import client_batching, padding_free_unsupported

    model = _lora_model(tiny_base)
    assert padding_free_unsupported(model) is None and client_batching("padding_free", model) == "padding_free"
    model.get_base_model().config._attn_implementation = "paged|sdpa"  # a kernel that does not read packed positions
    out = io.StringIO()
    assert client_batching("padding_free", model, Console(file=out, width=200)) == "padded"
    assert client_batching("padding_free", model, Console(file=out, width=200)) == "padded"
    said = out.getvalue().strip().splitlines()
    assert len(said) == 1 and "'paged|sdpa'" in said[0] and "batches are padded" in said[0]
    assert client_batching("padded", model) == "padded"


def test_length_grouped_sampling_reaches_the_trainer(tiny_base, tokenizer, tmp_path):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from florist_hf.clients.run import build_client_trainer
    from florist_hf.data import tokenize_records

    dataset = tokenize_records(RECORDS, tokenizer, cutoff_len=256)
    trainer = build_client_trainer(_lora_model(tiny_base), tokenizer, dataset, work_dir=tmp_path, seed=0, batching="padded",
                                   training={"max_steps": 1, "train_sampling_strategy": "group_by_length",
                                             "per_device_train_batch_size": 2})
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)


def test_speed_options_without_their_packages_are_one_line(tiny_base, tokenizer, tmp_path, monkeypatch):
    import importlib.util

    from florist_hf.clients.run import build_client_trainer
    from florist_hf.data import tokenize_records

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("liger_kernel", "flash_attn") else real_find_spec(name, *a))
    dataset = tokenize_records(RECORDS, tokenizer, cutoff_len=64)
    with pytest.raises(FloristError, match="training.use_liger_kernel needs the liger-kernel package: pip install liger-kernel"):
        build_client_trainer(_lora_model(tiny_base), tokenizer, dataset, work_dir=tmp_path, seed=0,
                             training={"max_steps": 1, "use_liger_kernel": True})
    with pytest.raises(FloristError, match="model.attn_implementation: flash_attention_2 needs the flash-attn package"):
        _lora_model(tiny_base, "flash_attention_2")


def test_batch_layout_and_attention_do_not_change_a_runs_fingerprint():
    from pathlib import Path

    from florist_hf.recipe import client_training_changes
    from florist_hf.recipe import load_recipe

    demo = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu_demo.yaml"
    default, padded = load_recipe(demo), load_recipe(demo, ["data.batching=padded", "model.attn_implementation=eager"])
    assert default.data.batching == "padding_free"
    assert padded.fingerprint() == default.fingerprint() and client_training_changes(default, padded) == []
