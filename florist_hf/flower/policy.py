"""What a SuperNode lets a server ask of it: the node operator's policy, checked before any work.

Every train message carries the server's recipe, and the ClientApp would otherwise use it as
given: the base model to download and load, whether to run the model repository's own code, and
any ``TrainingArguments`` field (``push_to_hub``, ``hub_token``, ``report_to``, ...). A node
operator writes a policy YAML and starts the SuperNode with ``--node-config "policy='/etc/florist/policy.yaml'"``::

    models: [meta-llama/Llama-3.2-1B, huggyllama/llama-7b@main]   # empty or absent: any base
    trust_remote_code: false                                       # the default
    training_keys: [deepspeed]                                     # beyond the safe defaults
    data_sources: [databricks/databricks-dolly-15k]                # empty or absent: any
    privacy: {require: dp_sgd, max_epsilon: 3.0}                   # train only under DP-SGD, ε ≤ 3 for the federation

Without a policy the safe defaults hold: any base model, no remote code, and only the
`SAFE_TRAINING_KEYS` and the recipe's trainer's own optimisation settings (``TrainerKind.safe_keys``:
e.g. DPO's ``beta``, SFT's ``packing``). A request outside the policy is refused with one line naming the rule; the
server leaves that client out of the round, which goes on if ``federation.min_clients`` holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from florist_hf.clients.registry import trainer_kind
from florist_hf.errors import FloristError

#: node_config key naming the policy file.
POLICY = "policy"

#: TrainingArguments fields a server may set without the node's say-so: optimisation, precision
#: and logging cadence. Anything that reaches the network, credentials, trackers, files outside the
#: work dir or the node's hardware layout (push_to_hub, hub_*, report_to, deepspeed, fsdp, ...)
#: must be listed in the policy's ``training_keys``.
SAFE_TRAINING_KEYS = frozenset({
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "optim_args",
    "num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "gradient_checkpointing", "gradient_checkpointing_kwargs",
    "activation_checkpointing", "activation_checkpointing_kwargs", "bf16", "fp16", "tf32", "use_cpu", "seed",
    "data_seed", "train_sampling_strategy",
    "logging_steps", "logging_strategy", "save_steps", "save_strategy", "save_total_limit", "disable_tqdm",
    "dataloader_num_workers", "dataloader_pin_memory", "remove_unused_columns", "label_smoothing_factor",
    "neftune_noise_alpha", "average_tokens_across_devices",
})


class PrivacyPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Train only with record-level DP-SGD (``privacy.mode: dp_sgd`` in the recipe).
    require: Literal["dp_sgd"] = "dp_sgd"
    #: The most ε this node spends over every round it is planned to take part in (its own records,
    #: its own accounting); None: any budget.
    max_epsilon: float | None = Field(None, gt=0)
    #: The largest δ it accepts; None: any.
    max_delta: float | None = Field(None, gt=0, lt=1)


class NodePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Base models the node loads: Hub ids or local paths, ``id@revision`` to pin a revision.
    models: list[str] = Field(default_factory=list)
    trust_remote_code: bool = False
    #: TrainingArguments fields a server may set beyond `SAFE_TRAINING_KEYS`.
    training_keys: list[str] = Field(default_factory=list)
    #: Datasets (Hub ids or local paths) the server may name as data.source; empty: any. A node
    #: started with its own ``data-file`` never reads the server's source.
    data_sources: list[str] = Field(default_factory=list)
    #: DP-SGD this node requires before it trains (None: none required).
    privacy: PrivacyPolicy | None = None


def load_policy(node_config) -> tuple[NodePolicy, str]:
    """The node's policy and where it came from (its file, or "the default policy")."""
    path = node_config.get(POLICY)
    if not path:
        return NodePolicy(), "the default node policy"
    path = Path(str(path)).expanduser()
    try:
        return NodePolicy.model_validate(yaml.safe_load(path.read_text()) or {}), str(path)
    except OSError as error:
        raise FloristError(f"node policy {path}: cannot be read ({error.strerror}); fix the SuperNode's --node-config policy=...") from None
    except (yaml.YAMLError, ValidationError) as error:
        reason = str(error).splitlines()[0] if isinstance(error, yaml.YAMLError) else "; ".join(
            f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors())
        raise FloristError(f"node policy {path}: {reason}") from None


def check_request(policy: NodePolicy, source: str, recipe, client_id: int, *, own_data: bool = False) -> None:
    """Refuse, in one line naming the rule, a recipe that asks this node for more than its policy allows."""
    required = policy.privacy
    if required is not None:
        if recipe.privacy is None:
            raise FloristError(f"{source} requires DP-SGD (privacy: require: dp_sgd) and the recipe trains without it; "
                               "the server can set privacy.mode: dp_sgd with a target_epsilon"
                               + (f" of at most {required.max_epsilon:g}" if required.max_epsilon is not None else ""))
        target = recipe.privacy.target_epsilon
        if required.max_epsilon is not None and target is not None and target > required.max_epsilon:
            raise FloristError(f"{source} refuses privacy.target_epsilon {target:g}: this node spends at most "
                               f"ε = {required.max_epsilon:g} (its policy's privacy.max_epsilon)")
    if policy.data_sources and not own_data and recipe.data.source not in policy.data_sources:
        raise FloristError(
            f"{source} refuses data.source {recipe.data.source!r} (data_sources: {policy.data_sources}); "
            "the node operator can add it, or start the SuperNode with its own data-file"
        )
    model = recipe.model
    if policy.models:
        allowed = {}
        for entry in policy.models:
            name, _, revision = entry.partition("@")
            allowed.setdefault(name, set()).add(revision or None)
        if model.name_or_path not in allowed:
            raise FloristError(
                f"{source} refuses base model {model.name_or_path!r} (models: {policy.models}); "
                "the node operator can add it to the policy's models"
            )
        revisions = allowed[model.name_or_path]
        if None not in revisions and model.revision not in revisions:
            raise FloristError(
                f"{source} refuses revision {model.revision!r} of {model.name_or_path!r} (allowed: {sorted(revisions)})"
            )
    if model.trust_remote_code and not policy.trust_remote_code:
        raise FloristError(
            f"{source} refuses model.trust_remote_code=true (it would run code from {model.name_or_path!r}'s repository); "
            "the node operator can set trust_remote_code: true in the policy"
        )
    training = {**recipe.training, **recipe.client_training.get(client_id, {})}
    allowed_keys = SAFE_TRAINING_KEYS | trainer_kind(recipe.client.trainer).safe_keys | set(policy.training_keys)
    # report_to: "none" is the default asking for nothing; any tracker is a key the node must allow.
    refused = sorted(key for key, value in training.items()
                     if key not in allowed_keys and not (key == "report_to" and value in ("none", ["none"], [])))
    if refused:
        raise FloristError(
            f"{source} refuses training.{refused[0]}"
            + (f" (and {', '.join(refused[1:])})" if refused[1:] else "")
            + ": not a key a server may set on this node; the node operator can list it in the policy's training_keys"
        )


def check_privacy(policy: NodePolicy, source: str, client_privacy) -> None:
    """Refuse a DP-SGD round whose (ε, δ), accounted on this node's own records over every round it
    is planned to take part in, exceeds the policy (`privacy.client_privacy`'s result)."""
    required = policy.privacy
    if required is None or client_privacy is None:
        return
    planned = client_privacy.epsilon_planned
    if required.max_epsilon is not None and planned > required.max_epsilon:
        raise FloristError(f"{source} refuses to train: its records would spend ε = {planned:.3g} over the "
                           f"{client_privacy.rounds_planned} rounds planned (noise σ = {client_privacy.noise_multiplier:.3g}), "
                           f"above its policy's max_epsilon {required.max_epsilon:g}")
    if required.max_delta is not None and client_privacy.delta > required.max_delta:
        raise FloristError(f"{source} refuses δ = {client_privacy.delta:.3g}, above its policy's max_delta "
                           f"{required.max_delta:g}; the server can set privacy.delta")
