"""Differential privacy: a client's DP-SGD round (Opacus on a stock Trainer), the accounting of
record-level and client-level budgets over the rounds of a federation, and the server's plan for a
round's bounding and noise (its math in `aggregation.bounding`).

Record level (``privacy.mode: dp_sgd``): every client trains with Opacus' per-record gradients on
its LoRA factors, each record's gradient clipped to ``max_grad_norm``, Gaussian noise of
``noise_multiplier · max_grad_norm`` added to their sum, batches drawn by Poisson sampling at rate
q = batch / N. One round is ``steps`` such steps; a client's ε after round t composes every round it
took part in (Opacus' accountant over ``steps × rounds`` steps at (σ, q)). With ``target_epsilon``
the noise is calibrated so that the rounds the client is planned to take part in spend exactly it.

Client level (``federation.central_dp``, fedit and ffa): one step per round at q = n/K (the clients
sampled of all), the Poisson-subsampled Gaussian's accountant as the usual approximation of fixed-size
sampling (as DP-FedAvg does).

The noise and the Poisson draws come from a secret seed kept in the run directory (or a Flower node's
own work directory), never from the recipe, so that nobody who reads the recipe can subtract the
noise; a resumed run reads the same secret and ends where an uninterrupted one ends.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Trainer

from florist_hf.data import IGNORE_INDEX
from florist_hf.errors import FloristError

#: The secret seed's file, in the run directory (never uploaded) or a Flower node's work directory.
SECRET_SEED_FILE = "privacy-seed"


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv") -> float:
    """ε of ``steps`` Poisson-subsampled Gaussian steps at (σ, q), by Opacus' accountant."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    return _epsilon(float(noise_multiplier), float(sample_rate), int(steps), float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    import warnings

    ledger = create_accountant(mechanism=accountant)
    ledger.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        # At a large ε the best RDP order is the largest tried: the bound is valid, only not the tightest.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(ledger.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=1024)
def calibrated_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest σ (to Opacus' search tolerance) whose ``steps`` steps at rate q spend at most ε."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant, epsilon_tolerance=0.01))
    except ValueError:
        raise FloristError(f"target_epsilon {target_epsilon} cannot be reached over {steps} steps at sampling rate "
                           f"{sample_rate:.4g} (σ would exceed 10⁶); raise the budget or train fewer steps") from None


@dataclass(frozen=True)
class ClientPrivacy:
    """One client's DP-SGD settings for one round and what its rounds spend."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    #: The client's records, N.
    num_samples: int
    #: DP-SGD steps in one round.
    steps: int
    delta: float
    accountant: str
    #: The rounds this client is planned to take part in, and those up to this one.
    rounds_planned: int
    rounds_so_far: int

    @property
    def expected_batch_size(self) -> float:
        """Opacus' expected batch q · N: the denominator of every step's gradient."""
        return self.sample_rate * self.num_samples

    @property
    def epsilon(self) -> float:
        """ε after this round: every round this client took part in, this one included."""
        return epsilon(self.noise_multiplier, self.sample_rate, self.steps * self.rounds_so_far, self.delta, self.accountant)

    @property
    def epsilon_round(self) -> float:
        """ε of this round alone."""
        return epsilon(self.noise_multiplier, self.sample_rate, self.steps, self.delta, self.accountant)

    @property
    def epsilon_planned(self) -> float:
        """ε after every round this client is planned to take part in."""
        return epsilon(self.noise_multiplier, self.sample_rate, self.steps * self.rounds_planned, self.delta, self.accountant)

    def record(self) -> dict:
        """The fields a client's line in metrics.jsonl carries."""
        return {"epsilon": self.epsilon, "epsilon_round": self.epsilon_round, "delta": self.delta,
                "privacy": {**asdict(self), "expected_batch_size": self.expected_batch_size,
                            "epsilon_planned": self.epsilon_planned, "level": "record"}}


def require_opacus() -> None:
    """One line when Opacus, which DP accounting and DP-SGD need, is not installed."""
    import importlib.util

    if importlib.util.find_spec("opacus") is None:
        raise FloristError("differential privacy needs Opacus: pip install 'florist-hf[dp]' (opacus 1.6)")


def round_steps(training: dict, sample_rate: float) -> int:
    """The optimizer steps of one DP-SGD round: ``max_steps``, or the epochs over 1/q Poisson batches
    each (the Trainer's own count for a loader of that length)."""
    max_steps = int(training.get("max_steps", training_default("max_steps")) or -1)
    if max_steps > 0:
        return max_steps
    batches = int(1 / sample_rate)  # Opacus' UniformWithReplacementSampler: 1/q batches an epoch
    return max(1, math.ceil(float(training.get("num_train_epochs", training_default("num_train_epochs"))) * batches))


def training_default(key: str):
    """A TrainingArguments field's default, as the Trainer would take it where the recipe is silent."""
    import dataclasses

    from transformers import TrainingArguments

    return next(field.default for field in dataclasses.fields(TrainingArguments) if field.name == key)


def client_privacy(recipe, client_id: int, round_index: int, num_samples: int) -> ClientPrivacy | None:
    """Client ``client_id``'s DP-SGD settings in round ``round_index`` on its ``num_samples`` records
    (None without ``privacy``). The noise is the recipe's, or calibrated to ``target_epsilon`` over
    the rounds the client is planned to take part in (the recipe's sampling, known in advance)."""
    from florist_hf.training_args import TRAINING_DEFAULTS
    from florist_hf.recipe import sample_clients

    privacy = recipe.privacy
    if privacy is None:
        return None
    require_opacus()
    if num_samples < 1:
        raise FloristError(f"client {client_id}: no training records; DP-SGD needs at least one")
    training = recipe.client_training_arguments(client_id, round_index, TRAINING_DEFAULTS["learning_rate"])
    batch = int(training.get("per_device_train_batch_size", training_default("per_device_train_batch_size")))
    sample_rate = min(1.0, batch / num_samples)
    steps = round_steps(training, sample_rate)
    federation = recipe.federation
    rounds = [t for t in range(1, federation.rounds + 1)
              if client_id in sample_clients(federation.num_clients, federation.clients_per_round, federation.seed, t)]
    rounds_so_far = sum(1 for t in rounds if t <= round_index)
    delta = privacy.delta if privacy.delta is not None else 1.0 / num_samples
    noise = privacy.noise_multiplier
    if noise is None:
        noise = calibrated_noise(privacy.target_epsilon, delta, sample_rate, steps * max(1, len(rounds)), privacy.accountant)
    return ClientPrivacy(noise_multiplier=noise, max_grad_norm=privacy.max_grad_norm, sample_rate=sample_rate,
                         num_samples=num_samples, steps=steps, delta=delta,
                         accountant=privacy.accountant, rounds_planned=len(rounds), rounds_so_far=max(1, rounds_so_far))


def central_delta(central_dp, num_clients: int) -> float:
    """δ of the client-level guarantee: the recipe's, else 1 / the clients."""
    return central_dp.delta if central_dp.delta is not None else 1.0 / num_clients


def central_epsilon(central_dp, noise_multiplier: float, sample_rate: float, rounds: int, num_clients: int) -> float:
    """Client-level ε of ``rounds`` rounds of DP-FedAvg at noise σ and client sampling rate q."""
    return epsilon(noise_multiplier, sample_rate, rounds, central_delta(central_dp, num_clients), central_dp.accountant)


def central_noise_multiplier(central_dp, sample_rate: float, rounds: int, num_clients: int) -> float:
    """The recipe's client-level σ, or the one calibrated to its target ε over ``rounds`` rounds."""
    if central_dp.noise_multiplier is not None:
        return central_dp.noise_multiplier
    return calibrated_noise(central_dp.target_epsilon, central_delta(central_dp, num_clients), sample_rate, rounds,
                            central_dp.accountant)


def secret_seed(directory: Path) -> bytes:
    """The secret the noise is drawn from, created once in ``directory`` (readable by its owner alone)."""
    directory = Path(directory)
    path = directory / SECRET_SEED_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f".{SECRET_SEED_FILE}.{os.getpid()}"
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(staging, path)  # the first writer's secret wins; a concurrent one reads it
    except FileExistsError:
        pass
    finally:
        staging.unlink()
    return bytes.fromhex(path.read_text().strip())


def derived_seed(secret: bytes, *parts) -> int:
    """A 63-bit generator seed for one use of the secret (a client's round, a server round, ...)."""
    digest = hashlib.sha256(secret + repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class _EmptyBatchCollator:
    """The Trainer's collator on a Poisson batch; an empty draw becomes one record whose labels are all
    masked, so that its gradient is exactly zero and the step adds noise alone, as DP-SGD requires."""

    def __init__(self, collator, dataset):
        self.collator, self.dataset = collator, dataset

    def __call__(self, records):
        if records:
            return self.collator(records)
        blank = dict(self.dataset[0])
        blank["labels"] = [IGNORE_INDEX] * len(blank["input_ids"])
        return self.collator([blank])


class DPSGDTrainer(Trainer):
    """A stock ``transformers.Trainer`` that trains with DP-SGD: Opacus' per-record gradients on the
    trainable (LoRA) parameters, its ``DPOptimizer`` around the Trainer's own optimizer, and
    Poisson-sampled batches. A subclass, not a callback, because the optimizer, the data loader and
    the loss are what change, and those are the Trainer's documented override points
    (``create_optimizer``, ``get_train_dataloader``, ``compute_loss``); everything else (the
    scheduler, logging, callbacks, the export by ``FederatedCallback``) is the Trainer's.

    The loss is each record's mean token loss, averaged over the batch: a record's gradient then
    depends on that record alone (a batch-wide token mean would tie it to the others' lengths).
    """

    def __init__(self, *args, privacy: ClientPrivacy, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        from opacus.grad_sample import GradSampleHooks

        if self.args.world_size > 1:
            raise FloristError("privacy.mode: dp_sgd trains each client in one process; launch it without accelerate/torchrun")
        self.privacy = privacy
        self._seed = seed
        self._grad_samples = GradSampleHooks(self.model, batch_first=True, loss_reduction="mean", strict=True)

    def get_train_dataloader(self):
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler
        from torch.utils.data import DataLoader

        dataset = self.train_dataset
        if len(dataset) != self.privacy.num_samples:
            raise FloristError(f"the client's dataset holds {len(dataset)} records, not the {self.privacy.num_samples} "
                               "its privacy was accounted for")
        sampler = UniformWithReplacementSampler(
            num_samples=len(dataset), sample_rate=self.privacy.sample_rate,
            generator=torch.Generator().manual_seed(self._seed),
        )
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=_EmptyBatchCollator(self.data_collator, dataset),
                          num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)

    def create_optimizer(self, model=None):
        from opacus.optimizers import DPOptimizer

        optimizer = super().create_optimizer(model)
        if not isinstance(optimizer, DPOptimizer):
            generator = torch.Generator(device=self.args.device).manual_seed(self._seed + 1)
            self.optimizer = _clearing_dp_optimizer()(
                optimizer, noise_multiplier=self.privacy.noise_multiplier, max_grad_norm=self.privacy.max_grad_norm,
                expected_batch_size=self.privacy.expected_batch_size, loss_reduction="mean", generator=generator,
            )
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits.float()
        # Labels shifted left (transformers' own way): the logits stay contiguous, with no copy of the largest tensor.
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).to(logits.device)
        token_losses = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1),
                                                         ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
        counted = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
        loss = (token_losses.sum(dim=1) / counted).mean()
        return (loss, outputs) if return_outputs else loss

    def train(self, *args, **kwargs):
        import warnings

        try:
            with warnings.catch_warnings():
                # Opacus' hook on lora_A reads the gradient of its output; its input (a frozen activation) has none, as expected.
                warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")
                output = super().train(*args, **kwargs)
        finally:
            self._grad_samples.cleanup()  # hooks and per-record gradients off the model (a cached base is reused)
        if self.state.global_step != self.privacy.steps:
            raise FloristError(f"the DP-SGD round took {self.state.global_step} steps, not the {self.privacy.steps} its privacy "
                               "was accounted for; report this as a bug")
        return output


@functools.cache
def _clearing_dp_optimizer():
    from opacus.optimizers import DPOptimizer

    class ClearingDPOptimizer(DPOptimizer):
        """Opacus' DPOptimizer whose step clears the per-record gradients it used: the Trainer clears
        gradients with ``model.zero_grad()``, which leaves Opacus' own."""

        def step(self, closure=None):
            try:
                return super().step(closure)
            finally:
                for parameter in self.params:
                    parameter.grad_sample = None
                    parameter.summed_grad = None

    return ClearingDPOptimizer


# --- the server's side: bounding and noise of a round, and what a run guarantees ------------------------


def update_bounding(federation, round_index: int, *, reference: Path | None, secret_dir: Path):
    """How the server bounds round ``round_index``'s client updates (``federation.clip_update_norm``)
    and, with ``central_dp``, noises their mean (`server.UpdateBounding`; None when it does not).
    ``reference``: the global the round's clients continued (continue-style methods)."""
    from florist_hf.server import UpdateBounding

    if federation.clip_update_norm is None:
        return None
    bounding = UpdateBounding(clip=federation.clip_update_norm, reference=reference)
    central = federation.central_dp
    if central is not None:
        require_opacus()
        sampled = federation.clients_sampled()
        rate = sampled / federation.num_clients
        noise = central_noise_multiplier(central, rate, federation.rounds, federation.num_clients)
        bounding.noise_multiplier, bounding.denominator = noise, sampled
        bounding.noise_seed = derived_seed(secret_seed(secret_dir), "central-dp", round_index)
        bounding.accounting = {
            "sample_rate": rate, "rounds": round_index, "accountant": central.accountant, "level": "client",
            "delta": central_delta(central, federation.num_clients),
            "epsilon": central_epsilon(central, noise, rate, round_index, federation.num_clients),
            "epsilon_planned": central_epsilon(central, noise, rate, federation.rounds, federation.num_clients),
        }
    return bounding


def privacy_summary(recipe, metrics: list[dict], rounds_done, last_sidecar: dict | None) -> dict | None:
    """What a run guarantees and bounds (run.json, the model card): each client's record-level
    (ε, δ) after its last round, the client-level ε of central DP, the update bound, the robust rule."""
    federation = recipe.federation
    summary: dict = {}
    if recipe.privacy is not None:
        last: dict = {}
        for record in metrics:
            if record.get("kind") == "client" and "epsilon" in record and record.get("round") in rounds_done:
                last[record["client"]] = record
        if last:
            summary["record_level"] = {
                "mechanism": "DP-SGD (Opacus)", "accountant": recipe.privacy.accountant,
                "max_grad_norm": recipe.privacy.max_grad_norm,
                "epsilon_max": max(record["epsilon"] for record in last.values()),
                "delta_max": max(record["delta"] for record in last.values()),
                "per_client": {str(client): {"epsilon": record["epsilon"], "delta": record["delta"]}
                               for client, record in sorted(last.items())},
            }
    if federation.clip_update_norm is not None:
        summary["clip_update_norm"] = federation.clip_update_norm
    if federation.central_dp is not None and last_sidecar is not None:
        central = (last_sidecar.get("bounding") or {}).get("central_dp", {})
        summary["client_level"] = {"mechanism": "DP-FedAvg (Gaussian noise on the clipped mean)",
                                   **{key: central.get(key) for key in ("epsilon", "delta", "noise_multiplier", "sample_rate",
                                                                        "accountant", "rounds")}}
    if federation.robust is not None:
        summary["robust"] = federation.robust
    return summary or None
