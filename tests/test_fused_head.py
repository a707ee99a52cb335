"""TRL's fused LM head on a CPU (`clients.fused_head`): the SFT and DPO clients' heads score the labelled
positions alone, in `CPU_VOCAB_TILE`-wide tiles, and train exactly what TRL's own CPU path trains: the same
loss, gradients and logged metrics to float round-off, in fp32 and under the bf16 autocast clients take on
this CPU, on the tiny Llama and on the real SmolLM2 (its 49,152-word vocabulary in twelve tiles)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import write_recipe
from test_dpo_clients import preference_rows

from florist_hf.clients import fused_head
from florist_hf.recipe import load_recipe


def _client_trainer(base, tmp_path, trainer: str, *, records=None, bf16: bool = False, cutoff: int = 512):
    """A client's trainer as a round builds it (`build_client_trainer`), and its first batch."""
    from transformers import AutoTokenizer

    from florist_hf.clients.config import client_training
    from florist_hf.clients.run import build_client_trainer, build_lora_model, prepare_shard
    from florist_hf.data import demo_records

    tmp_path.mkdir(parents=True, exist_ok=True)
    data_file = tmp_path / "records.json"
    rows = records if records is not None else [
        {"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in demo_records()[:8]]
    data_file.write_text(json.dumps(rows))
    training = {"max_steps": 1, "per_device_train_batch_size": 4, "bf16": bf16, "use_cpu": True}
    recipe = load_recipe(write_recipe(tmp_path, ranks=(4,), rounds=1, client={"trainer": trainer},
                                      data={"source": str(data_file), "cutoff_len": cutoff,
                                            **({} if trainer == "dpo" else {"train_on_inputs": False})},
                                      federation={"eval_heldout_loss": False}, training=training))
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = build_lora_model(str(base), rank=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.0,
                             use_rslora=False, seed=3)
    built = build_client_trainer(model, tokenizer, prepare_shard(recipe, tokenizer, rows),
                                 training=client_training(recipe, 0, 1), work_dir=tmp_path / "work", seed=0, trainer=trainer)
    return built, next(iter(built.get_train_dataloader()))


def _loss_step(trainer, batch) -> tuple[float, dict, dict]:
    """One loss and backward as the Trainer takes them (its autocast included): the loss, the LoRA gradients and
    the metrics TRL logs from the fused head's outputs."""
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    for values in trainer._metrics["train"].values():
        values.clear()
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    gradients = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()
               if values and key in ("entropy", "mean_token_accuracy", "logps/chosen", "logps/rejected")}
    return float(loss.detach()), gradients, metrics


def _trls_own_cpu_path(monkeypatch):
    """TRL's fused head as it came (every position scored, 32,768-word tiles), in place of the tuned one."""
    from trl.trainer import utils as trl_utils

    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton.trl_answer)
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", trl_utils._ChunkedLogProbFunction.function)


def _assert_same_training(tuned, trls, *, loss_rel: float, gradient_rel: float, metric_abs: float):
    (tuned_loss, tuned_gradients, tuned_metrics), (loss, gradients, metrics) = tuned, trls
    assert tuned_loss == pytest.approx(loss, rel=loss_rel)
    assert set(tuned_gradients) == set(gradients) and gradients
    for name, gradient in gradients.items():
        error = float((tuned_gradients[name] - gradient).norm() / (gradient.norm() + 1e-30))
        assert error < gradient_rel, f"{name}: {error:.2e}"
    assert set(tuned_metrics) == set(metrics) and metrics
    for key, value in metrics.items():
        assert tuned_metrics[key] == pytest.approx(value, abs=metric_abs), key


def test_the_locked_trls_fused_head_is_tuned_once():
    """The head of the locked TRL is the one the module was written for: the first SFT or DPO client replaces the
    two names, later ones find them replaced (a TRL whose head changed fails here, not silently slower)."""
    from trl.trainer import utils as trl_utils

    from florist_hf.clients.registry import trainer_kind

    trainer_kind("sft").trainer_class()
    trainer_kind("dpo").trainer_class()
    assert fused_head.tune_fused_lm_head_for_cpu() is True
    assert isinstance(trl_utils._use_triton, fused_head.ScoresLabelledPositionsOnCpu)
    assert isinstance(trl_utils._ChunkedLogProbFunction, fused_head.CpuVocabularyTiles)
    assert not isinstance(trl_utils._use_triton.trl_answer, fused_head.ScoresLabelledPositionsOnCpu)
    assert trl_utils._use_triton(torch.device("cpu")) is True
    assert trl_utils._use_triton(torch.device("meta")) is False  # other devices: TRL's own answer


def test_an_sft_clients_head_on_a_cpu_scores_the_labelled_positions_in_cache_sized_tiles(tiny_base, tmp_path, monkeypatch):
    """Answers alone trained on: the head scores the positions whose next token is an answer's, in tiles
    CPU_VOCAB_TILE wide; TRL's own CPU path scored every position of the batch in one 32,768-word tile."""
    from trl.trainer import utils as trl_utils

    trainer, batch = _client_trainer(tiny_base, tmp_path, "sft")
    calls = []
    tiles = trl_utils._ChunkedLogProbFunction
    function = tiles.function

    class Recording:
        def apply(self, hidden, weight, bias, targets, temperature, chunk_size, *rest):
            calls.append((hidden.shape[0], chunk_size))
            return function.apply(hidden, weight, bias, targets, temperature, chunk_size, *rest)

    monkeypatch.setattr(tiles, "function", Recording())
    _loss_step(trainer, batch)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < labelled < batch["labels"][:, 1:].numel()  # the prompts are masked
    assert calls == [(labelled, fused_head.CPU_VOCAB_TILE)]


@pytest.mark.parametrize("trainer", ["sft", "dpo"])
@pytest.mark.parametrize("bf16", [False, True])
def test_the_tuned_head_trains_what_trls_own_cpu_path_trains(trainer, bf16, tiny_base, tmp_path, monkeypatch):
    """The tiny Llama, its vocabulary in several tiles: the same loss, gradients and metrics as TRL's own path."""
    monkeypatch.setattr(fused_head, "CPU_VOCAB_TILE", 96)
    records = preference_rows("prompt_texts", count=8) if trainer == "dpo" else None
    built, batch = _client_trainer(tiny_base, tmp_path, trainer, records=records, bf16=bf16)
    assert built.model.get_base_model().config.vocab_size > 2 * fused_head.CPU_VOCAB_TILE
    tuned = _loss_step(built, batch)
    with monkeypatch.context() as patch:
        _trls_own_cpu_path(patch)
        trls = _loss_step(built, batch)
    # bf16: the same bf16 products of the same rows, their fp32 sums taken in other tiles.
    _assert_same_training(tuned, trls, loss_rel=1e-6, gradient_rel=1e-5 if not bf16 else 1e-3, metric_abs=1e-5)


@pytest.mark.slow
def test_the_tuned_head_trains_what_trls_own_cpu_path_trains_on_smollm2(smollm2_base, tmp_path, monkeypatch):
    """The real SmolLM2 (tied embeddings, 49,152 words: twelve tiles), an SFT client under the bf16 autocast it takes
    on this CPU and in fp32, on records of the paper's Dolly schema."""
    from florist_hf.data import demo_records

    records = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in demo_records()[:4]]
    for bf16 in (True, False):
        built, batch = _client_trainer(smollm2_base, tmp_path / str(bf16), "sft", records=records, bf16=bf16, cutoff=96)
        tuned = _loss_step(built, batch)
        with monkeypatch.context() as patch:
            _trls_own_cpu_path(patch)
            trls = _loss_step(built, batch)
        _assert_same_training(tuned, trls, loss_rel=1e-6 if not bf16 else 1e-5, gradient_rel=1e-5 if not bf16 else 2e-3,
                              metric_abs=1e-5 if not bf16 else 1e-3)
