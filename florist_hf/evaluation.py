"""Evaluate a base model, alone or with a PEFT adapter, with lm-evaluation-harness.

The adapter is loaded by lm-eval's HFLM through its ``peft=`` argument, so the numbers are those
lm-eval reports for the same model and adapter. Everything that can be checked before the model
is loaded (adapter files and shapes, task names, include paths, data files) is checked first and
reported as a one-line ``FloristError``.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from florist_hf.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, factor_shapes, model_key
from florist_hf.errors import FloristError
from florist_hf.io_utils import write_json_atomic

logger = logging.getLogger(__name__)
# lm-eval's hints for its own command line name flags this one does not have (``--metadata`` for the
# paper task's data file, "Ensure do_sample=True" for our max_gen_toks, "Overwriting default
# num_fewshot" for our --num-fewshot); its errors still show.
for _lm_eval_logger in ("lm_eval.evaluator", "lm_eval.api.task"):
    logging.getLogger(_lm_eval_logger).setLevel(logging.ERROR)

#: The folder of task YAMLs shipped with the package; always on lm-eval's include path.
PACKAGED_TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
#: MMLU by log-likelihood (lm-eval's mmlu prompt and scoring) on the 1,444-question subset.
MMLU_SUBSET_TASK = "florist_mmlu"
#: The paper's generative protocol on the subset: its Alpaca prompt, and the chat-template variant.
PAPER_MMLU_TASK = "florist_mmlu_paper"
PAPER_MMLU_CHAT_TASK = "florist_mmlu_paper_chat"
#: The packaged tasks that read the subset file named by the ``data_file`` task metadata.
SUBSET_TASKS = (MMLU_SUBSET_TASK, PAPER_MMLU_TASK, PAPER_MMLU_CHAT_TASK)
#: lm-eval's MMLU, read from the Hub's cais/mmlu.
HUB_MMLU_TASK = "mmlu"
#: What the paper protocol changes from the reference, recorded with every paper-protocol result.
PAPER_DECODING_NOTE = "greedy decoding in eval mode (the reference sampled at T=0.2 with the model in train mode)"
#: datasets' packaged builders: a task whose dataset_path is one of them reads local files.
_LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas", "imagefolder", "audiofolder", "xml", "sql"})

#: The parts of lm-eval's output worth keeping; the rest (samples aside) is environment detail.
_KEPT_RESULT_KEYS = ("results", "groups", "group_subtasks", "versions", "n-shot", "n-samples", "higher_is_better")
#: The task config fields that say what was measured; the rest are prompt functions and defaults.
_KEPT_CONFIG_KEYS = (
    "task",
    "dataset_path",
    "dataset_name",
    "test_split",
    "output_type",
    "num_fewshot",
    "metric_list",
    "generation_kwargs",
    "metadata",
)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def paper_mmlu_task_dir() -> Path:
    """The packaged folder holding the paper-protocol tasks (YAMLs and their utils.py)."""
    return PACKAGED_TASKS_DIR / PAPER_MMLU_TASK


def paper_mmlu_task(apply_chat_template: bool) -> str:
    """The paper protocol's task for a prompt with or without the tokenizer's chat template."""
    return PAPER_MMLU_CHAT_TASK if apply_chat_template else PAPER_MMLU_TASK


# --------------------------------------------------------------------------- checks before loading


def _load_base_config(base_model: str):
    from florist_hf.loading import load_model_config

    return load_model_config(base_model, key="--base")


def _linear_in_out(module) -> tuple[int, int] | None:
    """(in_features, out_features) of a layer LoRA adapts as a matrix; None for other layer types."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):  # GPT-2 style: weight stored as (in, out)
        return module.weight.shape[0], module.nf
    return None


def _same_model_reference(recorded: str, given: str) -> bool:
    if Path(recorded).exists() and Path(given).exists():
        return Path(recorded).resolve() == Path(given).resolve()
    return recorded.rstrip("/") == given.rstrip("/")


def check_adapter_matches_base(adapter: str | os.PathLike, base_model: str) -> None:
    """Check ``adapter`` is a PEFT adapter directory whose LoRA factors fit ``base_model``'s layers.

    Shapes are compared against the base architecture built on the meta device (no weights are
    read), so a mismatch is reported before lm-eval spends time loading the model. A different
    ``base_model_name_or_path`` alone is only a warning: the same model is often saved under
    another path or a Hub id and its local copy.
    """
    import torch
    from transformers import AutoModelForCausalLM

    adapter_dir = Path(adapter)
    if not adapter_dir.is_dir():
        raise FloristError(f"{adapter_dir}: adapter directory not found; pass a directory written by PEFT's save_pretrained")
    config_file = adapter_dir / ADAPTER_CONFIG
    try:
        adapter_config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise FloristError(
            f"{adapter_dir}: not a PEFT adapter (no adapter_config.json); pass a directory written by PEFT's save_pretrained"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FloristError(f"{config_file}: corrupt JSON ({error}); re-save the adapter") from None
    if not isinstance(adapter_config, dict) or "peft_type" not in adapter_config:
        raise FloristError(f"{config_file}: no peft_type, so not a PEFT adapter config; re-save the adapter with PEFT")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise FloristError(
            f"{adapter_dir}: no adapter_model.safetensors; re-save the adapter with save_pretrained (safetensors is its default)"
        )

    recorded_base = adapter_config.get("base_model_name_or_path")
    if recorded_base and not _same_model_reference(recorded_base, base_model):
        logger.warning("%s was trained on %s but is evaluated on %s", adapter_dir, recorded_base, base_model)

    base_config = _load_base_config(base_model)
    with torch.device("meta"):
        base_architecture = AutoModelForCausalLM.from_config(base_config)
    for peft_name, shapes in sorted(factor_shapes(adapter_dir).items()):
        if not peft_name.startswith(PEFT_PREFIX):
            continue  # not a factor of the base's own layers
        module_name = model_key(peft_name)
        try:
            base_layer = base_architecture.get_submodule(module_name)
        except AttributeError:
            raise FloristError(
                f"{adapter_dir}: module {module_name} does not exist in {base_model}; "
                "evaluate the adapter on the base model it was trained on (--base)"
            ) from None
        in_out = _linear_in_out(base_layer)
        if in_out is None or set(shapes) != {"A", "B"}:
            continue
        in_features, out_features = in_out
        lora_a_shape, lora_b_shape = shapes["A"], shapes["B"]
        if lora_a_shape[1] != in_features or lora_b_shape[0] != out_features:
            raise FloristError(
                f"{adapter_dir}: module {module_name} has lora_A {lora_a_shape} and lora_B {lora_b_shape}, "
                f"but that layer of {base_model} maps {in_features} -> {out_features} features; "
                "evaluate the adapter on the base model it was trained on (--base)"
            )


def _task_manager(task_names: Sequence[str], include_paths: Sequence[Path], metadata: Mapping[str, Any] | None):
    """A TaskManager that knows every requested task, or a FloristError naming the unknown one.

    Indexing lm-eval's ~14,000 built-in task YAMLs takes seconds, so the include paths alone are
    tried first; the built-in tasks are indexed only when a requested task is not among them.
    """
    from lm_eval.tasks import TaskManager

    def knows_all(manager) -> bool:
        known = set(manager.all_tasks)
        return all(name in known or Path(name).is_file() for name in task_names)

    common = dict(include_path=[str(path) for path in include_paths], metadata=dict(metadata or {}))
    local_manager = TaskManager(include_defaults=False, **common)
    if knows_all(local_manager):
        return local_manager
    full_manager = TaskManager(include_defaults=True, **common)
    known = set(full_manager.all_tasks)
    for name in task_names:
        if name not in known and not Path(name).is_file():
            close = difflib.get_close_matches(name, full_manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise FloristError(
                f"unknown lm-eval task {name!r}{hint}; list tasks with `lm-eval ls tasks`, "
                "or pass --include-path with the folder of its task YAML"
            )
    return full_manager


def _hub_datasets(task_manager, task_names: Sequence[str]) -> dict[str, str]:
    """The Hub datasets the named tasks read (their groups' and tags' member tasks included), each
    with the first named task that needs it; tasks with a custom dataset hook or local files are left out."""
    index = task_manager.task_index
    seen: set[str] = set()
    datasets_needed: dict[str, str] = {}

    def walk(name, requested: str) -> None:
        if not isinstance(name, str) or name in seen or name not in index:
            return
        seen.add(name)
        entry = index[name]
        config = entry.cfg or {}
        if entry.kind.name == "GROUP":
            for item in config.get("task", []):
                walk(item.get("task") if isinstance(item, dict) else item, requested)
        elif entry.kind.name == "TAG":
            for member, member_entry in index.items():
                if name in member_entry.tags:
                    walk(member, requested)
        else:
            path = config.get("dataset_path")
            if isinstance(path, str) and "custom_dataset" not in config and path not in _LOCAL_BUILDERS and not Path(path).exists():
                datasets_needed.setdefault(path, requested)

    for task_name in task_names:
        walk(task_name, task_name)
    return datasets_needed


def hub_dataset_unreachable(dataset: str) -> str | None:
    """Why lm-eval could not read the Hub dataset ``dataset`` now (None: it can): the Hub offline
    (HF_HUB_OFFLINE=1) with the dataset in neither Hugging Face cache, or the Hub not answering."""
    import datasets
    from huggingface_hub import HfApi, constants, is_offline_mode

    cached = (Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}").is_dir() or (
        Path(datasets.config.HF_DATASETS_CACHE) / dataset.replace("/", "___")
    ).is_dir()
    if cached:
        return None
    if is_offline_mode() or datasets.config.HF_DATASETS_OFFLINE:
        return "the Hub is offline (HF_HUB_OFFLINE=1) and it is not in the local Hugging Face cache"
    try:
        HfApi().dataset_info(dataset, timeout=10)
    except Exception as error:  # noqa: BLE001 - any failure means lm-eval would fail the same way, later
        return f"the Hub did not answer ({type(error).__name__})"
    return None


def _check_tasks_apply(
    task_names: Sequence[str], *, num_fewshot: int | None, apply_chat_template: bool, task_metadata: Mapping[str, Any]
) -> None:
    """Settings that cannot apply to the packaged subset tasks, refused rather than dropped."""
    subset_tasks = [name for name in task_names if name in SUBSET_TASKS]
    if not subset_tasks:
        return
    if not task_metadata.get("data_file"):
        raise FloristError(
            f"{subset_tasks[0]} reads the 1,444-question MMLU subset: pass its file with --mmlu-file "
            "(evaluation.mmlu_file in a recipe)"
        )
    if num_fewshot:
        raise FloristError(
            f"--num-fewshot {num_fewshot} does not apply to {subset_tasks[0]}: the MMLU subset has no dev split "
            "to draw examples from; leave it at 0"
        )
    if PAPER_MMLU_TASK in task_names and apply_chat_template:
        raise FloristError(
            f"{PAPER_MMLU_TASK} is the paper's Alpaca prompt, which a chat template would wrap with its primer in the "
            f"user's turn; run {PAPER_MMLU_CHAT_TASK} for the chat-template variant"
        )
    if PAPER_MMLU_CHAT_TASK in task_names and not apply_chat_template:
        raise FloristError(
            f"{PAPER_MMLU_CHAT_TASK} is the chat-template variant: pass --apply-chat-template "
            f"(apply_chat_template: true in a recipe), or run {PAPER_MMLU_TASK} for the Alpaca prompt"
        )


def _check_hub_datasets(task_manager, task_names: Sequence[str]) -> None:
    """A task whose Hub dataset cannot be read is refused here, before the model is loaded."""
    for dataset, task_name in _hub_datasets(task_manager, task_names).items():
        reason = hub_dataset_unreachable(dataset)
        if reason is None:
            continue
        hint = (
            f"; for MMLU offline pass --mmlu-file PATH/mmlu_test_1444.json (evaluation.mmlu_file in a recipe): "
            f"MMLU by log-likelihood on the 1,444-question subset, task {MMLU_SUBSET_TASK}"
            if dataset == "cais/mmlu"
            else "; go online, or point --include-path at a task YAML that reads local files"
        )
        raise FloristError(f"lm-eval task {task_name} reads the Hub dataset {dataset}, but {reason}{hint}")


# --------------------------------------------------------------------------- running


def _jsonable(value):
    """``json.dumps`` fallback: numpy scalars become numbers, anything else its string form."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _to_json_safe(value):
    return json.loads(json.dumps(value, default=_jsonable))


def _results_record(raw: Mapping[str, Any], run_info: Mapping[str, Any], log_samples: bool) -> dict:
    """The JSON-safe part of lm-eval's output worth keeping, after our own run fields."""
    record: dict[str, Any] = dict(run_info)
    record["lm_eval_version"] = raw.get("lm_eval_version")
    record["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for key in _KEPT_RESULT_KEYS:
        if key in raw:
            record[key] = raw[key]
    record["configs"] = {
        task: {key: config[key] for key in _KEPT_CONFIG_KEYS if config.get(key) is not None}
        for task, config in raw.get("configs", {}).items()
    }
    if log_samples:
        record["samples"] = raw.get("samples", {})
    return _to_json_safe(record)


def _quiet_lm(lm_class):
    """``lm_class`` (lm-eval's HFLM) with its per-request progress bars off, through lm-eval's own
    ``disable_tqdm`` (its bars set ``disable`` themselves, so tqdm's TQDM_DISABLE does not reach them)."""

    class QuietLM(lm_class):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    QuietLM.__name__ = QuietLM.__qualname__ = lm_class.__name__
    return QuietLM


@contextlib.contextmanager
def _git_hash_without_git():
    """lm-eval records the git commit of the working directory by running ``git describe``, whose
    "fatal: not a git repository" goes straight to the terminal outside a repository (and the
    commit is not kept in our results); lm-eval's own reader of ``.git/HEAD`` gives that commit
    without a subprocess, so it stands in while lm-eval runs."""
    import lm_eval.evaluator
    from lm_eval.loggers.utils import get_commit_from_path

    original = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = lambda: get_commit_from_path(os.getcwd())
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = original


def evaluate_adapter(
    base_model: str,
    adapter: str | os.PathLike | None,
    *,
    tasks: str | Sequence[str] = ("mmlu",),
    num_fewshot: int | None = 0,
    limit: int | float | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    mmlu_file: str | os.PathLike | None = None,
    task_metadata: Mapping[str, Any] | None = None,
    device: str | None = None,
    batch_size: int | str = 8,
    max_new_tokens: int | None = None,
    log_samples: bool = False,
    apply_chat_template: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    out_file: str | os.PathLike | None = None,
) -> dict:
    """Run lm-eval ``tasks`` on ``base_model`` with ``adapter`` (None: the base model alone).

    ``batch_size`` is a number or lm-eval's "auto" / "auto:N"; ``apply_chat_template`` wraps every
    prompt in the tokenizer's chat template (instruct bases); ``revision`` and
    ``trust_remote_code`` reach the base model's load.

    ``tasks`` are lm-eval task/group names (a string may list several, comma-separated) or task
    YAML paths; the packaged tasks (``florist_mmlu``, ``florist_mmlu_paper``,
    ``florist_mmlu_paper_chat``) and ``include_path`` folders are searched as well; the packaged
    ones read the 1,444-question subset at ``mmlu_file``. ``num_fewshot`` None keeps each task's
    own default; ``max_new_tokens`` overrides generation tasks' ``max_gen_toks``; ``task_metadata``
    reaches every task's dataset hook. Settings that cannot apply to a task, and tasks whose Hub
    dataset cannot be read now, are refused before the model is loaded. Returns a JSON-safe dict with lm-eval's
    ``results``, ``versions``, ``n-samples`` and a short ``configs``, plus the run's settings and,
    with ``log_samples``, the per-question ``samples``; ``out_file`` gets the same dict, atomically.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    task_names = [name.strip() for name in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    task_names = [name for name in task_names if name]
    if not task_names:
        raise FloristError("no evaluation task given; pass a task name such as mmlu")
    if include_path is None:
        user_include_paths = []
    elif isinstance(include_path, (str, os.PathLike)):
        user_include_paths = [include_path]
    else:
        user_include_paths = list(include_path)
    for path in map(Path, user_include_paths):
        if not path.is_dir():
            raise FloristError(f"{path}: include path not found; pass a folder holding lm-eval task YAML files")
    task_metadata = dict(task_metadata or {})
    if mmlu_file is not None:
        from florist_hf.lm_eval_tasks.mmlu_subset import read_subset

        mmlu_file = Path(mmlu_file).resolve()
        read_subset(mmlu_file)  # a bad file is reported before the model is loaded
        task_metadata["data_file"] = str(mmlu_file)
    _check_tasks_apply(task_names, num_fewshot=num_fewshot, apply_chat_template=apply_chat_template,
                       task_metadata=task_metadata)
    if adapter is None:  # a missing base fails here in one line, not deep inside lm-eval
        _load_base_config(base_model)
    else:
        check_adapter_matches_base(adapter, base_model)
    task_manager = _task_manager(task_names, [PACKAGED_TASKS_DIR, *map(Path, user_include_paths)], task_metadata)
    _check_hub_datasets(task_manager, task_names)

    device = device or default_device()
    model = _quiet_lm(HFLM)(
        pretrained=base_model,
        peft=None if adapter is None else str(adapter),
        device=device,
        batch_size=batch_size,
        revision=revision or "main",
        trust_remote_code=trust_remote_code,
    )
    with _git_hash_without_git():
        raw_results = lm_eval.simple_evaluate(
            model=model,
            tasks=task_names,
            num_fewshot=num_fewshot,
            limit=limit,
            gen_kwargs=None if max_new_tokens is None else {"max_gen_toks": max_new_tokens},
            log_samples=log_samples,
            apply_chat_template=apply_chat_template,
            task_manager=task_manager,
        )
    run_info = {
        "base_model": str(base_model),
        "adapter": None if adapter is None else str(adapter),
        "tasks": task_names,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "device": device,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "apply_chat_template": apply_chat_template,
        "task_metadata": task_metadata,
    }
    record = _results_record(raw_results, run_info, log_samples)
    if out_file is not None:
        write_json_atomic(out_file, record)
    return record


def evaluate_paper_mmlu(
    base_model: str,
    adapter: str | os.PathLike | None,
    data_file: str | os.PathLike,
    *,
    apply_chat_template: bool = False,
    limit: int | float | None = None,
    device: str | None = None,
    batch_size: int | str = 8,
    max_new_tokens: int = 32,
    log_samples: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    out_file: str | os.PathLike | None = None,
) -> dict:
    """The paper's protocol on the MMLU subset in ``data_file``: ``florist_mmlu_paper`` (its Alpaca
    prompt), or with ``apply_chat_template`` ``florist_mmlu_paper_chat`` (the question in the user's
    turn of the chat template, the assistant's turn primed with "The answer is: ").

    The paper's number is ``results[task]["macro_acc,none"]`` (accuracy averaged over subjects);
    ``acc,none`` is the per-question accuracy, ``strict_acc`` / ``strict_macro_acc`` credit only the
    first option letter named, and ``no_letter``, ``multi_letter``, ``substring_only`` and
    ``case_miss`` are the shares of generations the paper's rule reads loosely (see the task YAML).
    """
    task = paper_mmlu_task(apply_chat_template)
    record = evaluate_adapter(
        base_model,
        adapter,
        tasks=[task],
        num_fewshot=None,
        limit=limit,
        mmlu_file=data_file,
        device=device,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        log_samples=log_samples,
        apply_chat_template=apply_chat_template,
        revision=revision,
        trust_remote_code=trust_remote_code,
    )
    record["protocol"] = _paper_protocol_note(task)
    if out_file is not None:
        write_json_atomic(out_file, record)
    return record


def _paper_protocol_note(task: str) -> dict:
    prompt = "chat template, primer opening the assistant turn" if task == PAPER_MMLU_CHAT_TASK else "Alpaca"
    return {"name": "FLoRA/FLoRIST MMLU subset", "task": task, "prompt": prompt, "decoding": PAPER_DECODING_NOTE}


# --------------------------------------------------------------------------- reporting


def summarize_results(results: Mapping[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """``(task, metric, value, stderr)`` rows for the top-level tasks and groups of a result.

    Subtasks of a reported group (mmlu's 57 subjects) are left out to keep the table short. A
    metric under a filter other than lm-eval's ``none`` is named ``metric,filter``.
    """
    children = {child for members in results.get("group_subtasks", {}).values() for child in members}
    rows = []
    for task, metrics in results["results"].items():
        if task in children:
            continue
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            label = metric if filter_name == "none" else key
            rows.append((task, label, float(value), float(stderr) if isinstance(stderr, (int, float)) else None))
    return rows


def results_table(results: Mapping[str, Any], title: str | None = None):
    """A rich Table of ``summarize_results``."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("Task")
    table.add_column("Metric")
    table.add_column("Value", justify="right")
    table.add_column("± Stderr", justify="right")
    for task, metric, value, stderr in summarize_results(results):
        table.add_row(task, metric, f"{value:.4f}", "" if stderr is None else f"{stderr:.4f}")
    return table


# --- a federation's own evaluations: held-out loss of the global model, the recipe's lm-eval ----


def evaluation_settings(section) -> str:
    """A digest of the recipe's evaluation section: the section is not part of a run's fingerprint,
    so a result made with other settings (tasks, shots, limit) is made again rather than reused."""
    return hashlib.sha256(section.model_dump_json().encode()).hexdigest()[:16]


def read_evaluation(out_file: Path, section) -> dict | None:
    """The summary of an evaluation written by `evaluate_recipe`, if it was made with ``section``'s settings."""
    summary = json.loads(out_file.read_text())["florist_hf_summary"] if out_file.exists() else None
    return summary if summary is not None and summary.get("settings") == evaluation_settings(section) else None


def recipe_evaluation_plan(section, console=None) -> tuple[list[str], str | None]:
    """The lm-eval tasks a recipe's evaluation section runs, and the MMLU subset file they read.

    ``tasks`` as listed, with lm-eval's ``mmlu`` replaced by ``florist_mmlu`` (log-likelihood MMLU
    on the subset) where the Hub's cais/mmlu cannot be read and the section names the subset
    (``mmlu_file`` or ``paper_mmlu_file``), said in one line on ``console``; then the paper
    protocol's task when ``paper_mmlu_file`` is set (its chat-template variant with
    ``apply_chat_template``). A plan that cannot run is refused in one line.
    """
    subset = section.mmlu_file or section.paper_mmlu_file
    if subset is not None:
        from florist_hf.lm_eval_tasks.mmlu_subset import read_subset

        read_subset(subset)
    tasks = list(section.tasks)
    if HUB_MMLU_TASK in tasks:
        reason = hub_dataset_unreachable("cais/mmlu")
        if reason is not None and subset is None:
            raise FloristError(
                f"evaluation.tasks runs lm-eval's mmlu, which reads the Hub's cais/mmlu, but {reason}; set "
                "evaluation.mmlu_file to the 1,444-question subset (mmlu_test_1444.json) for MMLU by "
                "log-likelihood offline, or name other evaluation.tasks"
            )
        if reason is not None:
            tasks[tasks.index(HUB_MMLU_TASK)] = MMLU_SUBSET_TASK
            if console is not None:
                console.print(f"cais/mmlu cannot be read ({reason}): MMLU by log-likelihood on the "
                              f"questions of {subset} instead ({MMLU_SUBSET_TASK})", soft_wrap=True)
    if section.paper_mmlu_file:
        tasks.append(paper_mmlu_task(section.apply_chat_template))
    return tasks, subset


def evaluate_recipe(recipe, base_path: str, adapter_dir: Path, out_file: Path, console) -> dict:
    """The recipe's lm-eval evaluation of a published adapter, written to ``out_file``; returns
    ``{"tasks": {task: {metric: value}}, "results_file": ..., "settings": ...}``."""
    section = recipe.evaluation
    task_names, subset = recipe_evaluation_plan(section, console)
    results = evaluate_adapter(
        base_path, adapter_dir, tasks=task_names, num_fewshot=section.num_fewshot, limit=section.limit,
        include_path=section.include_path, mmlu_file=subset, batch_size=section.batch_size,
        log_samples=section.log_samples, apply_chat_template=section.apply_chat_template,
        revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code,
    )
    paper_tasks = [task for task in task_names if task in (PAPER_MMLU_TASK, PAPER_MMLU_CHAT_TASK)]
    if paper_tasks:
        results["protocol"] = _paper_protocol_note(paper_tasks[0])
    console.print(results_table(results))
    tasks: dict[str, dict] = {}
    for task, metric, value, stderr in summarize_results(results):
        tasks.setdefault(task, {})[metric] = value
        if stderr is not None:
            tasks[task][f"{metric}_stderr"] = stderr
    summary = {"tasks": tasks, "results_file": str(out_file), "settings": evaluation_settings(section)}
    write_json_atomic(out_file, {**results, "florist_hf_summary": summary})
    return summary
