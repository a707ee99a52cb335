"""The typed recipe schema: YAML in, validated settings out, with errors that name the key and file."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from florist_hf.aggregation import FACTOR_SUMS, METHODS, SKETCH_SUMS, method_class, method_from_settings
from florist_hf.aggregation.bounding import averaged_ranks_refusal
from florist_hf.aggregation.florist import FloristOptions, check_aggregation_mode
from florist_hf.clients.registry import TRAINERS, trainer_kind
from florist_hf.errors import FloristError, SettingError


class Section(BaseModel):
    # A recorded recipe (recipe.json) reads back as it was written: an infinite or NaN value stays one.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class QuantizationSection(Section):
    """QLoRA clients: the base loaded in 4 (or 8) bit with bitsandbytes; LoRA trains in ``compute_dtype``."""

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class ModelSection(Section):
    #: A Hub id, a local directory, ``package:NAME`` (the folder of an installed Python package), or
    #: ``builtin:tiny-llama`` (built offline with random weights).
    name_or_path: str
    #: A GGUF file in that folder or Hub repository (llama.cpp's format): the base and its tokenizer
    #: are dequantized from it by transformers to ``dtype``, once, into florist-hf's cache.
    gguf_file: str | None = None
    #: Settings of the builtin tiny Llama (ignored for other models).
    tiny: dict[str, int] = Field(default_factory=dict)
    #: The base's dtype on the clients. ``float64`` (CPU) is for numerical checks: it trains, but both
    #: trainers' losses compute their log-softmax in fp32 whatever the dtype (tests/test_sft_clients.py).
    dtype: Literal["float32", "bfloat16", "float16", "float64", "auto"] = "float32"
    revision: str | None = None
    trust_remote_code: bool = False
    #: The attention implementation transformers loads the base with (its default when unset: sdpa).
    #: flash_attention_2 needs the flash-attn package and a CUDA GPU.
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] | None = None
    #: Load the clients' base quantized (QLoRA). Merge-style methods hold the global updates beside
    #: the frozen quantized weights, so nothing is ever added into them.
    quantization: QuantizationSection | None = None

    @model_validator(mode="after")
    def _gguf_names_a_file(self):
        file = self.gguf_file
        if file is not None and (self.name_or_path.startswith("builtin:") or not file.endswith(".gguf")
                                 or any(part in ("", ".", "..") for part in file.replace("\\", "/").split("/"))
                                 or file.startswith("/")):
            raise ValueError("gguf_file names a .gguf file inside the folder or Hub repository of name_or_path "
                             "(a relative path, not with a builtin: base)")
        return self


class DataSection(Section):
    #: A Hub dataset id, a local JSON/JSONL file or dataset directory, the folder of a FLoRA
    #: layout, or ``builtin:demo`` (the small instruction set shipped with the package).
    source: str
    layout: Literal["records", "flora"] = "records"
    format: str | None = None
    fields: dict[str, str | None] | None = None
    split: str = "train"
    partition: Literal["iid", "dirichlet"] = "dirichlet"
    dirichlet_alpha: float = Field(0.5, gt=0)
    min_client_size: int = Field(40, ge=1)
    #: Examples of each label kept out of training as the test split (SPEC §6: 10 per category).
    holdout_per_label: int = Field(0, ge=0)
    #: Cap every client's shard at this many records, a seeded random draw (a Dirichlet shard is
    #: grouped by label, so its first records would hold only its first categories).
    max_samples_per_client: int | None = Field(None, ge=1)
    cutoff_len: int = Field(512, ge=8)
    train_on_inputs: bool = True
    #: How a client's batch is laid out: "padding_free" (its records packed into rows no longer
    #: than its longest record, one row under FlashAttention, the positions restarting at each record, so no
    #: token attends across records and little compute goes to padding; where the base's attention
    #: cannot keep records apart this falls back to padded, with one line saying why) or "padded"
    #: (a row per record, padded to the batch's longest).
    #: The loss, the optimizer steps and gradient accumulation are the same either way.
    batching: Literal["padding_free", "padded"] = "padding_free"
    #: How a record becomes text: the paper's Alpaca prompt, or the tokenizer's own chat template
    #: (the instruction and input as the user's turn, the output as the assistant's) for instruct bases.
    template: Literal["alpaca", "chat"] = "alpaca"
    seed: int = 42


class LoraSection(Section):
    #: One rank for every client, or one per client (heterogeneous).
    ranks: int | list[int] = 16
    #: One alpha, one per client, or None for alpha = alpha_multiplier · r (the paper's 2r).
    alphas: float | list[float] | None = None
    alpha_multiplier: float = 2.0
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    dropout: float = Field(0.05, ge=0, lt=1)
    use_rslora: bool = False

    @field_validator("ranks")
    @classmethod
    def _positive_ranks(cls, ranks):
        if any(r <= 0 for r in ([ranks] if isinstance(ranks, int) else ranks)):
            raise ValueError("ranks must be positive")
        return ranks

    def mixed_ranks(self) -> bool:
        """Whether the clients' ranks differ."""
        return isinstance(self.ranks, list) and len(set(self.ranks)) > 1




def sampled_count(num_clients: int, clients_per_round: int | float | None) -> int:
    """Clients per round: all (None), a count (an int, at most all) or a fraction (a float, at least one)."""
    if clients_per_round is None:
        return num_clients
    if isinstance(clients_per_round, int):
        return min(clients_per_round, num_clients)
    return max(1, min(num_clients, round(clients_per_round * num_clients)))


class DPBudget(Section):
    """The noise of a Gaussian mechanism, or the (ε, δ) budget to calibrate it to (give one)."""

    #: The budget for the whole federation (every round it covers), or the noise itself.
    target_epsilon: float | None = Field(None, gt=0)
    noise_multiplier: float | None = Field(None, ge=0)
    #: δ of the guarantee (default: 1 / the records of a client, or 1 / the clients).
    delta: float | None = Field(None, gt=0, lt=1)
    #: The recipe's key for this section, in its messages.
    _key: ClassVar[str] = "privacy"

    @model_validator(mode="after")
    def _noise_or_budget(self):
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(f"give {self._key} one of target_epsilon (the budget to calibrate the noise to) or noise_multiplier")
        return self


class CentralDPSection(DPBudget):
    """Client-level differential privacy on the server (DP-FedAvg): each client's factor update
    is bounded to ``federation.clip_update_norm``, the bounded updates are averaged with one fixed
    denominator (the clients sampled per round, each weighted alike), and Gaussian noise of
    standard deviation noise_multiplier · C / n is added to the average (fedit, ffa). FLoRIST, under
    secure aggregation: the noise goes on its two sketch sums instead, √2 times as much on each (the
    pair spends what one sum noised by noise_multiplier would)."""

    accountant: Literal["rdp", "prv"] = "rdp"
    _key: ClassVar[str] = "central_dp"


class SecureAggregationSection(Section):
    """federation.secure_aggregation: the server learns only sums of what the clients send (SecAgg+,
    `florist_hf.secure`). FLoRIST, FlexLoRA and FedEx-LoRA aggregate from two sketch sums, exactly
    at the default sketch width; FedIT, FFA-LoRA and FedSVD from their summed factors."""

    enabled: bool = True
    #: Clients needed at every stage of the protocol (default ⌈2n/3⌉); up to n − t may vanish after masking.
    threshold: int | None = Field(None, ge=2)
    #: Fixed-point fractional bits of what is summed (|error| ≤ n·2^-(bits+1) per value).
    fraction_bits: int = Field(32, ge=8, le=52)
    #: Columns of the sketch (florist, flexlora, fedex); default min(Σ r_k + 8, m, n) per module, exact.
    #: Fewer: less traffic, an approximate update, its estimated error in aggregation.json.
    sketch_columns: int | None = Field(None, ge=1)

    def settings(self):
        from florist_hf.secure.settings import SecAggSettings

        return SecAggSettings(threshold=self.threshold, fraction_bits=self.fraction_bits)


def sample_clients(num_clients: int, clients_per_round: int | float | None, seed: int, round_index: int) -> list[int]:
    """The clients of one round: all (None), a count (int) or a fraction (float), reproducibly drawn."""
    count = sampled_count(num_clients, clients_per_round)
    if count == num_clients:
        return list(range(num_clients))
    return sorted(random.Random(seed * 1_000_003 + round_index).sample(range(num_clients), count))


class FederationSection(Section):
    #: A registered aggregation method (`aggregation.METHODS`).
    method: str = "florist"
    #: FLoRIST's energy threshold τ, in (0, 1] (checked by `aggregation.florist.FloristOptions`).
    threshold: float = 0.9
    rounds: int = Field(1, ge=1)
    num_clients: int = Field(8, ge=1)
    #: Clients sampled each round: all (None), a count (an integer), or a fraction (a float in (0, 1]).
    clients_per_round: int | float | None = Field(None, gt=0)
    #: A round needs this many clients that trained successfully, or it fails.
    min_clients: int = Field(1, ge=1)
    seed: int = 42
    #: After each round, the global model's loss on the held-out test records (when there are any).
    eval_heldout_loss: bool = True
    #: The clients' learning rate across server rounds: "constant" (training.learning_rate every
    #: round) or "cosine" (round 1 at training.learning_rate, annealed to round_lr_min at the last
    #: round). Within a round the Trainer's own lr_scheduler_type still applies.
    round_lr_schedule: Literal["constant", "cosine"] = "constant"
    round_lr_min: float = Field(0.0, ge=0)
    #: How the server decomposes a FLoRIST round: "stacked" (every client's factors at once, exact)
    #: or "streaming" (each client folded into a running SVD as it arrives: memory bounded by the
    #: kept rank plus a block of clients, and a Flower round aggregates its replies as they come).
    aggregation: Literal["stacked", "streaming"] = "stacked"
    #: Streaming only: after each fold, components below this fraction of the largest singular value
    #: are dropped (0: only round-off, so streaming equals stacked). What is dropped is recorded in
    #: the round's aggregation.json (discarded_energy, error_bound).
    streaming_tolerance: float = Field(0.0, ge=0, lt=1)
    #: Bound every client's update to this Frobenius norm, over its whole adapter, before
    #: aggregation: the update s·B·A for florist and flora (whose clients train a fresh LoRA), the
    #: change of the factors since the global they continued for fedit, ffa, fedsvd and fedex. Each
    #: client's norm and scaling are recorded in the round's aggregation.json. Under secure_aggregation
    #: each client bounds its own update before it masks it, and no norm reaches the server.
    clip_update_norm: float | None = Field(None, gt=0)
    #: Client-level DP on the server for fedit and ffa, and florist under secure_aggregation (needs clip_update_norm).
    central_dp: CentralDPSection | None = None
    #: fedit, ffa: combine the clients' factors by their coordinate-wise median or trimmed mean
    #: (each client alike) instead of the weighted mean, so that a few bad clients cannot move them far.
    robust: Literal["median", "trimmed_mean"] | None = None
    #: trimmed_mean: the share of clients dropped at each end of every coordinate.
    trim_fraction: float = Field(0.1, ge=0, lt=0.5)
    #: The server learns only sums of the clients' contributions (see `SecureAggregationSection`).
    secure_aggregation: SecureAggregationSection | None = None

    def secure(self) -> SecureAggregationSection | None:
        """The secure-aggregation section when it is enabled, else None."""
        return self.secure_aggregation if self.secure_aggregation is not None and self.secure_aggregation.enabled else None

    @model_validator(mode="after")
    def _secure_aggregation_applies(self):
        secure = self.secure()
        if secure is None:
            return self
        from florist_hf.secure.methods import SKETCH, secure_inputs

        secure_inputs(self.method)  # a ValueError naming why the method cannot run so
        blocked = [("robust", self.robust is not None, "a median or trimmed mean needs each client's factors"),
                   ("aggregation: streaming", self.aggregation == "streaming", "the server holds only sums, so there is "
                    "no client stack to stream")]
        for key, present, why in blocked:
            if present:
                raise ValueError(f"secure_aggregation and {key} do not combine: {why}; remove one of them")
        if secure.sketch_columns is not None and SKETCH not in secure_inputs(self.method):
            raise ValueError(f"secure_aggregation.sketch_columns applies to florist, flexlora and fedex; {self.method} sums "
                             "its factors — remove it")
        try:
            secure.settings().threshold_for(self.clients_sampled())
        except ValueError as error:
            raise ValueError(f"secure_aggregation: {error} (the clients sampled per round)") from None
        return self

    @model_validator(mode="after")
    def _server_defences_where_defined(self):
        method = METHODS[self.method]
        if self.clip_update_norm is not None and not method.bounds_updates:
            raise ValueError(f"clip_update_norm bounds a client's update; {self.method} aggregates each client's whole product "
                             "(the global it was sent included), so no update is there to bound — use florist, flora, fedit or ffa")
        if self.central_dp is not None:
            if method.central_dp_on is None:
                offered = ", ".join(sorted(name for name, m in METHODS.items() if m.central_dp_on is not None))
                raise ValueError(
                    f"central_dp needs an aggregation the server can noise ({offered}); {self.method} needs each client's "
                    "factors, so noise on the server cannot hide them — use privacy.mode: dp_sgd (record-level DP on every "
                    "client) instead")
            if self.clip_update_norm is None:
                raise ValueError("central_dp calibrates its noise to federation.clip_update_norm; set it (e.g. 0.1)")
            if method.central_dp_on == SKETCH_SUMS:
                if self.secure() is None:
                    raise ValueError(f"central_dp with {self.method} noises the two sketch sums of the clients' bounded "
                                     "updates, which secure aggregation computes: add federation.secure_aggregation: "
                                     "{enabled: true} (the server then never sees a client's update either)")
                if self.secure().sketch_columns is not None:
                    from florist_hf.secure.settings import NARROW_SKETCH_UNDER_DP

                    raise ValueError(NARROW_SKETCH_UNDER_DP)
            if self.robust is not None:
                raise ValueError("central_dp adds its noise to the clients' mean; robust replaces that mean — use one of them")
        if self.robust is not None and not method.averages_factors:
            raise ValueError(f"robust combines factors coordinate by coordinate (fedit, ffa); for {self.method} bound the "
                             "clients' updates with clip_update_norm and read each client's norm and cosine in aggregation.json")
        return self

    @field_validator("method")
    @classmethod
    def _registered_method(cls, method):
        method_class(method)
        return method

    @field_validator("threshold")
    @classmethod
    def _energy_threshold(cls, threshold):
        FloristOptions(threshold=threshold)
        return threshold

    @model_validator(mode="after")
    def _streaming_is_floristic(self):
        try:
            check_aggregation_mode(self.method, self.aggregation, self.streaming_tolerance)
        except ValueError as error:
            raise ValueError(f"{error} — remove federation.aggregation") from None
        self.florist_options()
        return self

    def florist_options(self) -> FloristOptions:
        return FloristOptions(self.threshold, self.aggregation, self.streaming_tolerance)

    def rounds_of(self, client: int) -> list[int]:
        """The rounds client ``client`` is sampled in (`sample_clients`), all planned in advance."""
        return [t for t in range(1, self.rounds + 1)
                if client in sample_clients(self.num_clients, self.clients_per_round, self.seed, t)]

    def clients_sampled(self) -> int:
        """How many clients each round samples (`sample_clients` draws them)."""
        return sampled_count(self.num_clients, self.clients_per_round)

    @model_validator(mode="after")
    def _quorum_within_the_sample(self):
        sampled = self.clients_sampled()
        if self.min_clients > sampled:
            raise ValueError(f"min_clients = {self.min_clients} is more than the {sampled} clients sampled per round; "
                             "no round could reach it")
        return self


class EvaluationSection(Section):
    tasks: list[str] = Field(default_factory=lambda: ["mmlu"])
    num_fewshot: int = 0
    #: Examples per task: a count (1 or more) or a fraction in (0, 1); None: every example.
    limit: float | None = Field(None, gt=0)
    include_path: str | None = None
    #: A number, or lm-eval's "auto" (the largest batch that fits) / "auto:N" (re-detected N times).
    batch_size: int | str = 8
    #: Wrap every prompt in the tokenizer's chat template (for instruct bases).
    apply_chat_template: bool = False
    #: Keep every question's prompt, answer and score in the results file.
    log_samples: bool = False
    every_round: bool = False
    #: The 1,444-question MMLU subset (mmlu_test_1444.json) that the packaged tasks florist_mmlu and
    #: florist_mmlu_paper[_chat] read; where the Hub's cais/mmlu cannot be read, `mmlu` in tasks
    #: becomes florist_mmlu (MMLU by log-likelihood) on it.
    mmlu_file: str | None = None
    #: The paper protocol (SPEC §7) as well as tasks: its generative MMLU on the subset at this path
    #: (the chat-template variant with apply_chat_template); the subset also serves as mmlu_file.
    paper_mmlu_file: str | None = None

    @model_validator(mode="after")
    def _one_subset_file(self):
        if self.mmlu_file and self.paper_mmlu_file and Path(self.mmlu_file) != Path(self.paper_mmlu_file):
            raise ValueError(f"mmlu_file ({self.mmlu_file}) and paper_mmlu_file ({self.paper_mmlu_file}) name two "
                             "different files; both read the same 1,444-question subset, so name one")
        return self

    @field_validator("batch_size")
    @classmethod
    def _lm_eval_batch_size(cls, batch_size):
        if isinstance(batch_size, int):
            if batch_size < 1:
                raise ValueError("batch_size must be at least 1")
            return batch_size
        mode, _, count = batch_size.partition(":")
        if mode != "auto" or (count and not count.isdigit()):
            raise ValueError('batch_size must be a number, "auto" or "auto:N"')
        return batch_size


class PrivacySection(DPBudget):
    """Record-level differential privacy on every client: DP-SGD with Opacus (per-record gradient
    clipping, Gaussian noise, Poisson-sampled batches), accounted over every round a client takes
    part in. Aggregation is post-processing, so every method keeps the guarantee. ``target_epsilon``
    is each client's budget for the rounds it is planned to take part in; δ defaults to 1 / its records."""

    mode: Literal["dp_sgd"] = "dp_sgd"
    #: Every record's gradient is clipped to this L2 norm (over all the LoRA factors).
    max_grad_norm: float = Field(1.0, gt=0)
    accountant: Literal["prv", "rdp"] = "prv"


_CHECKPOINTING = "Opacus captures each layer's activations in the forward pass, which checkpointing runs twice"
#: TrainingArguments DP-SGD cannot keep, with the reason and the fix.
_DP_SGD_REFUSED = {
    "gradient_accumulation_steps": "Poisson sampling makes every batch one logical batch, which gradient accumulation would "
                                   "split — set per_device_train_batch_size to the expected batch size instead",
    "deepspeed": "DP-SGD clients train in one process (Opacus' per-record gradients do not reach DeepSpeed's partitions)",
    "gradient_checkpointing": _CHECKPOINTING,
    "activation_checkpointing": _CHECKPOINTING,  # transformers 5's name, gradient_checkpointing its deprecated alias
    "torch_compile": "Opacus' per-record gradient hooks do not survive compilation",
    "max_grad_norm": "under DP-SGD every record's gradient is clipped to privacy.max_grad_norm; remove training.max_grad_norm",
    "save_steps": "a DP-SGD client round restarts from its start after a stop (its sampling and noise are seeded, so it ends "
                  "the same); remove training.save_steps",
    "train_sampling_strategy": "DP-SGD draws every batch by Poisson sampling (each record with probability q), which its "
                               "accounting assumes; another sampler would break it",
}


def _refused_under_dp_sgd(key: str, value) -> bool:
    if key == "gradient_accumulation_steps":
        return value not in (None, 1)
    if key in ("gradient_checkpointing", "activation_checkpointing", "torch_compile"):
        return bool(value)
    if key == "train_sampling_strategy":
        return value not in (None, "random")
    return key in _DP_SGD_REFUSED and value is not None


class PublishSection(Section):
    """How the final global adapter is written (not part of the run's fingerprint: changing it
    republishes without training)."""

    #: florist, flora and fedex (whose published update sums every round): keep per module the smallest rank of the
    #: cumulative update whose energy reaches this τ (FLoRIST's rule on the whole federation's
    #: update), for a compact adapter after many rounds. None: the exact cumulative update.
    threshold: float | None = Field(None, gt=0, le=1)


class HubSection(Section):
    push: bool = False
    repo_id: str | None = None
    private: bool = False
    #: Upload the per-client records (sample counts, weights, names, local paths) too; off by
    #: default, since the participants' data sizes and machines are what must not leak.
    include_client_details: bool = False

    @model_validator(mode="after")
    def _repo_when_pushing(self):
        if self.push and not self.repo_id:
            raise ValueError("hub.push needs hub.repo_id")
        return self


class TrackingSection(Section):
    """One tracker run per federation (transformers' integrations: tensorboard, wandb, trackio,
    mlflow, ...): client training curves and per-round server metrics on one monotone step."""

    report_to: list[str] = Field(min_length=1)
    run_name: str | None = None
    #: TensorBoard's folder (default: <output_dir>/tracking).
    logging_dir: str | None = None
    #: The selected-rank heatmap and energy curves of every round, where the tracker takes images.
    log_images: bool = True


class ClientSection(Section):
    """How every client trains."""

    #: The registered trainer (`florist_hf.clients.registry`): "trainer" (transformers' Trainer on the
    #: instruction presets), "sft" (TRL's SFTTrainer, which also takes TRL's conversational and
    #: prompt/completion data) or "dpo" (TRL's DPOTrainer on preference pairs); the training section takes
    #: the fields of its arguments class.
    trainer: str = "trainer"

    @field_validator("trainer")
    @classmethod
    def _registered(cls, trainer):
        if trainer not in TRAINERS:
            raise ValueError(f"unknown trainer {trainer!r}; use one of {', '.join(TRAINERS)}")
        return trainer


class Recipe(Section):
    name: str = "federation"
    model: ModelSection
    data: DataSection
    lora: LoraSection = Field(default_factory=LoraSection)
    federation: FederationSection = Field(default_factory=FederationSection)
    client: ClientSection = Field(default_factory=ClientSection)
    #: Any field of the client trainer's arguments (``transformers.TrainingArguments``; TRL's
    #: ``SFTConfig`` under ``client.trainer: sft``), passed through to every client's Trainer.
    training: dict[str, Any] = Field(default_factory=dict)
    #: Per-client TrainingArguments overrides (clients on different hardware), by client index.
    client_training: dict[int, dict[str, Any]] = Field(default_factory=dict)
    #: Record-level DP-SGD on every client (None: none).
    privacy: PrivacySection | None = None
    evaluation: EvaluationSection | None = None
    publish: PublishSection = Field(default_factory=PublishSection)
    hub: HubSection | None = None
    tracking: TrackingSection | None = None
    output_dir: str = "runs/federation"

    @model_validator(mode="after")
    def _training_arguments_build(self):
        """training: and client_training: checked as the clients' trainer builds its arguments, once."""
        self.training = self._check_training(self.training, "training")
        self.client_training = {client: self._check_training(overrides, f"client_training.{client}")
                                for client, overrides in self.client_training.items()}
        return self

    def _check_training(self, training: dict, where: str) -> dict:
        """``training`` checked as the clients' trainer builds its arguments, with that trainer's defaults."""
        from florist_hf.clients.arguments import check_training

        kind = trainer_kind(self.client.trainer)
        return check_training(training, where=where, config_class=kind.config_class(),
                              trainer_defaults=kind.defaults(self.data, training))

    @model_validator(mode="after")
    def _trainer_takes_this_recipe(self):
        reason = trainer_kind(self.client.trainer).refusal(self)
        if reason is not None:
            raise ValueError(reason)
        return self

    @model_validator(mode="after")
    def _ranks_per_client(self):
        for key in ("ranks", "alphas"):
            value = getattr(self.lora, key)
            if isinstance(value, list) and len(value) != self.federation.num_clients:
                raise ValueError(
                    f"lora.{key} lists {len(value)} values for federation.num_clients = "
                    f"{self.federation.num_clients}; give one per client"
                )
        for client, overrides in self.client_training.items():
            if not 0 <= client < self.federation.num_clients:
                raise ValueError(f"client_training names client {client}, outside 0..{self.federation.num_clients - 1}")
            self._check_training({**self.training, **overrides}, f"client_training.{client}")  # the two together
        return self

    @model_validator(mode="after")
    def _continued_factors_reach_every_rank(self):
        if (self.federation.clients_sampled() < self.federation.num_clients and self.lora.mixed_ranks()
                and not METHODS[self.federation.method].merges_into_base):
            raise ValueError(
                f"{self.federation.method} continues the global factors at the largest rank of the round's clients, which a "
                "client of larger rank sampled later cannot continue; with federation.clients_per_round use one rank for "
                "every client, or a merge-style method (florist, flora)")
        return self

    @model_validator(mode="after")
    def _central_dp_covers_every_client(self):
        federation = self.federation
        if federation.central_dp is not None and METHODS[federation.method].central_dp_on == FACTOR_SUMS:
            reason = averaged_ranks_refusal([self.client_rank(k) for k in range(federation.num_clients)])
            if reason is not None:
                raise ValueError(reason)
        return self

    @model_validator(mode="after")
    def _method_takes_these_clients(self):
        federation = self.federation
        reason = METHODS[federation.method].refusal([self.client_rank(k) for k in range(federation.num_clients)],
                                                    federation.clients_sampled() == federation.num_clients)
        if reason is not None:
            raise ValueError(reason)
        return self

    @model_validator(mode="after")
    def _dp_sgd_keeps_its_guarantee(self):
        if self.privacy is None:
            return self
        sections = {"training": self.training, **{f"client_training.{k}": v for k, v in self.client_training.items()}}
        for where, training in sections.items():
            for key, value in training.items():
                if _refused_under_dp_sgd(key, value):
                    raise ValueError(f"{where}.{key} cannot be used with privacy.mode: dp_sgd: {_DP_SGD_REFUSED[key]}")
        return self

    @model_validator(mode="after")
    def _publish_threshold_on_a_cumulative_update(self):
        method = METHODS[self.federation.method]
        if self.publish.threshold is not None and not (method.merges_into_base or method.holds_residual):
            raise ValueError(f"publish.threshold truncates the cumulative update of florist, flora or fedex; {self.federation.method} "
                             "publishes its last round's factors as they are — remove publish.threshold")
        return self

    # --- derived settings -----------------------------------------------------------------------

    def client_rank(self, client: int) -> int:
        ranks = self.lora.ranks
        return ranks if isinstance(ranks, int) else ranks[client]

    def client_alpha(self, client: int) -> float:
        alphas = self.lora.alphas
        if alphas is None:
            return self.lora.alpha_multiplier * self.client_rank(client)
        return alphas if isinstance(alphas, (int, float)) else alphas[client]

    def as_given(self) -> dict:
        """The settings the recipe's author gave (its file's keys and the overrides; the defaults left out), in
        JSON types: what a Flower node or a later command validates again. A full dump would state every
        default as if given, and a setting refused only where given (``data.template`` for DPO clients) would
        then be refused there."""
        return self.model_dump(mode="json", exclude_unset=True)

    def record(self) -> dict:
        """What a run directory keeps of its recipe (``recipe.json``, beside the fingerprint): every setting as it
        ran (``recipe``), and the settings as given, which ``from_record`` reads back."""
        return {"recipe": self.model_dump(mode="json"), "as_given": self.as_given()}

    @classmethod
    def from_record(cls, stored: Mapping) -> "Recipe":
        """The recipe of a ``record`` (a record made before ``as_given`` existed: from its full dump)."""
        return cls.model_validate(stored["as_given"] if "as_given" in stored else stored["recipe"])

    def fingerprint(self) -> str:
        """A hash of everything that changes the result (not where it is written)."""
        return hashlib.sha256(json.dumps(self.fingerprinted(), sort_keys=True).encode()).hexdigest()[:16]

    def fingerprinted(self) -> dict:
        """The settings `fingerprint` hashes: everything that changes the result."""
        payload = self.model_dump(mode="json", exclude={"output_dir", "evaluation", "publish", "hub", "tracking"})
        if payload.get("privacy") is None:  # added later; a run without it keeps its fingerprint
            payload.pop("privacy", None)
        # Settings added after runs were recorded count only when set: at their defaults a run
        # directory made before they existed keeps its fingerprint (and resumes without --force).
        for section, defaults in LATER_DEFAULTS.items():
            for key, default in defaults.items():
                if payload[section].get(key) == default:
                    payload[section].pop(key)
        if not payload["client"]:  # added later; at its defaults a run keeps its fingerprint
            payload.pop("client")
        for section, keys in SPEED_ONLY.items():
            for key in keys:
                payload[section].pop(key, None)
        return payload


#: settings added after run directories were first recorded, with their defaults, by section.
LATER_DEFAULTS = {
    "federation": {"aggregation": "stacked", "streaming_tolerance": 0.0, "clip_update_norm": None, "central_dp": None,
                   "robust": None, "trim_fraction": 0.1, "secure_aggregation": None},
    "model": {"gguf_file": None},
    "client": {"trainer": "trainer"},
}
#: Settings that change how fast a result is reached, not the result (beyond float round-off):
#: they never count in a fingerprint, nor as a change to how clients train.
SPEED_ONLY = {"data": ("batching",), "model": ("attn_implementation",)}


def _set_dotted(tree: dict, dotted_key: str, value: Any, source: str) -> None:
    node = tree
    parts = dotted_key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise FloristError(f"{source}: --set {dotted_key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _yaml11_float(value: Any) -> Any:
    """YAML 1.1 reads ``5e-3`` (no dot) as a string; on the command line it means a number."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in "eE") and value.strip(" +-.0123456789eE") == "" else value
        except ValueError:
            return value
    return value


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply ``key.sub=value`` overrides (values parsed as YAML), validate."""
    path = Path(path)
    if not path.is_file():
        raise FloristError(f"{path}: recipe not found; see recipes/ for examples")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise FloristError(f"{path}: not valid YAML{where} ({getattr(error, 'problem', error)}); fix the syntax") from None
    if not isinstance(tree, dict):
        raise FloristError(f"{path}: a recipe is a YAML mapping with model, data, lora, federation, training sections")
    for override in overrides:
        key, sep, raw_value = override.partition("=")
        if not sep or not key:
            raise FloristError(f"--set {override!r}: expected key=value, e.g. --set federation.rounds=3")
        try:
            value = yaml.safe_load(raw_value)
        except yaml.YAMLError:
            value = raw_value
        value = _yaml11_float(value)
        _set_dotted(tree, key.strip(), value, str(path))
    try:
        return Recipe.model_validate(tree)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        setting = (first.get("ctx") or {}).get("error")
        if isinstance(setting, SettingError):  # a setting inside a free-form section (training.learning_rate)
            key = setting.key
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown key; check its spelling against the recipe schema"
        elif first["type"] == "missing":
            message = "required key is missing"
        else:
            message = message.removeprefix("Value error, ")
            message += f" (got {first.get('input')!r})" if first["type"] != "value_error" else ""
        raise FloristError(f"{path}: {key}: {message}") from None


# --- what a recipe means for the federation ------------------------------------------------------


def method_of(recipe):
    """The recipe's aggregation method with its options (the federation settings it declares)."""
    return method_from_settings(recipe.federation.method, dict(recipe.federation))


def client_training_view(recipe) -> dict:
    """Everything in a recipe that changes what a client trains, flattened to dotted keys.

    Left out: where and how results are written and evaluated, the server's aggregation settings
    (τ, min_clients, stacked or streaming), the settings of speed alone (`recipe.SPEED_ONLY`: the
    batch layout, the attention implementation), and the number of rounds unless the learning rate is scheduled over rounds.
    The method counts only by what it asks of clients: to train on the merged global updates or
    to continue the global factors, and whether lora_A is frozen.
    """
    payload = recipe.model_dump(mode="json", exclude={"name", "output_dir", "evaluation", "publish", "hub", "tracking"})
    for section, keys in SPEED_ONLY.items():
        for key in keys:
            payload[section].pop(key, None)
    federation = payload.pop("federation")
    method = method_of(recipe)
    federation["client_role"] = {"merges_into_base": method.merges_into_base, "freeze_lora_a": method.freezes_lora_a}
    for key in ("method", "threshold", "min_clients", "eval_heldout_loss", "aggregation", "streaming_tolerance",
                "clip_update_norm", "central_dp", "robust", "trim_fraction", "secure_aggregation"):
        federation.pop(key, None)
    # The rounds count where the learning rate or a DP-SGD client's noise (calibrated to its planned rounds) depends on it.
    if federation["round_lr_schedule"] == "constant" and not (recipe.privacy and recipe.privacy.target_epsilon is not None):
        federation.pop("rounds")
    if payload.get("privacy") is None:
        payload.pop("privacy", None)
    payload["federation"] = federation

    return _flattened(payload)


def _flattened(payload: dict) -> dict:
    """A nested recipe payload as ``{dotted.key: value}``."""
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = value

    walk("", payload)
    return flat


def client_training_changes(old, new) -> list[str]:
    """``key: old -> new`` for every difference between two recipes in how clients train."""
    return _changes(client_training_view(old), client_training_view(new))


def recipe_changes(old, new) -> list[str]:
    """``key: old -> new`` for every difference between two recipes that changes the result
    (what `Recipe.fingerprint` hashes)."""
    return _changes(_flattened(old.fingerprinted()), _flattened(new.fingerprinted()))


def _changes(before: dict, after: dict) -> list[str]:
    return [
        f"{key}: {json.dumps(before.get(key))} -> {json.dumps(after.get(key))}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]
