"""TRL's SFTTrainer clients (``client.trainer: sft``): on the shipped paper recipes they train on the same
tokens with the same labels masked as the stock Trainer client, to the same losses and the same published
adapter; padding-free equals padded; DP-SGD works on them; TRL's data formats federate through the CLI;
bad data in the new formats is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import chat_base_copy, delta_weights, quiet_console, write_recipe
from test_recipes import REPO, conformance_overrides, stand_ins  # noqa: F401 - the stand-ins fixture
from typer.testing import CliRunner

from florist_hf.cli import app
from florist_hf.errors import FloristError
from florist_hf.recipe import load_recipe

runner = CliRunner()

#: One shipped recipe per kind of tokenizer and data the paper's settings use: Llama-1's sentencepiece with
#: BOS on Dolly, Llama 3's on Alpaca, TinyLlama's on WizardLM (prompt trained on: train_on_inputs true), and
#: the real SmolLM2 with its chat template and only the answers trained on (train_on_inputs false), with and
#: without DP-SGD.
INVARIANCE_RECIPES = [
    "llama7b_dolly_heter", "llama32_1b_alpaca_homo", "tinyllama_wizard_homo",
    pytest.param("smollm2_135m_demo", marks=pytest.mark.slow), pytest.param("smollm2_135m_dolly_dp", marks=pytest.mark.slow),
]


def float64_causal_lm_loss(outputs, labels, num_items_in_batch=None):
    """transformers' causal-LM loss (``ForCausalLMLoss``: next-token cross-entropy summed over the unmasked
    labels, divided by their count in the accumulated batch) in the logits' own dtype, where transformers
    first casts the logits to fp32."""
    from florist_hf.data import IGNORE_INDEX

    logits = outputs.logits
    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].to(logits.device)
    total = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                              reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum())


def _lm_head_losses(trainer_object) -> dict:
    """On a client's first batch: the loss and the LoRA gradients by TRL's fused LM head (the SFTTrainer's own
    loss), by transformers' causal-LM loss (the stock Trainer's) and in the model's dtype throughout
    (`float64_causal_lm_loss`), computed beside the training (``torch.autograd.grad``: no ``.grad`` is touched)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    model = trainer_object.model
    batch = trainer_object.data_collator([trainer_object.train_dataset[index] for index in range(2)])
    labels = batch["labels"]
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    outputs = model(**{key: value for key, value in batch.items() if key != "labels"})
    losses = {"trl": model(**batch, fused_lm_head=True).loss,
              "transformers": ForCausalLMLoss(outputs.logits, labels, vocab_size=outputs.logits.shape[-1]),
              "exact": float64_causal_lm_loss(outputs, labels)}
    return {name: (loss.detach(), torch.autograd.grad(loss, trainable, retain_graph=True)) for name, loss in losses.items()}


def _train(recipe_file: Path, out_dir: Path, stand_ins, trainer: str, monkeypatch, *, dtype: str = "float32",
           extra: tuple = (), loss=None, lm_head_check: bool = False) -> dict:
    """Run a recipe (conformance overrides, 3 steps of batch 2 per client, then ``extra``) with ``trainer`` clients,
    the base in ``dtype``, the Trainer's ``compute_loss_func`` ``loss`` if given; returns each client's prepared rows
    (input_ids, labels), logged losses, the loss of every step as computed, the LoRA gradients of every step, with
    ``lm_head_check`` `_lm_head_losses` on the first client's first batch, and the run directory."""
    from transformers import TrainerCallback

    from florist_hf.clients import run as client_run
    from florist_hf.runner import run_federation

    overrides = [o for o in conformance_overrides(recipe_file, out_dir, stand_ins) if not o.startswith("training.max_steps")]
    # In fp32: on a bf16 base (the paper recipes' model.dtype) or under bf16 autocast, TRL's fused LM head
    # computes the log-probabilities from bf16 products in chunks where the Trainer's loss upcasts whole logits,
    # so there the two agree only to bf16's round-off (gradients ~3e-3 apart).
    overrides += [f"model.dtype={dtype}", "training.bf16=false", "training.fp16=false", "training.max_steps=3", "training.logging_steps=1", "data.max_samples_per_client=6", f"client.trainer={trainer}", *extra]
    recipe = load_recipe(recipe_file, overrides)
    seen: dict = {"rows": [], "losses": [], "step_losses": [], "gradients": [], "lm_head": []}
    build = client_run.build_client_trainer

    class Losses(TrainerCallback):
        """Every logged loss, and the LoRA gradients of every optimizer step."""

        def __init__(self):
            self.losses, self.gradients = [], []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.gradients.append({name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None})

    def recording(*args, callbacks=(), **kwargs):
        losses = Losses()
        trainer_object = build(*args, callbacks=[*callbacks, losses], **kwargs)
        if loss is not None:
            trainer_object.compute_loss_func = loss  # the Trainer's own hook, which TRL's SFTTrainer honours
        if lm_head_check and not seen["lm_head"]:
            seen["lm_head"].append(_lm_head_losses(trainer_object))  # the first client's
        dataset = trainer_object.train_dataset
        seen["rows"].append([(list(row["input_ids"]), list(row["labels"])) for row in dataset])
        seen["losses"].append(losses.losses)
        seen["gradients"].append(losses.gradients)
        # The loss of every step as the trainer computes it (the logged one is summed in fp32).
        step_losses, compute_loss = [], trainer_object.compute_loss

        def computing(*args, **kwargs):
            result = compute_loss(*args, **kwargs)
            step_losses.append((result[0] if isinstance(result, tuple) else result).detach())
            return result

        trainer_object.compute_loss = computing
        seen["step_losses"].append(step_losses)
        return trainer_object

    # One secret noise seed for both runs: a DP-SGD client then draws the same batches and noise.
    out_dir.mkdir(parents=True)
    (out_dir / "privacy-seed").write_text("5e" * 32)
    with monkeypatch.context() as patch:
        patch.setattr(client_run, "build_client_trainer", recording)
        seen["run_dir"] = run_federation(recipe, console=quiet_console())
    return seen


@pytest.mark.parametrize("name", INVARIANCE_RECIPES)
def test_sft_clients_train_like_the_trainer_clients_on_the_paper_recipes(name, tmp_path, stand_ins, monkeypatch):
    recipe_file = REPO / "recipes" / f"{name}.yaml"
    plain = _train(recipe_file, tmp_path / "trainer", stand_ins, "trainer", monkeypatch)
    sft = _train(recipe_file, tmp_path / "sft", stand_ins, "sft", monkeypatch)
    # The same tokens, the same labels masked, client by client.
    assert sft["rows"] == plain["rows"]
    assert any(-100 in labels for rows in sft["rows"] for _, labels in rows) == (
        not yaml.safe_load(recipe_file.read_text())["data"].get("train_on_inputs", True))
    # The same first gradients, to the fp32 round-off of the two losses' log-softmax over the vocabulary (TRL's
    # fused LM head in chunks, the Trainer's through torch's whole-row kernel: the fp64 test below shows that this
    # is the whole difference, and that most of it on SmolLM2 is the Trainer's own loss's). After
    # the first step AdamW carries that round-off on: its first steps are ±lr wherever a gradient is not ~0, and
    # an element of B's gradient within round-off of 0 can take either sign, so later gradients of lora_A (∝ B)
    # move by up to ~1e-2 relative; the losses and the published adapter below are what must agree.
    for ours, theirs in zip(sft["gradients"], plain["gradients"]):
        for name in theirs[0]:
            error = float((ours[0][name] - theirs[0][name]).norm() / (theirs[0][name].norm() + 1e-30))
            assert error < 5e-4, f"first step {name}: {error:.2e}"
    # The same first loss (the same forward pass) to that round-off: within 1e-6 relative on the stand-ins, 5e-6
    # absolute on the real SmolLM2 (there the Trainer's loss is off the exact one by up to ~4e-5 relative, TRL's
    # by ~6e-7: the fp64 test below); the next steps' to that round-off carried on by AdamW.
    assert len(sft["losses"]) == len(plain["losses"]) and all(len(losses) == 3 for losses in sft["losses"])
    for ours, theirs in zip(sft["losses"], plain["losses"]):
        assert ours[0] == pytest.approx(theirs[0], abs=1e-5, rel=1e-6)
        assert ours == pytest.approx(theirs, abs=1e-4, rel=1e-5)
    # The same published adapter, within the round-off that three AdamW steps carry on: ≤ 1e-4 on the stand-ins,
    # up to ~1e-2 in a module on the real SmolLM2 at the demo's learning rate (2e-3), where AdamW's sign-like first
    # steps turn B-gradient elements within round-off of zero into ±lr apart.
    for relative in ("global_adapter", "rounds/1/global"):
        got, expected = delta_weights(sft["run_dir"] / relative), delta_weights(plain["run_dir"] / relative)
        assert set(got) == set(expected)
        for module in expected:
            error = float((got[module] - expected[module]).norm() / expected[module].norm())
            assert error < 2e-2, f"{relative} {module}: {error:.2e}"


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm()) if expected.norm() > 0 else float(got.norm())


@pytest.mark.parametrize("name", INVARIANCE_RECIPES)
def test_sft_clients_are_the_trainer_clients_computation_in_fp64(name, tmp_path, stand_ins, monkeypatch):
    """What the fp32 tolerances above are, shown in fp64 (model.dtype: float64, no autocast). Neither trainer's
    own loss runs in fp64: transformers' causal-LM loss casts the logits to fp32 (``ForCausalLMLoss``), and TRL's
    fused LM head casts each tile of logits to fp32 and sums its softmax and the hidden states' gradient in fp32
    (``trl/kernels/chunked_logprob.py``), whatever the model's dtype. So:

    1. with one loss on both kinds (the Trainer's ``compute_loss_func``, which TRL's SFTTrainer honours:
       transformers' causal-LM loss kept in fp64), an SFT client is a Trainer client's computation: the same
       rows, the losses of every step to 1e-12, their gradients and the published adapters to 1e-10 (all bit
       for bit on this machine);
    2. each kind's own loss, on the first client's first batch, is that fp64 loss up to its fp32 log-softmax's
       round-off: TRL's fused head's within 1e-6 relative, its LoRA gradients 2e-5 (measured on every client's first batch:
       ≤ 1.2e-7 and 6.3e-7 on the stand-ins, ≤ 5.7e-7 and 7.1e-6 on SmolLM2), transformers' within 1e-4 and 1e-3
       (≤ 7.4e-8 and 9.4e-8 on the stand-ins, ≤ 3.6e-5 and 1.8e-4 on SmolLM2, whose logits reach ~40: torch's fp32
       log-softmax on the CPU is off by ~6e-6 a token there, biased). The fp32 check's first-step differences are
       these two round-offs and nothing else.

    Under DP-SGD both kinds train on DP-SGD's per-record loss (`dp_sgd.DPSGD.compute_loss`), in fp64 here."""
    recipe_file = REPO / "recipes" / f"{name}.yaml"
    # No LoRA dropout: TRL's compute_loss_func branch runs one more forward (no-grad, for its token metrics),
    # which would draw other dropout masks. Two steps carry the optimizer's state into a step.
    extra = ("lora.dropout=0.0", "training.max_steps=2", "data.max_samples_per_client=4")
    dp_sgd = load_recipe(recipe_file).privacy is not None
    plain = _train(recipe_file, tmp_path / "trainer", stand_ins, "trainer", monkeypatch, dtype="float64", extra=extra,
                   loss=float64_causal_lm_loss)
    sft = _train(recipe_file, tmp_path / "sft", stand_ins, "sft", monkeypatch, dtype="float64", extra=extra,
                 loss=float64_causal_lm_loss, lm_head_check=not dp_sgd)
    assert sft["rows"] == plain["rows"]
    assert all(len(losses) == 2 and losses[0].dtype == torch.float64 for losses in sft["step_losses"])
    for ours, theirs in zip(sft["step_losses"], plain["step_losses"], strict=True):
        assert [float(loss) for loss in ours] == pytest.approx([float(loss) for loss in theirs], rel=1e-12, abs=0)
    for ours, theirs in zip(sft["gradients"], plain["gradients"], strict=True):
        assert len(ours) == len(theirs) == 2
        for step in range(2):
            assert set(ours[step]) == set(theirs[step])
            for parameter in theirs[step]:
                error = _relative(ours[step][parameter], theirs[step][parameter])
                assert error < 1e-10, f"step {step + 1} {parameter}: {error:.2e}"
    for relative in ("global_adapter", "rounds/1/global"):
        got, expected = delta_weights(sft["run_dir"] / relative), delta_weights(plain["run_dir"] / relative)
        assert set(got) == set(expected)
        for module in expected:
            error = _relative(got[module], expected[module])
            assert error < 1e-10, f"{relative} {module}: {error:.2e}"
    assert len(sft["lm_head"]) == (0 if dp_sgd else 1)
    for check in sft["lm_head"]:
        exact_loss, exact_gradients = check["exact"]
        for kind, loss_bound, gradient_bound in (("trl", 1e-6, 2e-5), ("transformers", 1e-4, 1e-3)):
            loss, gradients = check[kind]
            assert abs(float(loss - exact_loss)) <= loss_bound * float(exact_loss), kind
            errors = [_relative(got, expected) for got, expected in zip(gradients, exact_gradients, strict=True)]
            assert max(errors) < gradient_bound, f"{kind}: {max(errors):.2e}"


@pytest.mark.parametrize("template,train_on_inputs", [("alpaca", True), ("alpaca", False), ("chat", False)])
def test_sft_padding_free_trains_like_padded(tiny_base, tmp_path, template, train_on_inputs):
    """SFT clients on packed rows: the same loss and gradients as on padded rows."""
    from transformers import AutoTokenizer

    from florist_hf.clients.config import client_training
    from florist_hf.clients.run import build_client_trainer, build_lora_model, prepare_shard
    from florist_hf.data import demo_records

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    if template == "chat":
        tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                                   "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    recipe = load_recipe(write_recipe(tmp_path, ranks=(4,), rounds=1, client={"trainer": "sft"},
                                      data={"template": template, "train_on_inputs": train_on_inputs, "cutoff_len": 512},
                                      training={"max_steps": 2, "per_device_train_batch_size": 4,
                                                "gradient_accumulation_steps": 2, "max_grad_norm": 0.0}))
    dataset = prepare_shard(recipe, tokenizer, demo_records()[:16])
    results = {}
    for batching in ("padded", "padding_free"):
        model = build_lora_model(str(tiny_base), rank=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.0,
                                 use_rslora=False, seed=3)
        trainer = build_client_trainer(model, tokenizer, dataset, training=client_training(recipe, 0, 1),
                                       work_dir=tmp_path / batching, seed=0, batching=batching, trainer="sft")
        trainer.train()
        results[batching] = ([entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
                             {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad})
    (padded_losses, padded), (free_losses, free) = results["padded"], results["padding_free"]
    assert free_losses == pytest.approx(padded_losses, abs=1e-5, rel=0)
    for name in padded:
        assert torch.allclose(free[name], padded[name], atol=1e-5), name


def _prepared_rows(recipe, base, tokenizer, records, work_dir: Path, trainer: str) -> list[tuple[list[int], list[int]]]:
    """The (input_ids, labels) rows a ``trainer`` client of ``recipe`` on ``base`` trains on, as its Trainer holds them."""
    from florist_hf.clients.config import client_training
    from florist_hf.clients.run import build_client_trainer, build_lora_model, prepare_shard

    model = build_lora_model(str(base), rank=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.0, use_rslora=False)
    built = build_client_trainer(model, tokenizer, prepare_shard(recipe, tokenizer, records),
                                 training=client_training(recipe, 0, 1), work_dir=work_dir, seed=0, trainer=trainer)
    return [(list(row["input_ids"]), list(row["labels"])) for row in built.train_dataset]


def test_a_record_whose_prompt_fills_the_cutoff_is_a_masked_row_for_both_kinds(tiny_base, tmp_path):
    """Answers alone trained on: a record whose prompt alone fills data.cutoff_len has no token left to train on.
    The stock Trainer client keeps it as a row whose labels are all masked (a batch slot that adds nothing to the
    loss), as FLoRA's reference code does; the SFT client keeps it too (TRL alone would drop it after truncating:
    `sft.sft_trainer_keeping_masked_rows`), so both train on the same rows in the same batches."""
    from transformers import AutoTokenizer

    from florist_hf.data import IGNORE_INDEX, demo_records

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    records = demo_records()[:4]
    records[2] = {**records[2], "instruction": "word " * 100}  # 500 byte tokens: past the cutoff of 256
    rows = {}
    for trainer in ("trainer", "sft"):
        recipe = load_recipe(write_recipe(tmp_path / trainer, ranks=(4,), rounds=1, client={"trainer": trainer},
                                          data={"train_on_inputs": False, "cutoff_len": 256}))
        rows[trainer] = _prepared_rows(recipe, tiny_base, tokenizer, records, tmp_path / trainer / "work", trainer)
    assert len(rows["trainer"]) == 4 and len(rows["trainer"][2][0]) == 256 and set(rows["trainer"][2][1]) == {IGNORE_INDEX}
    assert rows["sft"] == rows["trainer"]
    # TRL's own SFTTrainer drops that row: what the SFT client's trainer class undoes.
    from trl import SFTTrainer

    from florist_hf.clients import sft

    recipe = load_recipe(write_recipe(tmp_path / "trl", ranks=(4,), rounds=1, client={"trainer": "sft"},
                                      data={"train_on_inputs": False, "cutoff_len": 256}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sft.SFT, "trainer_class", lambda self: SFTTrainer)
        trl_rows = _prepared_rows(recipe, tiny_base, tokenizer, records, tmp_path / "trl" / "work", "sft")
    assert trl_rows == [row for index, row in enumerate(rows["trainer"]) if index != 2]


def test_both_kinds_train_on_the_same_rows_of_the_real_dolly_split(smollm2_base, shared_data, tmp_path):
    """The SmolLM2 chat recipe (cutoff 256, answers alone trained on) on the paper's Dolly client 0 (1,579
    records): the same rows, token for token and label for label, on both kinds, the ~10 % of records whose
    chat prompt fills the cutoff included as masked rows (TRL alone drops them)."""
    from florist_hf.data import IGNORE_INDEX, load_records
    from florist_hf.loading import load_tokenizer

    records = load_records(shared_data / "dolly" / "8" / "local_training_0.json")
    tokenizer = load_tokenizer(str(smollm2_base))
    rows = {}
    for trainer in ("trainer", "sft"):
        recipe = load_recipe(REPO / "recipes" / "smollm2_135m_dolly_heter.yaml", [f"client.trainer={trainer}"])
        assert (recipe.data.cutoff_len, recipe.data.template, recipe.data.train_on_inputs) == (256, "chat", False)
        rows[trainer] = _prepared_rows(recipe, smollm2_base, tokenizer, records, tmp_path / trainer, trainer)
    masked = [index for index, (_, labels) in enumerate(rows["trainer"]) if set(labels) == {IGNORE_INDEX}]
    assert len(rows["trainer"]) == len(records) == 1579 and 100 < len(masked) < 200
    assert rows["sft"] == rows["trainer"]


def test_dp_sgd_samples_every_record_of_an_sft_client_with_a_prompt_filling_the_cutoff(tiny_base, tmp_path):
    """DP-SGD samples and accounts over the shard's records: an SFT client whose shard holds a record with nothing
    left to train on trains its round (with that record dropped, its dataset would not be the accounted one)."""
    from transformers import AutoTokenizer

    from florist_hf.clients.config import client_training
    from florist_hf.clients.dp_sgd import client_privacy
    from florist_hf.clients.run import build_client_trainer, build_lora_model, prepare_shard
    from florist_hf.data import demo_records

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    records = demo_records()[:8]
    records[2] = {**records[2], "instruction": "word " * 100}
    recipe = load_recipe(write_recipe(tmp_path, ranks=(4,), rounds=1, client={"trainer": "sft"},
                                      data={"train_on_inputs": False, "cutoff_len": 256},
                                      training={"max_steps": 2, "per_device_train_batch_size": 4},
                                      privacy={"noise_multiplier": 0.5, "max_grad_norm": 1.0}))
    dataset = prepare_shard(recipe, tokenizer, records)
    privacy = client_privacy(recipe, 0, 1, len(dataset))
    model = build_lora_model(str(tiny_base), rank=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.0, use_rslora=False)
    built = build_client_trainer(model, tokenizer, dataset, training=client_training(recipe, 0, 1), work_dir=tmp_path / "work",
                                 seed=0, privacy=privacy, noise_seed=7, trainer="sft")
    assert len(built.train_dataset) == privacy.num_samples == 8
    built.train()
    assert built.state.global_step == 2


def test_dp_sgd_trains_sft_clients(tmp_path):
    """DP-SGD on an SFTTrainer client: Poisson batches, clipped per-record gradients and noise, the round's
    accounted steps, and a rerun with the same secret gives the same adapter."""
    from florist_hf.adapters import read_adapter
    from florist_hf.clients.callback import ClientRound
    from florist_hf.clients.dp_sgd import DPSGD
    from florist_hf.clients.run import build_client_trainer, prepare_shard, run_client_round
    from florist_hf.loading import load_tokenizer
    from florist_hf.tiny import build_tiny_llama
    from helpers import TINY_MODEL

    recipe = load_recipe(write_recipe(tmp_path, ranks=(4,), rounds=1, client={"trainer": "sft"},
                                      training={"max_steps": -1, "num_train_epochs": 2, "per_device_train_batch_size": 4},
                                      privacy={"noise_multiplier": 0.5, "max_grad_norm": 1.0}))
    base = str(build_tiny_llama(tmp_path / "base", **TINY_MODEL))
    tokenizer = load_tokenizer(base)
    from florist_hf.data import demo_records

    dataset = prepare_shard(recipe, tokenizer, demo_records()[:8])
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "privacy-seed").write_text("ab" * 32)
    built = []
    original = build_client_trainer

    def train(name):
        import florist_hf.clients.run as client_run

        def recording(*args, **kwargs):
            trainer_object = original(*args, **kwargs)
            built.append(trainer_object)
            return trainer_object

        client_run.build_client_trainer = recording
        try:
            plan = ClientRound(client_id=0, round=1, rank=4, num_samples=len(dataset), export_dir=tmp_path / name / "export")
            metrics = run_client_round(recipe, plan, base, tokenizer, dataset, tmp_path / name / "work", quiet_console(),
                                       secret_dir=tmp_path / "secret")
        finally:
            client_run.build_client_trainer = original
        return metrics, read_adapter(plan.export_dir)

    metrics, first = train("a")
    from trl import SFTTrainer

    assert isinstance(built[0], DPSGD) and isinstance(built[0], SFTTrainer)
    assert metrics["finite"] and metrics["steps"] == built[0].privacy.steps and metrics["epsilon"] > 0
    _, again = train("b")
    for name, module in first.modules.items():
        assert torch.equal(module.lora_b, again.modules[name].lora_b)


# --- TRL's formats through the CLI, and their refusals ---------------------------------------------------------


def _conversation(index: int) -> list[dict]:
    return [{"role": "system", "content": "You are brief."}, {"role": "user", "content": f"What is {index} plus one?"},
            {"role": "assistant", "content": f"{index + 1}."}]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _chat_base(tiny_base: Path, tmp_path: Path) -> Path:
    """The tiny base with a ChatML template (SmolLM2's turn markup, no generation markers)."""
    return chat_base_copy(tiny_base, tmp_path / "chat_base")


def _cli_run(tmp_path: Path, base: Path, data_file: Path, *extra: str):
    recipe = write_recipe(tmp_path, ranks=(4, 2), rounds=2, data={"source": str(data_file), "max_samples_per_client": 8},
                          federation={"eval_heldout_loss": False})
    sets = [f"model.name_or_path={base}", "client.trainer=sft", *extra]
    return runner.invoke(app, ["run", str(recipe), *[item for s in sets for item in ("--set", s)]])


@pytest.mark.parametrize("shape", ["messages", "prompt_completion", "prompt_completion_conversational"])
def test_trl_formats_federate_through_the_cli(shape, tmp_path, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rows = []
    for index in range(16):
        conversation = _conversation(index)
        if shape == "messages":
            rows.append({"messages": conversation})
        elif shape == "prompt_completion":
            rows.append({"prompt": f"Q: What is {index} plus one?\nA:", "completion": f" {index + 1}."})
        else:
            rows.append({"prompt": conversation[:2], "completion": conversation[2:]})
    data_file = _write_jsonl(tmp_path / "train.jsonl", rows)
    result = _cli_run(tmp_path, _chat_base(tiny_base, tmp_path), data_file, "data.partition=iid")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"
    clients = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    clients = [record for record in clients if record["kind"] == "client"]
    assert len(clients) == 4 and all(record["finite"] and record["loss"] > 0 for record in clients)
    base = json.loads((run_dir / "run.json").read_text())["base_model"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run_dir / "global_adapter")
    assert sum(float(p.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n) > 0


def test_trl_formats_need_the_sft_trainer(tmp_path, tiny_base):
    data_file = _write_jsonl(tmp_path / "train.jsonl", [{"messages": _conversation(i)} for i in range(8)])
    recipe = write_recipe(tmp_path, ranks=(4, 2), rounds=1, data={"source": str(data_file), "max_samples_per_client": 4})
    result = runner.invoke(app, ["run", str(recipe), "--set", f"model.name_or_path={_chat_base(tiny_base, tmp_path)}"])
    assert result.exit_code != 0 and "set client.trainer: sft" in result.output
    assert not (tmp_path / "run" / "global_adapter").exists() and not (tmp_path / "run" / "rounds").exists()


@pytest.mark.parametrize("rows,expected", [
    # Today's trap: instruction/output mapped onto a conversation's columns trained on the Python text of a list.
    ([{"question": [{"role": "user", "content": "Hi"}], "answer": "Hello."}] * 4,
     r"row 0's 'question' \(instruction\) is a list, not text \(a conversation of role/content turns is data.format: messages\)"),
    ([{"question": "Hi", "reply": "Hello.", "topic": "x"}] * 4, r"fit no data format; set data.format to one of dolly.*messages.*prompt_completion"),
    ([{"messages": [{"role": "user", "content": "Hi"}]}] * 4, r"row 0's conversation \('messages'\) has no assistant turn"),
    ([{"messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "Hello."}]}] * 4,
     r"row 0's 'messages' turn 0 has content of type list, not text"),
    ([{"prompt": [{"role": "user", "content": "Hi"}], "completion": "Hello."}] * 4,
     r"row 0 has a list prompt and a str completion; both must be text, or both conversations"),
])
def test_bad_records_in_the_new_formats_are_refused_in_one_line(rows, expected, tmp_path, tiny_base):
    data_file = _write_jsonl(tmp_path / "train.jsonl", rows)
    extra = ["data.fields.instruction=question", "data.fields.output=answer"] if "question" in rows[0] and "answer" in rows[0] else []
    result = _cli_run(tmp_path, _chat_base(tiny_base, tmp_path), data_file, "data.partition=iid", *extra)
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert any(__import__("re").search(expected, line) for line in lines), result.output
    assert not (tmp_path / "run" / "global_adapter").exists() and not (tmp_path / "run" / "rounds").exists()


def test_assistant_only_loss_without_generation_markers_is_refused(tmp_path, tiny_base):
    data_file = _write_jsonl(tmp_path / "train.jsonl", [{"messages": _conversation(i)} for i in range(8)])
    result = _cli_run(tmp_path, _chat_base(tiny_base, tmp_path), data_file, "data.partition=iid",
                      "training.assistant_only_loss=true")
    assert result.exit_code != 0
    assert "training.assistant_only_loss needs a chat template that marks the assistant's turns" in result.output
    assert not (tmp_path / "run" / "rounds").exists()


def test_an_sftconfig_field_needs_the_sft_trainer(tmp_path):
    with pytest.raises(FloristError, match=r"training.max_length: not a TrainingArguments field \(it is an SFTConfig field: set client.trainer: sft\)"):
        load_recipe(write_recipe(tmp_path, training={"max_length": 64}))
    assert load_recipe(write_recipe(tmp_path, client={"trainer": "sft"}, training={"max_length": 64})).training["max_length"] == 64
    with pytest.raises(FloristError, match="unknown trainer 'ppo'; use one of trainer, sft, dpo"):
        load_recipe(write_recipe(tmp_path, client={"trainer": "ppo"}))
