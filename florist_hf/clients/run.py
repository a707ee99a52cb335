"""One client's round: its LoRA model on the base, its registered trainer with the federated callback
(and DP-SGD under ``privacy``), trained from its last checkpoint if any, its adapter exported."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from florist_hf.clients.batching import client_batching, packs_one_row
from florist_hf.clients.callback import ClientRound, ConsoleProgressCallback, FederatedCallback
from florist_hf.clients.config import client_training, training_arguments
from florist_hf.clients.registry import trainer_kind
from florist_hf.errors import FloristError
from florist_hf.io_utils import atomic_directory
from florist_hf.loading import BaseModelCache, free_memory, load_base


def client_seed(base_seed: int, client_id: int, round_index: int) -> int:
    """Distinct, reproducible seed per client and round. Below 1,000 clients the original scheme
    (so that earlier runs reproduce); from client 1,000 on, one that cannot meet it or itself."""
    if client_id < 1000:
        return base_seed + 1000 * (round_index - 1) + client_id
    return base_seed + 10**12 + round_index * 10**7 + client_id


def build_lora_model(model_path: str, *, rank: int, alpha: float, target_modules, dropout: float,
                     use_rslora: bool, dtype: str = "float32", seed: int = 0, revision=None, trust_remote_code=False,
                     base_cache: BaseModelCache | None = None, quantization=None, attn_implementation=None):
    """The base model with a fresh PEFT LoRA at ``rank``; the LoRA init is seeded. With
    ``base_cache`` the base comes from it (loaded once); release it after the client. With
    ``quantization`` the base is loaded in 4 or 8 bit and prepared for QLoRA training."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = load_base(model_path, base_cache=base_cache, dtype=dtype, revision=revision,
                      trust_remote_code=trust_remote_code, quantization=quantization, attn_implementation=attn_implementation)
    if quantization is not None:
        # Norms and other float weights in fp32, base frozen; the Trainer does gradient checkpointing if asked.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=dropout,
        use_rslora=use_rslora,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def write_initial_adapter(recipe, base_path: str, out_dir: Path) -> Path:
    """Round 0's global adapter for continue-style methods, written atomically: one shared LoRA
    init at the largest client rank. Every client slices it to its own rank, so FedIT averages
    factors that started equal and FFA-LoRA's frozen A is the same on every client (SPEC §3)."""
    max_rank = max(recipe.client_rank(k) for k in range(recipe.federation.num_clients))
    model = build_lora_model(
        base_path, rank=max_rank, alpha=max_rank, target_modules=recipe.lora.target_modules,
        dropout=0.0, use_rslora=False, dtype=recipe.model.dtype, seed=recipe.federation.seed,
        revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code,
    )
    with atomic_directory(out_dir, overwrite=True) as staging:
        model.save_pretrained(staging)
    return out_dir


def build_client_trainer(model, tokenizer, train_dataset, *, training: dict, work_dir: Path, seed: int, callbacks=(),
                         batching: str = "padded", one_row: bool = False, privacy=None, noise_seed: int | None = None,
                         trainer: str = "trainer"):
    """The registered ``trainer``'s Trainer for one client round, its arguments built from ``training``
    (the merged settings, `config.client_training`), seeded; ``batching`` and ``one_row`` are the batch
    layout. With ``privacy`` (`dp_sgd.ClientPrivacy`) it trains with DP-SGD, its sampling and noise
    drawn from ``noise_seed``."""
    from transformers import PrinterCallback

    kind = trainer_kind(trainer)
    trainer_class, dp_options = kind.trainer_class(), {}
    if privacy is not None:
        from florist_hf.clients.dp_sgd import with_dp_sgd

        trainer_class, dp_options = with_dp_sgd(trainer_class), {"privacy": privacy, "seed": noise_seed}
    args = training_arguments(kind.config_class(), training, work_dir, seed)
    with kind.building():
        built = trainer_class(
            model=model,
            args=args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            callbacks=list(callbacks),
            **kind.trainer_options(tokenizer, batching, one_row),
            **dp_options,
        )
    built.remove_callback(PrinterCallback)
    return built


def freeze_long_lived_objects() -> None:
    """Move every object alive now (after a collection) out of the garbage collector's sight.

    Called once a process has imported its libraries and before it builds any model: torch,
    transformers, datasets and the rest hold millions of long-lived objects, and every full
    collection (ours after each client, the Trainer's at the start of each ``train``) would walk
    them all, about 0.3 s each in a test process. Frozen objects are still freed by reference
    counting; only cycles among them would stay, and they are the libraries' own module state.
    """
    import gc

    gc.collect()
    gc.freeze()


def last_complete_checkpoint(work_dir: Path) -> Path | None:
    """The newest ``checkpoint-<step>`` in a client's work dir that the Trainer finished writing.

    The Trainer writes ``trainer_state.json`` last, after the adapter, optimizer, scheduler and
    RNG states, so a checkpoint cut by a kill has none (or an unreadable one) and is skipped; that
    is why this is not transformers' ``get_last_checkpoint``, which takes the highest step as it is.
    """
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return None
    checkpoints = [path for path in work_dir.glob("checkpoint-*") if path.name.removeprefix("checkpoint-").isdigit()]
    for checkpoint in sorted(checkpoints, key=lambda path: int(path.name.removeprefix("checkpoint-")), reverse=True):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        return checkpoint
    return None


def prepare_shard(recipe, tokenizer, records):
    """A client's training records as its trainer's dataset (`kind.TrainerKind.dataset`). The same in
    every round, so the drivers prepare each shard once per process (a few seconds per round for a
    large shard)."""
    return trainer_kind(recipe.client.trainer).dataset(records, tokenizer, recipe)


def run_client_round(recipe, plan: ClientRound, base_path: str, tokenizer, dataset, work_dir: Path, console,
                     base_cache: BaseModelCache | None = None, *, is_main_process: bool = True, callbacks=(),
                     secret_dir: Path | None = None) -> dict:
    """Train one client for one round (its registered trainer + FederatedCallback) on ``dataset`` (see
    `prepare_shard`) and export its adapter to ``plan.export_dir``.

    ``work_dir`` is this client's own: with ``training.save_steps`` the Trainer checkpoints the
    round there, and a rerun after a stop resumes from the newest complete checkpoint
    (``resume_from_checkpoint``: LoRA factors, optimizer, scheduler, RNG and data position), so it
    ends where an uninterrupted round ends. The work dir is removed once the adapter is exported.
    With ``base_cache`` the base is loaded once for all clients and put back as loaded afterwards.
    Under ``privacy`` the client trains with DP-SGD, its noise drawn from the secret kept in
    ``secret_dir`` (the run directory, or a Flower node's work directory).
    """
    import shutil

    from florist_hf.clients.dp_sgd import client_privacy
    from florist_hf.privacy import derived_seed, secret_seed

    privacy = client_privacy(recipe, plan.client_id, plan.round, len(dataset))
    noise_seed = None
    if privacy is not None:
        if secret_dir is None:
            raise FloristError("a DP-SGD client needs the directory of its secret noise seed (secret_dir)")
        noise_seed = derived_seed(secret_seed(secret_dir), "dp-sgd", plan.client_id, plan.round)
    seed = client_seed(recipe.training.get("seed", recipe.federation.seed), plan.client_id, plan.round)
    model = build_lora_model(
        base_path, rank=plan.rank, alpha=recipe.client_alpha(plan.client_id), target_modules=recipe.lora.target_modules,
        dropout=recipe.lora.dropout, use_rslora=recipe.lora.use_rslora, dtype=recipe.model.dtype, seed=seed,
        revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code, base_cache=base_cache,
        quantization=recipe.model.quantization, attn_implementation=recipe.model.attn_implementation,
    )
    federated = FederatedCallback(plan, info=privacy.record() if privacy is not None else None)
    training = client_training(recipe, plan.client_id, plan.round)
    trainer = build_client_trainer(
        model, tokenizer, dataset, training=training, work_dir=work_dir, seed=seed,
        callbacks=[federated, ConsoleProgressCallback(console, f"round {plan.round} client {plan.client_id}"), *callbacks],
        batching=client_batching(recipe.data.batching, model, console, training, dp_sgd=privacy is not None),
        one_row=packs_one_row(model), privacy=privacy, noise_seed=noise_seed, trainer=recipe.client.trainer,
    )
    checkpoint = last_complete_checkpoint(work_dir)
    if checkpoint is not None:
        console.print(f"  client {plan.client_id}: resuming from {checkpoint.name}")
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    finally:
        if base_cache is not None:
            base_cache.release(model)
    metrics = dict(federated.metrics)
    del trainer, model, federated
    free_memory()
    if is_main_process:
        shutil.rmtree(work_dir, ignore_errors=True)  # the adapter is exported; its checkpoints are done with
    return metrics


def reuses_base_model(recipe) -> bool:
    """Whether a run keeps one base model for all its clients: in a single process without
    DeepSpeed or torch.compile (there the Trainer's engine owns or rewraps the model)."""
    from florist_hf import distributed

    training = [recipe.training, *recipe.client_training.values()]
    return (
        distributed.world_size() == 1
        and not distributed.launched_with_deepspeed()
        and not any(section.get("deepspeed") or section.get("torch_compile") for section in training)
    )
