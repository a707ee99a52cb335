"""Publishing: the upload folder, its model card, and a real push through huggingface_hub to a loopback Hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_run import save_peft_adapter, write_run_dir
from huggingface_hub import ModelCard, constants
from hub_server import LoopbackHubServer

from florist_hf.errors import FloristError
from florist_hf.hub import build_upload_folder, push

REPO_ID = "alice/tinyllama-dolly-florist"
DUMMY_TOKEN = "hf_loopbackTestToken0123456789abcdef"
EVALUATION = {"tasks": {"mmlu": {"acc": 0.31, "acc_stderr": 0.01}}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_base) -> Path:
    return write_run_dir(tmp_path_factory.mktemp("runs") / "dolly-florist", tiny_base, evaluation=EVALUATION)


@pytest.fixture
def fake_hub(monkeypatch):
    """A loopback Hub with huggingface_hub pointed at it; the server stops in the fixture finalizer."""
    with LoopbackHubServer() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", DUMMY_TOKEN)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a CI proxy must not intercept loopback traffic
        # huggingface_hub reads these once, at import, into its constants module.
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1 for the suite
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the fake Hub speaks LFS, not Xet
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)  # no agent-registry fetch from huggingface.co
        yield hub


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_dry_run_folder_holds_adapter_records_plot_and_card(run_dir, tmp_path):
    out = push(run_dir, REPO_ID, dry_run_dir=tmp_path / "upload", include_client_details=True)

    folder = Path(out)
    assert sorted(_folder_files(folder)) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "aggregation.json", "run.json", "selected_ranks.png",
    ]
    for name in ("adapter_config.json", "adapter_model.safetensors", "aggregation.json"):
        assert (folder / name).read_bytes() == (run_dir / "global_adapter" / name).read_bytes()
    assert (folder / "run.json").read_bytes() == (run_dir / "run.json").read_bytes()
    assert (folder / "selected_ranks.png").read_bytes().startswith(b"\x89PNG")
    assert not list(tmp_path.glob(".upload.*")), "the staging directory must be gone"


def test_model_card_metadata_and_body(run_dir, tmp_path):
    folder = build_upload_folder(run_dir, tmp_path / "upload", repo_id=REPO_ID)

    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "TinyLlama/TinyLlama_v1.1"
    assert card.data.library_name == "peft"
    assert {"federated-learning", "lora", "florist"} <= set(card.data.tags)
    assert card.data.datasets == ["databricks/databricks-dolly-15k"]
    [result] = card.data.eval_results
    assert (result.dataset_type, result.metric_type, result.metric_value) == ("mmlu", "acc", 0.31)
    sidecar = json.loads((run_dir / "global_adapter" / "aggregation.json").read_text())
    text = card.text
    assert f'PeftModel.from_pretrained(base, "{REPO_ID}")' in text
    assert "Energy threshold τ | 0.9" in text
    assert "Client LoRA ranks | 4, 4, 4" in text
    assert "| all | " in text and f"| {sidecar['total_rank']} |" in text
    assert "| mmlu | acc | 0.3100 | 0.0100 |" in text


def test_upload_folder_loads_with_peft(run_dir, tmp_path, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = build_upload_folder(run_dir, tmp_path / "upload", repo_id=REPO_ID)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), folder)
    assert model.peft_config["default"].r == 4


def test_bare_adapter_without_sidecar_takes_ranks_from_the_weights(tmp_path, tiny_base):
    adapter_dir = save_peft_adapter(tiny_base, tmp_path / "adapter")

    folder = build_upload_folder(adapter_dir, tmp_path / "upload", repo_id=REPO_ID)

    assert sorted(_folder_files(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "selected_ranks.png"]
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model is None, "a local base model path must not become Hub metadata"
    assert "| all | 4 | 4 | 4 | 16 |" in card.text


def test_push_uploads_exactly_the_dry_run_folder(run_dir, tmp_path, fake_hub, capsys, caplog):
    dry_run = Path(push(run_dir, REPO_ID, dry_run_dir=tmp_path / "dry-run"))
    assert fake_hub.requests == [], "a dry run must not touch the network"

    url = push(run_dir, REPO_ID, private=True)

    assert url == f"{fake_hub.url}/{REPO_ID}"
    assert fake_hub.unhandled == []
    assert fake_hub.repos[REPO_ID]["visibility"] == "private"
    assert fake_hub.files[REPO_ID] == _folder_files(dry_run)
    assert ("PUT",) == tuple({method for method, path in fake_hub.requests if path.startswith("/lfs-objects/")}), (
        "adapter_model.safetensors goes through the LFS upload"
    )
    assert fake_hub.authorization_headers and set(fake_hub.authorization_headers) == {f"Bearer {DUMMY_TOKEN}"}
    token = DUMMY_TOKEN.encode()
    assert not [path for path in tmp_path.rglob("*") if path.is_file() and token in path.read_bytes()]
    assert not [path for path in run_dir.rglob("*") if path.is_file() and token in path.read_bytes()]
    captured = capsys.readouterr()
    assert DUMMY_TOKEN not in captured.out + captured.err + caplog.text


def test_push_to_an_existing_repo_commits_again(run_dir, fake_hub):
    push(run_dir, REPO_ID)
    push(run_dir, REPO_ID, commit_message="second round of training")

    assert sum(1 for method, path in fake_hub.requests if path.endswith("/commit/main")) == 2


@pytest.mark.parametrize("repo_id", ["no-namespace", "alice/bob/carol", "alice/has space", "alice/double--dash", "/name", ""])
def test_malformed_repo_id_is_a_florist_error_before_anything_is_written(run_dir, tmp_path, repo_id):
    with pytest.raises(FloristError, match="repo id"):
        push(run_dir, repo_id, dry_run_dir=tmp_path / "upload")
    assert not (tmp_path / "upload").exists()


def test_push_without_a_token_is_a_florist_error(run_dir, tmp_path, monkeypatch):
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    # The stored-token paths are derived from HF_HOME once, at import.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))

    with pytest.raises(FloristError, match=r"no Hugging Face token: set HF_TOKEN or run `hf auth login`"):
        push(run_dir, REPO_ID)


def test_push_in_offline_mode_is_a_florist_error(run_dir, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(FloristError, match="HF_HUB_OFFLINE"):
        push(run_dir, REPO_ID, token=DUMMY_TOKEN)


def test_source_that_is_neither_run_nor_adapter_is_a_florist_error(tmp_path):
    with pytest.raises(FloristError, match="neither a run directory"):
        build_upload_folder(tmp_path, tmp_path / "upload", repo_id=REPO_ID)


def test_existing_output_folder_is_refused(run_dir, tmp_path):
    (tmp_path / "upload").mkdir()
    with pytest.raises(FloristError, match="already exists"):
        build_upload_folder(run_dir, tmp_path / "upload", repo_id=REPO_ID)


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [*value.keys(), *(text for item in value.values() for text in _strings(item))]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return [value] if isinstance(value, str) else []


def test_upload_leaks_no_client_details_by_default(tmp_path, tiny_base):
    """A real run's upload: no client path, name, sample count or weight, no local path anywhere."""
    from helpers import quiet_console, write_recipe

    from florist_hf.recipe import load_recipe
    from florist_hf.runner import run_federation

    recipe = load_recipe(write_recipe(tmp_path, rounds=1, ranks=(4, 2), data={"holdout_per_label": 1, "cutoff_len": 256}))
    run_dir = run_federation(recipe, console=quiet_console())
    run = json.loads((run_dir / "run.json").read_text())
    sidecar = json.loads((run_dir / "global_adapter" / "aggregation.json").read_text())
    assert run["client_samples"] and sidecar["clients"][0]["path"]  # the local records do hold them

    folder = Path(push(run_dir, REPO_ID, dry_run_dir=tmp_path / "upload"))
    uploaded = {name: (folder / name).read_text() for name in ("run.json", "aggregation.json", "adapter_config.json", "README.md")}
    for name, text in uploaded.items():
        assert str(tmp_path) not in text and "client_0" not in text and "num_samples" not in text, name
    public_run, public_sidecar = json.loads(uploaded["run.json"]), json.loads(uploaded["aggregation.json"])
    assert "client_samples" not in public_run and "clients" not in public_sidecar and "raw_weights" not in public_sidecar
    assert public_sidecar["num_clients"] == 2 and public_sidecar["modules"] == sidecar["modules"]
    assert public_run["communication"]["uplink_bytes_total"] == run["communication"]["uplink_bytes_total"]
    assert not any(text.startswith("/") for text in _strings(public_run) + _strings(public_sidecar))
    assert json.loads(uploaded["adapter_config.json"])["base_model_name_or_path"] is None  # a local base
    assert "Left out of this upload" in uploaded["README.md"]

    # Opting in uploads the records as they are, and the adapter still loads with PEFT either way.
    detailed = Path(push(run_dir, REPO_ID, dry_run_dir=tmp_path / "detailed", include_client_details=True))
    assert json.loads((detailed / "aggregation.json").read_text())["clients"] == sidecar["clients"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "base_model"), folder)


def test_public_record_keeps_hub_ids_and_replaces_local_paths():
    from florist_hf.hub import LOCAL_PATH, public_record

    record = {
        "format": "florist-hf/run", "base_model": "/models/llama", "datasets": ["databricks/databricks-dolly-15k"],
        "data_source": "databricks/databricks-dolly-15k", "client_samples": [10, 20],
        "recipe": {"output_dir": "runs/site-a", "evaluation": {"paper_mmlu_file": "mmlu_test_1444.json"}},
        "communication": {"uplink_bytes": [1, 2], "uplink_bytes_total": 3, "eff_x1e4": 1.5},
    }
    public = public_record(record, "run.json", {"databricks/databricks-dolly-15k"})
    assert public == {
        "format": "florist-hf/run", "base_model": LOCAL_PATH, "datasets": ["databricks/databricks-dolly-15k"],
        "data_source": "databricks/databricks-dolly-15k",
        "recipe": {"output_dir": LOCAL_PATH, "evaluation": {"paper_mmlu_file": LOCAL_PATH}},
        "communication": {"uplink_bytes_total": 3, "eff_x1e4": 1.5},
    }
