"""DP-SGD on a client, whatever its Trainer: Opacus' per-record gradients, clipping and noise on the
trainable (LoRA) factors and Poisson-sampled batches (`DPSGD`, mixed into any registered trainer's
class), and the settings of one client's round (`client_privacy`), accounted by `florist_hf.privacy`.

Record level (``privacy.mode: dp_sgd``): every record's gradient is clipped to ``max_grad_norm``,
Gaussian noise of ``noise_multiplier · max_grad_norm`` added to their sum, batches drawn by Poisson
sampling at rate q = batch / N. One round is ``steps`` such steps; a client's ε after round t composes
every round it took part in. With ``target_epsilon`` the noise is calibrated so that the rounds the
client is planned to take part in spend exactly it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch

from florist_hf.clients.config import training_default
from florist_hf.data import IGNORE_INDEX
from florist_hf.errors import FloristError
from florist_hf.privacy import calibrated_noise, epsilon, require_opacus


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


def round_steps(training: dict, sample_rate: float) -> int:
    """The optimizer steps of one DP-SGD round: ``max_steps``, or the epochs over 1/q Poisson batches
    each (the Trainer's own count for a loader of that length)."""
    max_steps = int(training.get("max_steps", training_default("max_steps")) or -1)
    if max_steps > 0:
        return max_steps
    batches = int(1 / sample_rate)  # Opacus' UniformWithReplacementSampler: 1/q batches an epoch
    return max(1, math.ceil(float(training.get("num_train_epochs", training_default("num_train_epochs"))) * batches))


def client_privacy(recipe, client_id: int, round_index: int, num_samples: int) -> ClientPrivacy | None:
    """Client ``client_id``'s DP-SGD settings in round ``round_index`` on its ``num_samples`` records
    (None without ``privacy``). The noise is the recipe's, or calibrated to ``target_epsilon`` over
    the rounds the client is planned to take part in (the recipe's sampling, known in advance)."""
    from florist_hf.clients.config import client_training

    privacy = recipe.privacy
    if privacy is None:
        return None
    require_opacus()
    if num_samples < 1:
        raise FloristError(f"client {client_id}: no training records; DP-SGD needs at least one")
    training = client_training(recipe, client_id, round_index)
    batch = int(training.get("per_device_train_batch_size", training_default("per_device_train_batch_size")))
    sample_rate = min(1.0, batch / num_samples)
    steps = round_steps(training, sample_rate)
    federation = recipe.federation
    rounds = federation.rounds_of(client_id)
    rounds_so_far = sum(1 for t in rounds if t <= round_index)
    delta = privacy.delta if privacy.delta is not None else 1.0 / num_samples
    noise = privacy.noise_multiplier
    if noise is None:
        noise = calibrated_noise(privacy.target_epsilon, delta, sample_rate, steps * max(1, len(rounds)), privacy.accountant)
    return ClientPrivacy(noise_multiplier=noise, max_grad_norm=privacy.max_grad_norm, sample_rate=sample_rate,
                         num_samples=num_samples, steps=steps, delta=delta,
                         accountant=privacy.accountant, rounds_planned=len(rounds), rounds_so_far=max(1, rounds_so_far))


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


class DPSGD:
    """DP-SGD for a ``transformers.Trainer`` subclass (the stock Trainer, TRL's SFTTrainer, ...): mixed
    in before it (`with_dp_sgd`), it trains with Opacus' per-record gradients on the trainable (LoRA)
    parameters, its ``DPOptimizer`` around the Trainer's own optimizer, and Poisson-sampled batches.
    A mixin, not a callback, because the optimizer, the data loader and the loss are what change,
    and those are the Trainer's documented override points (``create_optimizer``,
    ``get_train_dataloader``, ``compute_loss``); everything else (the scheduler, logging, callbacks,
    the export by ``FederatedCallback``) is the Trainer's.

    The loss is each record's mean token loss, averaged over the batch: a record's gradient then
    depends on that record alone (a batch-wide token mean would tie it to the others' lengths).
    It is computed here from the model's logits, so a trainer's own loss (TRL's fused LM head) is
    not used under DP-SGD.
    """

    def __init__(self, *args, privacy: ClientPrivacy, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        from opacus.grad_sample import GradSampleHooks

        if self.args.world_size > 1:
            raise FloristError("privacy.mode: dp_sgd trains each client in one process; launch it without accelerate/torchrun")
        self.privacy = privacy
        self._seed = seed
        # Every record's gradient is clipped by DP-SGD; the Trainer's clip of the batch's would be spent work.
        self.args.max_grad_norm = 0.0
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
        logits = outputs.logits.to(torch.promote_types(outputs.logits.dtype, torch.float32))  # fp32, or fp64 kept
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
def with_dp_sgd(trainer_class: type) -> type:
    """``trainer_class`` training with DP-SGD: `DPSGD` mixed in before it (one class per trainer class);
    its constructor takes ``privacy`` (`ClientPrivacy`) and ``seed`` besides the trainer's own arguments."""
    return type(f"DPSGD{trainer_class.__name__}", (DPSGD, trainer_class), {"__module__": __name__})


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
