"""Multi-process clients: ZeRO-safe export and install, and a real 2-process DeepSpeed ZeRO-3 run on CPU."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from florist_hf import distributed
from florist_hf.adapters import read_adapter
from florist_hf.clients.callback import ClientRound, FederatedCallback, check_exported_factors, export_client_adapter
from florist_hf.clients.run import build_client_trainer, build_lora_model
from florist_hf.global_state import lora_layers
from florist_hf.errors import FloristError
from florist_hf.recipe import load_recipe
from florist_hf.runner import run_federation

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"num_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}


def lora_model(base, rank=4):
    return build_lora_model(str(base), rank=rank, alpha=2 * rank, target_modules=["q_proj", "v_proj"], dropout=0.0,
                            use_rslora=False, seed=0)


def plan_for(tmp_path, rank=4, **fields) -> ClientRound:
    return ClientRound(client_id=0, round=1, rank=rank, num_samples=8, export_dir=tmp_path / "client_0", **fields)


# --- the export refuses what ZeRO-3 leaves in a parameter it has not gathered ---------------------


def test_export_refuses_an_empty_lora_tensor_as_zero3_leaves_it(tiny_base, tmp_path):
    model = lora_model(tiny_base)
    # What ZeRO-3 does to every partitioned parameter: the data becomes an empty placeholder.
    layer = next(iter(lora_layers(model).values()))
    layer.lora_A["default"].weight.data = torch.empty(0)
    with pytest.raises(FloristError) as error:
        export_client_adapter(model, plan_for(tmp_path), {})
    message = str(error.value)
    assert "saved an empty lora_A tensor (torch.Size([0]))" in message
    assert "under DeepSpeed ZeRO-3 gather the parameters before saving" in message
    assert not (tmp_path / "client_0").exists()  # nothing half-written reaches the server
    assert not list(tmp_path.glob(".client_0*"))


def test_export_refuses_a_wrongly_shaped_lora_tensor(tiny_base, tmp_path):
    model = lora_model(tiny_base)
    name, layer = next(iter(lora_layers(model).items()))
    layer.lora_B["default"].weight.data = torch.zeros(layer.out_features, 3)  # rank 3, the layer has 4
    with pytest.raises(FloristError, match=r"saved lora_B with shape \(\d+, 3\), expected \(\d+, 4\) \(out_features × rank\)"):
        export_client_adapter(model, plan_for(tmp_path), {})
    assert not (tmp_path / "client_0").exists()


def test_export_writes_every_factor_at_the_layer_shape(tiny_base, tmp_path):
    model = lora_model(tiny_base)
    export_dir = export_client_adapter(model, plan_for(tmp_path), {"loss": 1.0})
    check_exported_factors(export_dir, model)
    adapter = read_adapter(export_dir)
    for name, layer in lora_layers(model).items():
        assert tuple(adapter.modules[name].lora_a.shape) == (4, layer.in_features)
        assert tuple(adapter.modules[name].lora_b.shape) == (layer.out_features, 4)
    assert json.loads((export_dir / "client.json").read_text())["loss"] == 1.0


def test_only_the_main_process_writes_the_export(tiny_base, tmp_path):
    model = lora_model(tiny_base)
    export_client_adapter(model, plan_for(tmp_path), {}, is_main_process=False)
    assert not (tmp_path / "client_0").exists()


# --- the global state goes in before the Trainer wraps the model -----------------------------------


def test_global_state_is_installed_when_the_trainer_is_built(tiny_base, tmp_path):
    """DeepSpeed copies trainable factors into its own optimizer partitions when it wraps the model,
    so FederatedCallback installs at the end of Trainer.__init__, before train() wraps anything."""
    from transformers import AutoTokenizer

    from florist_hf.data import demo_records, tokenize_records
    from florist_hf.global_state import state_of_adapters, write_global_state

    donor = lora_model(tiny_base)
    with torch.no_grad():
        for param in donor.parameters():
            if param.requires_grad:
                param.normal_()
    export_client_adapter(donor, plan_for(tmp_path / "round1"), {})
    global_dir = tmp_path / "round1" / "client_0"

    model = lora_model(tiny_base)
    before = {name: layer.get_base_layer().weight.detach().clone() for name, layer in lora_layers(model).items()}
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    dataset = tokenize_records(demo_records()[:8], tokenizer, cutoff_len=32)
    state_dir = write_global_state(state_of_adapters([global_dir]), tmp_path / "state")
    plan = ClientRound(client_id=0, round=2, rank=4, num_samples=8, export_dir=tmp_path / "round2", global_state=state_dir)
    build_client_trainer(model, tokenizer, dataset, training={"max_steps": 1, "use_cpu": True}, work_dir=tmp_path / "work",
                         seed=0, callbacks=[FederatedCallback(plan)])
    update = read_adapter(global_dir)
    probe = torch.randn(3, 64)
    for name, layer in lora_layers(model).items():
        module, base_layer = update.modules[name], layer.get_base_layer()
        assert torch.equal(base_layer.weight, before[name])  # the base itself is never changed
        effective = before[name] + module.scale * module.lora_b @ module.lora_a
        with torch.no_grad():
            torch.testing.assert_close(base_layer(probe), probe @ effective.T, rtol=1e-5, atol=1e-4)


def test_single_process_helpers_are_no_ops():
    assert distributed.is_main_process()
    assert distributed.world_size() == 1
    distributed.wait_for_everyone()
    with distributed.main_process_first():
        pass
    state = {"weight": torch.nn.Parameter(torch.ones(2, 3))}
    with distributed.gathered_parameters(state.values(), modifier_rank=0):
        pass
    model = torch.nn.Linear(3, 2)
    gathered = distributed.gathered_state_dict(model, lambda name, param: name == "weight")
    assert list(gathered) == ["weight"] and gathered["weight"].data_ptr() != model.weight.data_ptr()


# --- shipped launch configurations -----------------------------------------------------------------


@pytest.mark.parametrize("stage", [2, 3])
def test_shipped_deepspeed_configs_leave_batch_and_precision_to_the_recipe(stage):
    launch = yaml.safe_load((REPO / "recipes" / "accelerate" / f"zero{stage}.yaml").read_text())
    assert launch["distributed_type"] == "DEEPSPEED"
    ds_file = REPO / launch["deepspeed_config"]["deepspeed_config_file"]
    config = json.loads(ds_file.read_text())
    assert config["zero_optimization"]["stage"] == stage
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size"):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    # No optimizer or scheduler section: the Trainer's own (the same as in a single process).
    assert "optimizer" not in config and "scheduler" not in config
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    multi_gpu = yaml.safe_load((REPO / "recipes" / "accelerate" / "multi_gpu.yaml").read_text())
    assert multi_gpu["distributed_type"] == "MULTI_GPU"


# --- real DeepSpeed ZeRO-3 on CPU ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_deepspeed_env() -> dict:
    """DeepSpeed's CPU accelerator with gloo, whatever GPUs the machine has."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'florist-hf[deepspeed]')")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("DeepSpeed's CPU backend JIT-builds its shared-memory comm op and needs a C++ compiler")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    return env


PROBE = r'''
import json, os, sys, warnings
from pathlib import Path

import torch

base, out = Path(sys.argv[1]), Path(sys.argv[2])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
import deepspeed
from safetensors.torch import load_file

from florist_hf.clients.callback import ClientRound, check_exported_factors, export_client_adapter
from florist_hf.clients.run import build_lora_model
from florist_hf.errors import FloristError

deepspeed.init_distributed(dist_backend="gloo")
model = build_lora_model(str(base), rank=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.0, use_rslora=False, seed=0)
initial = {name: param.detach().clone() for name, param in model.named_parameters() if ".lora_" in name}
params = [param for param in model.parameters() if param.requires_grad]
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-3), config=config)
report = {"placeholders": sorted({str(tuple(p.shape)) for n, p in model.named_parameters() if ".lora_" in n})}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model.save_pretrained(out / "ungathered")  # a plain save_pretrained under ZeRO-3
ungathered = load_file(out / "ungathered" / "adapter_model.safetensors")
report["ungathered_saved"] = sorted({str(tuple(t.shape)) for t in ungathered.values()})
try:
    check_exported_factors(out / "ungathered", model)
    report["ungathered_error"] = None
except FloristError as error:
    report["ungathered_error"] = str(error)
export_client_adapter(model, ClientRound(client_id=0, round=1, rank=4, num_samples=1, export_dir=out / "exported"), {})
saved = load_file(out / "exported" / "adapter_model.safetensors")
report["exported_equal"] = all(torch.equal(saved[name.replace(".default", "")], t) for name, t in initial.items())
print("REPORT " + json.dumps(report))
'''


@pytest.mark.slow
def test_a_real_zero3_engine_saves_empty_tensors_that_the_export_refuses(tiny_base, tmp_path):
    """The known failure, reproduced: save_pretrained inside a ZeRO-3 engine writes torch.Size([0]) LoRA
    tensors; the export check refuses them, and export_client_adapter gathers and writes the real ones."""
    env = _cpu_deepspeed_env()
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    result = subprocess.run([sys.executable, str(script), str(tiny_base), str(tmp_path / "out"), str(_free_port())],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    assert report["placeholders"] == ["(0,)"]  # ZeRO-3 really partitioned every LoRA factor
    assert report["ungathered_saved"] == ["(0,)"]
    expected = "saved an empty lora_A tensor (torch.Size([0])): under DeepSpeed ZeRO-3 gather the parameters before saving"
    assert expected in report["ungathered_error"]
    assert report["exported_equal"]


def _write_recipe(path: Path, output_dir: Path, per_device_batch: int, **extra_training) -> Path:
    recipe = {
        "name": "zero3-equivalence",
        "model": {"name_or_path": "builtin:tiny-llama", "tiny": TINY_MODEL},
        # 256 byte tokens hold the ~170-byte prompt and a response, which the held-out loss scores.
        "data": {"source": "builtin:demo", "partition": "iid", "max_samples_per_client": 16, "holdout_per_label": 1,
                 "cutoff_len": 256},
        "lora": {"ranks": [4, 2], "target_modules": ["q_proj", "v_proj"], "dropout": 0.0},
        "federation": {"method": "florist", "threshold": 0.9, "rounds": 2, "num_clients": 2},
        "training": {"num_train_epochs": 1, "per_device_train_batch_size": per_device_batch, "learning_rate": 1e-2,
                     "logging_steps": 1, **extra_training},
        "output_dir": str(output_dir),
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _assert_same_adapters(zero3_run: Path, single_run: Path) -> None:
    """Every kept client adapter (2 clients × 2 rounds) and both globals of the two runs: the same factors, none
    empty, within 1e-3 of the largest entry."""
    exported = sorted(p.relative_to(single_run) for p in single_run.glob("rounds/*/clients/client_*"))
    assert len(exported) == 4
    for relative in [*exported, Path("rounds/1/global"), Path("global_adapter")]:
        ours = load_file(zero3_run / relative / "adapter_model.safetensors")
        reference = load_file(single_run / relative / "adapter_model.safetensors")
        assert ours.keys() == reference.keys(), relative
        for key, tensor in reference.items():
            assert ours[key].shape == tensor.shape and ours[key].numel() > 0, (relative, key)
            assert _relative_difference(ours[key], tensor) < 1e-3, (relative, key, _relative_difference(ours[key], tensor))


@pytest.mark.slow
def test_two_process_zero3_clients_export_what_one_process_does(tmp_path):
    """`accelerate launch` with the shipped zero3.yaml, 2 CPU processes, against a single-process run.

    Equal global batch: 2 processes × 4 per device against 1 × 8 on the same seed; 16 samples per client,
    so every step sees the same 8 samples in both runs (no padded last batch). LoRA dropout is 0, whose
    masks would differ. The DeepSpeed config is the shipped one with stage3_param_persistence_threshold
    0: its "auto" value (10 × hidden) keeps the tiny model's LoRA factors whole, and they must be
    partitioned for the gather to be exercised. Round 2 merges round 1's global update into base weights
    partitioned at load time (zero.Init). Tolerance: ZeRO reduces fp32 gradients in another order.
    """
    env = _cpu_deepspeed_env()
    ds_config = json.loads((REPO / "recipes" / "deepspeed" / "zero3.json").read_text())
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_file = tmp_path / "zero3_partition_everything.json"
    ds_file.write_text(json.dumps(ds_config))

    zero3_run = tmp_path / "zero3"
    recipe_file = _write_recipe(tmp_path / "zero3.yaml", zero3_run, per_device_batch=4, ddp_backend="gloo")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes" / "accelerate" / "zero3.yaml"),
        "--deepspeed_config_file", str(ds_file), "--num_processes", "2", "--main_process_port", str(_free_port()),
        "-m", "florist_hf", "run", str(recipe_file),
    ]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    launch_seconds = time.perf_counter() - started

    single_run = tmp_path / "single"
    run_federation(load_recipe(_write_recipe(tmp_path / "single.yaml", single_run, per_device_batch=8)))

    # Only the main process wrote: one record per client, round and kind; no staging left over.
    records = [json.loads(line) for line in (zero3_run / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["kind"], r["round"], r.get("client")) for r in records]
    assert len(keys) == len(set(keys)) == 6, keys
    assert (zero3_run / "run.json").is_file()
    assert not [p for p in zero3_run.rglob(".*") if p.name.endswith((".tmp", ".old"))]

    _assert_same_adapters(zero3_run, single_run)
    zero3_heldout = [r["heldout_loss"] for r in records if r["kind"] == "round"]
    single_heldout = [json.loads(line).get("heldout_loss") for line in (single_run / "metrics.jsonl").read_text().splitlines()
                      if json.loads(line)["kind"] == "round"]
    assert zero3_heldout == pytest.approx(single_heldout, rel=1e-4)
    print(f"2-process ZeRO-3 federation: {launch_seconds:.1f} s")


@pytest.mark.slow
def test_two_process_zero3_dpo_clients_export_what_one_process_does(tmp_path):
    """TRL's DPOTrainer clients under `accelerate launch` with the shipped zero3.yaml, 2 CPU processes, against a
    single-process run: two rounds (the second continuing from the first global merged into the base), the DPO
    reference being the base with the adapter off in both. Each step sees all 16 pairs (2 × 8 against 1 × 16), so
    the runs differ only in ZeRO-3's partitioning and reduction order. In fp32: under bf16 DeepSpeed keeps the
    parameters themselves in bf16 while one process autocasts over fp32 ones, which is not the same training."""
    from test_dpo_clients import preference_rows

    env = _cpu_deepspeed_env()
    ds_config = json.loads((REPO / "recipes" / "deepspeed" / "zero3.json").read_text())
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition the tiny LoRA factors too
    ds_file = tmp_path / "zero3_partition_everything.json"
    ds_file.write_text(json.dumps(ds_config))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in preference_rows("prompt_texts", count=32)))

    def recipe(name: str, per_device_batch: int, **extra) -> Path:
        path = _write_recipe(tmp_path / f"{name}.yaml", tmp_path / name, per_device_batch, num_train_epochs=2, beta=1.0,
                             bf16=False, **extra)
        written = yaml.safe_load(path.read_text())
        written["client"] = {"trainer": "dpo"}
        written["data"] = {"source": str(pairs), "partition": "iid", "max_samples_per_client": 16, "cutoff_len": 128}
        written["federation"]["eval_heldout_loss"] = False
        path.write_text(yaml.safe_dump(written))
        return path

    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes" / "accelerate" / "zero3.yaml"),
        "--deepspeed_config_file", str(ds_file), "--num_processes", "2", "--main_process_port", str(_free_port()),
        "-m", "florist_hf", "run", str(recipe("zero3", 8, ddp_backend="gloo")),
    ]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    run_federation(load_recipe(recipe("single", 16)))

    zero3_run, single_run = tmp_path / "zero3", tmp_path / "single"
    records = [json.loads(line) for line in (zero3_run / "metrics.jsonl").read_text().splitlines()]
    assert len({(r["kind"], r["round"], r.get("client")) for r in records}) == len(records) == 6
    _assert_same_adapters(zero3_run, single_run)
    single_records = [json.loads(line) for line in (single_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if r["kind"] == "client"] == pytest.approx(
        [r["loss"] for r in single_records if r["kind"] == "client"], rel=1e-4)
