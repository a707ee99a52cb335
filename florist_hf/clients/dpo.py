"""TRL's ``DPOTrainer`` client: preference pairs in TRL's formats (``prompt``/``chosen``/``rejected`` as texts or
conversations, or ``chosen``/``rejected`` alone sharing their prompt), trained against a reference policy that
``training.reference_policy`` names: the model the client starts the round from (``round_start``, the default:
the base plus the round's global model), or the base alone (``base``); ``training:`` takes every DPOConfig field.

The reference is TRL's own for a PEFT policy: a frozen ``ref`` adapter beside the trained one, active during the
reference forward. It is set once the round's global model is installed (`FederatedCallback`): a copy of the
client's starting factors (``round_start``: the global factors a FedIT/FFA/FlexLoRA/FedSVD/FedEx client continues,
a fresh zero update for FLoRIST/FLoRA), or a zero update (``base``); a merge-style method's global state, held beside
the base layers (`global_state.attach_global_state`), stays in the reference forward under ``round_start`` and is
left out of it under ``base``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch

from florist_hf.clients.fused_head import tune_fused_lm_head_for_cpu
from florist_hf.clients.kind import TrainerKind, quiet_datasets
from florist_hf.errors import FloristError

#: The adapter TRL keeps as the reference of a PEFT policy, and the one the client trains.
REFERENCE_ADAPTER, TRAINED_ADAPTER = "ref", "default"
REFERENCE_POLICIES = ("round_start", "base")


class DPO(TrainerKind):
    name = "dpo"
    safe_keys = frozenset({"beta", "disable_dropout", "discopop_tau", "f_alpha_divergence_coef", "f_divergence_type",
                           "label_smoothing", "ld_alpha", "loss_type", "loss_weights", "max_length", "pad_to_multiple_of",
                           "pad_token", "padding_free", "reference_policy", "router_aux_loss_coef", "truncation_mode",
                           "use_weighting"})

    def trainer_class(self) -> type:
        tune_fused_lm_head_for_cpu()
        return federated_dpo_trainer()

    def config_class(self) -> type:
        return dpo_config()

    def defaults(self, data, training) -> dict:
        # DPOConfig's defaults that differ from TrainingArguments' are put back as the other trainers have them (bf16
        # on where the device has it, activation checkpointing on); the recipe's training section sets any of them.
        defaults = {"max_length": data.cutoff_len, "bf16": False}
        if not {"activation_checkpointing", "gradient_checkpointing"} & set(training):
            defaults["activation_checkpointing"] = False
        return defaults

    def refusal(self, recipe) -> str | None:
        data, sections = recipe.data, [recipe.training, *recipe.client_training.values()]
        if recipe.privacy is not None:
            return ("privacy (DP-SGD) cannot train client.trainer: dpo: DP-SGD clips and noises each row's gradient, and a "
                    "DPO loss is one per pair of rows (chosen and rejected) against the reference's; remove privacy")
        if "train_on_inputs" in data.model_fields_set and data.train_on_inputs:
            return ("data.train_on_inputs does not apply to client.trainer: dpo: DPO scores the chosen and rejected "
                    "completions alone, never the prompt; remove it")
        if "template" in data.model_fields_set:
            return ("data.template renders instruction records and does not apply to client.trainer: dpo: preference "
                    "pairs are trained as written (conversations through the tokenizer's chat template); remove it")
        if any(section.get("precompute_ref_log_probs") for section in sections):
            return ("training.precompute_ref_log_probs cannot be used with client.trainer: dpo: the reference is the "
                    "round's starting model, installed after TRL would precompute it; remove it")
        if any(section.get("sync_ref_model") for section in sections):
            return ("training.sync_ref_model cannot be used with client.trainer: dpo: the reference of a LoRA client is its "
                    "frozen reference adapter, which TRL does not sync; remove it (training.reference_policy chooses it)")
        if data.holdout_per_label and recipe.federation.eval_heldout_loss:
            return ("federation.eval_heldout_loss scores the answers of instruction records, not preference pairs; with "
                    "client.trainer: dpo set federation.eval_heldout_loss: false or data.holdout_per_label: 0")
        return None

    def dataset(self, records, tokenizer, recipe):
        import datasets

        from florist_hf.data import record_format

        data, found = recipe.data, record_format(records)
        if found != "preference":
            said = "instruction records" if found == "instruction" else f"{found} records"
            raise FloristError(f"{data.source}: client.trainer: dpo trains on preference pairs (TRL's chosen and rejected "
                               f"columns, with or without a prompt); these are {said}: use client.trainer: sft")
        with_prompt = {"prompt" in record for record in records}
        if len(with_prompt) > 1:
            raise FloristError(f"{data.source}: some pairs have a prompt and some do not; give every pair its prompt, or none "
                               "(then chosen and rejected each hold it: TRL's implicit-prompt form)")
        rows = [{key: record[key] for key in ("prompt", "chosen", "rejected") if key in record} for record in records]
        if isinstance(rows[0]["chosen"], list) and not getattr(tokenizer, "chat_template", None):
            raise FloristError(f"{data.source}: conversations are rendered by the tokenizer's chat template, and "
                               f"{tokenizer.name_or_path!r} has none; use an instruct base, or pairs of texts")
        return datasets.Dataset.from_list(rows)

    def building(self):
        return quiet_datasets()


@functools.cache
def dpo_config() -> type:
    """TRL's DPOConfig with the client's ``reference_policy``."""
    import trl

    @dataclass
    class DPOConfig(trl.DPOConfig):
        """TRL's DPOConfig, and which policy a florist-hf DPO client's reference is."""

        reference_policy: Literal["round_start", "base"] = field(
            default="round_start",
            metadata={"help": "The reference of DPO's loss: the model the client starts the round from (the base plus the "
                              "round's global model), or the base alone."},
        )

    return DPOConfig


@functools.cache
def federated_dpo_trainer() -> type:
    """TRL's DPOTrainer whose reference is the ``reference_policy`` of its arguments (`hold_reference`)."""
    from trl import DPOTrainer

    class FederatedDPOTrainer(DPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)  # the FederatedCallback installs the round's global model at its end
            if len(self.train_dataset) == 0:  # TRL drops a pair whose prompt alone fills max_length
                raise FloristError(f"every preference pair's prompt fills training.max_length ({self.args.max_length} tokens, "
                                   "data.cutoff_len unless set), so nothing is left to train on; raise data.cutoff_len")
            self.reference = hold_reference(self.accelerator.unwrap_model(self.model), self.args.reference_policy)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            try:
                return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            finally:
                self.reference.refreeze()

    return FederatedDPOTrainer


class Reference:
    """A DPO client's reference on its own PEFT model: the ``ref`` adapter's factors, and whether a held global
    state is in the reference forward. PEFT marks every factor of the adapter it activates trainable, so the
    factors that the round keeps frozen (FFA-LoRA's and FedSVD's A) are frozen again after each loss."""

    def __init__(self, model, policy: str):
        from florist_hf.global_state import held_layers

        self.model, self.policy = model, policy
        self.held = held_layers(model)
        self.frozen = [param for name, param in model.named_parameters()
                       if f".{TRAINED_ADAPTER}." in name and not param.requires_grad]
        self.handles = [model.register_forward_pre_hook(self._before), model.register_forward_hook(self._after)]

    def _before(self, module, args):
        from florist_hf.global_state import apply_global_state

        if self.policy == "base" and self.model.active_adapter == REFERENCE_ADAPTER:
            apply_global_state(self.held, False)

    def _after(self, module, args, output):
        from florist_hf.global_state import apply_global_state

        apply_global_state(self.held, True)  # before any backward (activation checkpointing reruns the policy's forward)

    def refreeze(self) -> None:
        for param in self.frozen:
            param.requires_grad_(False)


@torch.no_grad()
def hold_reference(model, policy: str) -> Reference:
    """Set the ``ref`` adapter TRL added beside a PEFT policy to ``policy``'s reference: the client's starting
    factors (``round_start``) or a zero update (``base``, whose reference forward also leaves a held global state
    out); call it once the round's global model is installed."""
    from florist_hf.distributed import gathered_parameters
    from florist_hf.global_state import lora_layers

    if policy not in REFERENCE_POLICIES:
        raise FloristError(f"training.reference_policy: {policy!r}; use one of {', '.join(REFERENCE_POLICIES)}")
    if REFERENCE_ADAPTER not in getattr(model, "peft_config", {}):
        raise FloristError("a DPO client's policy is a PEFT LoRA model with TRL's reference adapter; TRL added none "
                           "(peft >= 0.20 adds it beside every LoRA)")
    for layer in lora_layers(model).values():
        for factors in (layer.lora_A, layer.lora_B):
            trained, reference = factors[TRAINED_ADAPTER].weight, factors[REFERENCE_ADAPTER].weight
            with gathered_parameters([trained, reference], modifier_rank=0):
                if policy == "round_start":
                    reference.copy_(trained)
                elif factors is layer.lora_B:
                    reference.zero_()
    return Reference(model, policy)


KIND = DPO()
