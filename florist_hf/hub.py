"""Publish a global adapter to the Hugging Face Hub: a folder with the adapter, its records, a rank plot
and a model card, created locally and then sent with ``HfApi.upload_folder``.

``build_upload_folder`` is all the local work, so a dry run writes exactly what ``push`` uploads.
The token is passed to ``HfApi`` and nowhere else: it is never printed, logged or written.

By default the upload leaks nothing about the participants: in federated learning each client's
data size and machine are what must stay private, so the records go up with their client-level
fields (per-client sample counts, weights, names, paths) removed and every local path replaced;
``include_client_details=True`` uploads them as they are.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, constants, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import HFValidationError, validate_repo_id

from florist_hf import __version__
from florist_hf.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SIDECAR, read_adapter
from florist_hf.errors import FloristError
from florist_hf.io_utils import atomic_directory
from florist_hf.report import (
    RANKS_PLOT,
    evaluation_rows,
    format_bytes,
    plot_selected_ranks,
    rank_summary_by_module,
    selected_ranks,
)
from florist_hf.rundir import GLOBAL_ADAPTER, RUN_SUMMARY, final_sidecar_path, read_json

MODEL_CARD = "README.md"
#: What replaces a local filesystem path in an upload without client details.
LOCAL_PATH = "<local path>"
#: Client-level fields: removed from the records unless client details are included.
CLIENT_LEVEL_KEYS = {
    SIDECAR: ("clients", "raw_weights", "outliers"),
    RUN_SUMMARY: ("client_samples",),
}
#: Per-client byte counts inside a communication record (the totals stay).
PER_CLIENT_COMMUNICATION = ("uplink_bytes", "downlink_bytes", "uplink_params", "downlink_params")
DEFAULT_COMMIT_MESSAGE = "Upload federated LoRA adapter with florist-hf"
#: lm-eval reports generative and log-likelihood tasks alike; the Hub's model-index wants one task type.
EVAL_TASK_TYPE = "text-generation"


@dataclass
class PublishSource:
    """What an upload is made of: a run directory's global adapter and records, or a bare adapter."""

    adapter_dir: Path
    #: run.json's content; empty for a bare adapter directory.
    run: dict
    run_path: Path | None
    sidecar: dict | None
    sidecar_path: Path | None


def resolve_source(source: str | os.PathLike) -> PublishSource:
    source = Path(source)
    if (source / RUN_SUMMARY).is_file():
        run_path = source / RUN_SUMMARY
        run = read_json(run_path)
        adapter_dir = source / run.get("global_adapter", GLOBAL_ADAPTER)
        sidecar_path = final_sidecar_path(source, run)
    elif (source / ADAPTER_CONFIG).is_file():
        adapter_dir, run, run_path = source, {}, None
        # The runner writes the sidecar inside the adapter directory; hand-made layouts keep it beside.
        sidecar_path = next((path for path in (source / SIDECAR, source.parent / SIDECAR) if path.is_file()), None)
    else:
        raise FloristError(
            f"{source}: neither a run directory ({RUN_SUMMARY}) nor a PEFT adapter ({ADAPTER_CONFIG}); "
            "pass the run directory or the global adapter directory"
        )
    for required in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (adapter_dir / required).is_file():
            raise FloristError(
                f"{adapter_dir / required}: missing; publish a finished run or an adapter saved by PEFT's "
                "save_pretrained (safetensors)"
            )
    sidecar = read_json(sidecar_path) if sidecar_path is not None else None
    return PublishSource(adapter_dir, run, run_path, sidecar, sidecar_path)


def _hub_repo_id(name: str | None) -> str | None:
    """``name`` if it can be a Hub repo id (metadata must not point at local paths), else None."""
    if not name or "/" not in name or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _card_data(run: Mapping, method: str | None, base_model: str | None, repo_id: str) -> ModelCardData:
    evaluation = evaluation_rows(run)
    datasets = [name for name in run.get("datasets", []) if _hub_repo_id(name)]
    license_name = run.get("license") or (run.get("recipe") or {}).get("license")
    return ModelCardData(
        base_model=base_model,
        library_name="peft",
        license=license_name,
        datasets=datasets or None,
        tags=["federated-learning", "lora", "florist", *([method] if method else [])],
        model_name=repo_id.split("/")[1] if evaluation else None,
        eval_results=[
            EvalResult(
                task_type=EVAL_TASK_TYPE,
                dataset_type=row.task,
                dataset_name=row.task,
                metric_type=row.metric,
                metric_name=row.label,
                metric_value=row.value,
            )
            for row in evaluation
        ]
        or None,
    )


def _published_notes(sidecar: Mapping) -> list[str]:
    """What the card says of a cumulative update published after many rounds."""
    notes = []
    threshold = sidecar.get("publish_threshold")
    if threshold is not None:
        kept = [module["energy_kept"] for module in sidecar.get("modules", {}).values() if "energy_kept" in module]
        notes += [f"Published compact: the cumulative update of every round kept per module at the smallest rank whose "
                  f"energy reaches τ = {threshold:g} (energy kept: at least {min(kept, default=1.0):.4f}; per module in "
                  f"`{SIDECAR}`).", ""]
    high_rank = sidecar.get("high_rank_modules") or []
    if high_rank:
        notes += [f"{len(high_rank)} of {len(sidecar.get('modules', {}))} modules' cumulative update is no longer low-rank "
                  "(its exact rank is above a quarter of min(m, n)): this adapter is exact but nearly as large as the "
                  "weights it changes. To serve it, merge it into the base (`florist-hf export --format merged`).", ""]
    return notes


def privacy_rows(privacy: Mapping) -> list[tuple[str, str]]:
    """The model card's lines on what the run guarantees: record-level (ε, δ), client-level ε, the bound,
    the robust rule, secure aggregation."""
    rows = []
    record = privacy.get("record_level")
    if record:
        rows.append(("Differential privacy", f"(ε, δ) = ({record['epsilon_max']:.2f}, {record['delta_max']:.2g}) per client, "
                                             f"record-level: DP-SGD with Opacus, each record's gradient clipped to "
                                             f"{record['max_grad_norm']:g}, {record['accountant'].upper()} accountant over "
                                             "every round a client took part in (the largest ε of any client)"))
    client = privacy.get("client_level")
    if client and client.get("epsilon") is not None:
        rows.append(("Client-level DP", f"(ε, δ) = ({client['epsilon']:.2f}, {client['delta']:.2g}) for any one client's "
                                        f"participation: {client['mechanism']}, noise σ = {client['noise_multiplier']:.3g}, "
                                        f"{client['rounds']} rounds at sampling rate {client['sample_rate']:.3g}"))
    if privacy.get("clip_update_norm") is not None:
        rows.append(("Update bound", f"every client's update clipped to Frobenius norm {privacy['clip_update_norm']:g} "
                                     "(its whole adapter) before aggregation"))
    if privacy.get("robust"):
        rows.append(("Robust aggregation", f"coordinate-wise {privacy['robust'].replace('_', ' ')} of the client factors"))
    secure = privacy.get("secure_aggregation")
    if secure:
        learned = ("the two sketch sums of the clients' updates" if secure.get("sums") == 2
                   else "the sums of the clients' weighted factors")
        rows.append(("Secure aggregation", f"{secure.get('protocol')}: the server learned only {learned} over each "
                                           f"round's clients, never one client's update (threshold {secure.get('threshold')}: a "
                                           "round's sum is recovered while that many of its clients remain)"))
    return rows


def _card_body(
    repo_id: str,
    method: str | None,
    run: Mapping,
    sidecar: Mapping | None,
    ranks: Mapping[str, int],
    rank_source: Path,
    base_model: str | None,
    base_model_name: str,
    include_client_details: bool = False,
    selection: Mapping | None = None,
    uniform_rank: int | None = None,
) -> str:
    threshold = run.get("threshold", (sidecar or {}).get("threshold"))
    clients = (sidecar or {}).get("clients", [])
    client_ranks = run.get("client_ranks") or [client["rank"] for client in clients]
    communication = run.get("communication") or (sidecar or {}).get("communication") or {}
    gguf = run.get("base_gguf")
    base_for_code = base_model or ("<folder or Hub repository of the GGUF file>" if gguf else "<path or Hub id of the base model>")

    training_rows = [("Aggregation method", method or f"unknown (no {SIDECAR})")]
    if threshold is not None:
        training_rows.append(("Energy threshold τ", f"{threshold:g}"))
    if "rounds" in run:
        training_rows.append(("Rounds", f"{run.get('rounds_completed', run['rounds'])} of {run['rounds']}"))
    num_clients = run.get("num_clients", len(clients) or None)
    if num_clients is not None:
        training_rows.append(("Clients", f"{num_clients} ({run.get('clients_per_round', num_clients)} per round)"))
    if client_ranks:
        training_rows.append(("Client LoRA ranks", ", ".join(str(rank) for rank in client_ranks)))
    if run.get("datasets"):
        training_rows.append(("Datasets", ", ".join(run["datasets"])))
    training_rows += privacy_rows(run.get("privacy") or {})
    if gguf:
        source = gguf["source"] if _hub_repo_id(gguf["source"]) or gguf["source"].startswith("package:") else "a local folder"
        training_rows.append(("Base model", f"`{gguf['gguf_file']}` from {source} (sha256 {gguf['sha256'][:16]}…), "
                                            f"dequantized to {gguf['dtype']} by transformers {gguf['transformers']}"))
    else:
        training_rows.append(("Base model", base_model or f"{base_model_name} (local, not on the Hub)"))

    summary = rank_summary_by_module(ranks, rank_source)
    lines = [
        f"# {repo_id.split('/')[1]}",
        "",
        f"A LoRA adapter for `{base_model or base_model_name}` fine-tuned with federated learning and aggregated "
        f"with **{method or 'an unrecorded method'}**, published with florist-hf {__version__}.",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in training_rows),
        "",
        *(["## How τ was chosen", "", selection["text"], ""] if selection else []),
        *([
            "## Serving",
            "",
            f"This upload is the uniform-rank form of the adapter: every module zero-padded to rank {uniform_rank} with "
            f"its scale folded in (`r = lora_alpha = {uniform_rank}`, no `rank_pattern`), the same update, so engines "
            f"that apply one `lora_alpha / r` (vLLM with `--max-lora-rank {uniform_rank}` or more, SGLang, LoRAX, "
            "llama.cpp after `convert_lora_to_gguf.py`) scale it right. The ranks below are those the aggregation kept.",
            "",
        ] if uniform_rank else []),
        "## Selected ranks",
        "",
        "Rank of the global adapter per module type, across layers.",
        "",
        *_published_notes(sidecar or {}),
        "| module | min | median | max | total |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {stats['min']} | {stats['median']:g} | {stats['max']} | {stats['total']} |"
            for name, stats in summary.items()
        ),
        "",
        f"![Selected rank per layer and module]({RANKS_PLOT})",
    ]
    if communication:
        eff = communication.get("eff_x1e4")
        lines += [
            "",
            "## Communication",
            "",
            "| uplink (clients → server) | downlink (server → clients) | Eff (×10⁻⁴) |",
            "|---|---|---|",
            f"| {format_bytes(communication.get('uplink_bytes_total', 0))} "
            f"| {format_bytes(communication.get('downlink_bytes_total', 0))} "
            f"| {'–' if eff is None else f'{eff:.3f}'} |",
        ]
    evaluation = evaluation_rows(run)
    if evaluation:
        lines += ["", "## Evaluation", "", "| task | metric | value | stderr |", "|---|---|---|---|"]
        lines += [
            f"| {row.task} | {row.label} | {row.value:.4f} | {'–' if row.stderr is None else f'{row.stderr:.4f}'} |"
            for row in evaluation
        ]
    lines += [
        "",
        "## How to use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_for_code}"'
        + (f', gguf_file="{gguf["gguf_file"]}")' if gguf else ")"),
        f'model = PeftModel.from_pretrained(base, "{repo_id}")',
        "```",
        "",
        f"`{SIDECAR}` records how the adapter was aggregated (per-module ranks and singular values"
        + (", clients and their weights)" if include_client_details else ")")
        + (f"; `{RUN_SUMMARY}` records the run and its recipe." if run else "."),
    ]
    if not include_client_details:
        lines += [
            "",
            "Left out of this upload, to keep the participants private: each client's sample count, "
            "aggregation weight, name and path, the per-client byte counts, and every local path "
            f"(shown as `{LOCAL_PATH}`). The publisher can include them with "
            "`hub.include_client_details: true` (or `florist-hf push --include-client-details`).",
        ]
    return "\n".join(lines) + "\n"


#: File names a path may end with; with a "/" or "~" they mark a string as a local path.
_PATH_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".yaml", ".yml", ".safetensors", ".bin", ".txt")


def _is_path(text: str, public_ids: set[str]) -> bool:
    if text in public_ids:
        return False
    return (
        text.startswith(("/", ".", "~"))
        or "/" in text
        or (os.sep != "/" and os.sep in text)
        or text.endswith(_PATH_SUFFIXES)
    )


def _without_local_paths(value, public_ids: set[str], key: str | None = None):
    if isinstance(value, dict):
        return {name: _without_local_paths(item, public_ids, name) for name, item in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(item, public_ids, key) for item in value]
    if isinstance(value, str) and key != "format" and _is_path(value, public_ids):
        return LOCAL_PATH
    return value


def public_record(record: dict, file_name: str, public_ids: set[str] = frozenset()) -> dict:
    """An aggregate-level copy of a run record (``run.json``/``aggregation.json``): client-level
    fields removed (the client count stays), per-client byte counts reduced to totals, and every
    string with a "/" that is not one of ``public_ids`` (Hub ids of the base and datasets)
    replaced by LOCAL_PATH."""
    public = {key: value for key, value in record.items() if key not in CLIENT_LEVEL_KEYS.get(file_name, ())}
    if isinstance(record.get("clients"), list) and "clients" not in public:
        public["num_clients"] = len(record["clients"])
    for holder in (public, *(value for value in public.values() if isinstance(value, dict))):
        communication = holder.get("communication")
        if isinstance(communication, dict):
            holder["communication"] = {k: v for k, v in communication.items() if k not in PER_CLIENT_COMMUNICATION}
    if isinstance(public.get("modules"), dict):  # each client's norm and cosine per module
        public["modules"] = {name: {k: v for k, v in module.items() if k != "clients"} if isinstance(module, dict) else module
                             for name, module in public["modules"].items()}
    privacy = public.get("privacy")
    if isinstance(privacy, dict) and isinstance(privacy.get("record_level"), dict):
        # Each client's (ε, δ): its δ defaults to 1/N, its record count.
        public["privacy"] = {**privacy, "record_level": {k: v for k, v in privacy["record_level"].items() if k != "per_client"}}
    return _without_local_paths(public, set(public_ids))


def build_upload_folder(source: str | os.PathLike, out_dir: str | os.PathLike, *, repo_id: str,
                        include_client_details: bool = False, selection: Mapping | None = None,
                        variant: str = "peft") -> Path:
    """Write the folder ``push`` uploads to ``out_dir`` (which must not exist), atomically.

    Without ``include_client_details`` the records are `public_record` copies and the adapter
    config's ``base_model_name_or_path`` keeps a Hub id only (a local base path becomes null).
    ``variant="uniform"`` uploads the `export.export_uniform` form of the adapter (one rank, no
    patterns: what vLLM, SGLang, LoRAX and llama.cpp scale right) instead of the per-module one.
    """
    if variant not in ("peft", "uniform"):
        raise FloristError(f"--format {variant!r}: choose peft or uniform")
    if variant == "uniform":
        from florist_hf.export import export_uniform

        with tempfile.TemporaryDirectory(prefix="florist-hf-uniform-") as scratch:
            uniform = export_uniform(resolve_source(source).adapter_dir, Path(scratch) / "uniform")
            return _build_upload_folder(source, out_dir, repo_id=repo_id, include_client_details=include_client_details,
                                        selection=selection, uniform=uniform)
    return _build_upload_folder(source, out_dir, repo_id=repo_id, include_client_details=include_client_details,
                                selection=selection, uniform=None)


def _build_upload_folder(source, out_dir, *, repo_id: str, include_client_details: bool, selection, uniform) -> Path:
    publish = resolve_source(source)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FloristError(f"{out_dir}: already exists; choose a new directory for the upload folder")
    run, sidecar = publish.run, publish.sidecar
    if sidecar is not None:
        ranks, rank_source = selected_ranks(sidecar), publish.sidecar_path
    else:
        # Without a sidecar the adapter itself says which rank each module kept.
        adapter = read_adapter(publish.adapter_dir)
        ranks, rank_source = {name: module.rank for name, module in adapter.modules.items()}, publish.adapter_dir
    adapter_config = read_json(publish.adapter_dir / ADAPTER_CONFIG)
    base_model_name = run.get("base_model") or adapter_config.get("base_model_name_or_path") or "unknown"
    base_model = _hub_repo_id(base_model_name)
    gguf = run.get("base_gguf")
    if gguf:  # trained on the dequantized GGUF file: the repository that holds it, when on the Hub
        base_model_name, base_model = gguf["gguf_file"], _hub_repo_id(gguf["source"])
    method = run.get("method") or (sidecar or {}).get("method")

    if uniform is not None:
        adapter_config = read_json(uniform.out_dir / ADAPTER_CONFIG)
    with atomic_directory(out_dir) as staging:
        weights_dir = publish.adapter_dir if uniform is None else uniform.out_dir
        shutil.copyfile(weights_dir / ADAPTER_WEIGHTS, staging / ADAPTER_WEIGHTS)
        if include_client_details:
            shutil.copyfile(weights_dir / ADAPTER_CONFIG, staging / ADAPTER_CONFIG)
        else:
            public_config = {**adapter_config, "base_model_name_or_path": base_model}
            (staging / ADAPTER_CONFIG).write_text(json.dumps(public_config, indent=2, sort_keys=True) + "\n")
        public_ids = {name for name in (base_model, *run.get("datasets", [])) if _hub_repo_id(name)}
        for record_path, record in ((publish.sidecar_path, sidecar), (publish.run_path, run)):
            if record_path is None:
                continue
            if include_client_details:
                shutil.copyfile(record_path, staging / record_path.name)
            else:
                public = public_record(record, record_path.name, public_ids)
                (staging / record_path.name).write_text(json.dumps(public, indent=2) + "\n")
        plot_selected_ranks(ranks, rank_source, staging / RANKS_PLOT, title=f"Selected rank: {repo_id}")
        card = ModelCard(
            f"---\n{_card_data(run, method, base_model, repo_id).to_yaml()}\n---\n\n"
            + _card_body(repo_id, method, run, sidecar, ranks, rank_source, base_model, Path(base_model_name).name,
                         include_client_details, selection, None if uniform is None else uniform.rank)
        )
        card.save(staging / MODEL_CARD)
    return out_dir


def _check_repo_id(repo_id: str) -> None:
    if repo_id.count("/") != 1:
        raise FloristError(f"{repo_id!r}: not a Hub repo id; use the form namespace/name, e.g. alice/tinyllama-florist")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        reason = str(error).splitlines()[0]
        raise FloristError(f"{repo_id!r}: invalid Hub repo id ({reason}); use the form namespace/name") from None


def _hub_endpoint() -> str:
    # huggingface_hub reads HF_ENDPOINT once, at import; reading it here honours a value set later.
    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def push(
    source: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    dry_run_dir: str | os.PathLike | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    include_client_details: bool = False,
    selection: Mapping | None = None,
    variant: str = "peft",
) -> str:
    """Upload a run's global adapter (or an adapter directory) to the model repo ``repo_id``.

    ``selection`` (from `sweep.picked_branch`) adds how the run's τ was chosen to the card;
    ``variant="uniform"`` uploads the uniform-rank form (see `build_upload_folder`).

    With ``dry_run_dir`` the upload folder is written there and nothing is sent; the return value is
    then the folder's path. Otherwise the repo is created if needed (``private`` applies only to a new
    repo) and its URL returned. ``token`` defaults to huggingface_hub's: HF_TOKEN, then the token
    stored by ``hf auth login``.
    """
    _check_repo_id(repo_id)
    if dry_run_dir is not None:
        return str(build_upload_folder(source, dry_run_dir, repo_id=repo_id, include_client_details=include_client_details,
                                       selection=selection, variant=variant))
    token = token or get_token()
    if not token:
        raise FloristError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    if constants.is_offline_mode():
        raise FloristError("HF_HUB_OFFLINE is set: unset it to push, or pass a dry-run directory to only build the folder")
    endpoint = _hub_endpoint()
    api = HfApi(endpoint=endpoint, token=token, library_name="florist-hf", library_version=__version__)
    with tempfile.TemporaryDirectory(prefix="florist-hf-upload-") as scratch:
        folder = build_upload_folder(source, Path(scratch) / "upload", repo_id=repo_id,
                                     include_client_details=include_client_details, selection=selection, variant=variant)
        try:
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=commit_message)
        except HfHubHTTPError as error:
            status = error.response.status_code if error.response is not None else "no response"
            hint = (
                "check that your token has write access to this namespace"
                if status in (401, 403)
                else "check the repo id and HF_ENDPOINT, then retry"
            )
            raise FloristError(f"{repo_id}: upload to {endpoint} failed (HTTP {status}); {hint}") from None
    return str(repo_url)
