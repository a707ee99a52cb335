"""``florist-hf run``: the round engine driven in this process, which trains every client itself
(or in the processes of ``accelerate launch``, which train each client together)."""

from __future__ import annotations

from pathlib import Path


def run_federation(recipe, *, force: bool = False, console=None) -> Path:
    """Run (or resume) a whole federation; returns the run directory.

    Resuming is the same call: finished rounds (their global adapter exists), finished clients of
    the current round (their adapter exists) and a client's last checkpoint inside its round
    (``training.save_steps``) are reused, so a killed run continues where it stopped and ends with
    the same result as an uninterrupted one.
    """
    from florist_hf import distributed
    from florist_hf.clients.config import client_training, precision_lines
    from florist_hf.clients.run import freeze_long_lived_objects, reuses_base_model, run_client_round, prepare_shard
    from florist_hf.loading import BaseModelCache
    from florist_hf.data import prepare_client_data
    from florist_hf.engine import Federation
    from florist_hf.loading import load_model_config, load_tokenizer, resolve_base
    from florist_hf.tiny import TINY_LLAMA_ID

    # Under accelerate launch every process runs this; all of them train each client together,
    # the main one alone writes the run directory (see florist_hf.distributed).
    distributed.init_processes()
    freeze_long_lived_objects()  # before any model exists: cheap per-client collections
    main = distributed.is_main_process()
    model = recipe.model

    def base_tokenizer(base_path: str):
        # A base that cannot be loaded (offline, gated, misspelt) fails here in one line, before any
        # client starts: its config and tokenizer are a few KB.
        load_model_config(base_path, revision=model.revision, trust_remote_code=model.trust_remote_code)
        return load_tokenizer(base_path, revision=model.revision, trust_remote_code=model.trust_remote_code)

    # The base (unless it is the builtin one, built inside the run directory) and the data are read
    # first: a base or data source that cannot be read, an empty file or missing labels stop the run
    # in one line before its directory is made or touched.
    tokenizer = None
    if model.name_or_path != TINY_LLAMA_ID:
        with distributed.main_process_first():
            tokenizer = base_tokenizer(resolve_base(model.name_or_path, model.gguf_file, dtype=model.dtype,
                                                    revision=model.revision))
    shards, test_records = prepare_client_data(recipe)
    precision = precision_lines(recipe)  # what this machine's clients train in, and why
    if recipe.evaluation is not None:  # an evaluation that could not run is refused before any client trains
        from florist_hf.evaluation import recipe_evaluation_plan

        recipe_evaluation_plan(recipe.evaluation)
    federation = Federation(recipe, console=console, main=main)
    console, paths = federation.console, federation.paths
    try:
        with distributed.main_process_first():
            base_path = federation.open(force=force)
        if tokenizer is None:
            tokenizer = base_tokenizer(base_path)
        # Each client's shard, prepared once for all rounds; the first now, so that what the clients' trainer
        # cannot take (the data's format, a chat template) is refused before anything is trained.
        datasets: dict[int, object] = {0: prepare_shard(recipe, tokenizer, shards[0])}
        client_sizes = [len(shard) for shard in shards]
        console.print(federation.describe(client_sizes))
        for line in precision:
            console.print(f"  {line}")
        federation.ensure_initial_adapter()

        base_cache = BaseModelCache() if reuses_base_model(recipe) else None  # the base, loaded once
        for round_index in federation.round_indices:
            distributed.wait_for_everyone()  # what the main process wrote last round is complete
            with distributed.main_process_first():  # it sets aside what a --force change made stale
                round_plan = federation.plan_round(round_index, client_sizes)
            if round_plan.complete:
                console.print(f"round {round_index}: already complete, reused")
                # Stopped between the aggregation and the round's record: the record is rebuilt
                # below from the global adapter's sidecar, which was written with it.
                if federation.is_recorded(round_index):
                    continue
            else:
                console.print(f"[bold]round {round_index}/{recipe.federation.rounds}[/]: clients {round_plan.selected}")
                trained = []
                for plan in round_plan.clients:
                    if plan.export_dir.exists():
                        console.print(f"  client {plan.client_id}: already trained this round, reused")
                    else:
                        if plan.client_id not in datasets:
                            datasets[plan.client_id] = prepare_shard(recipe, tokenizer, shards[plan.client_id])
                        with distributed.client_model_loading(client_training(recipe, plan.client_id, round_index)):
                            run_client_round(
                                recipe, plan, base_path, tokenizer, datasets[plan.client_id],
                                paths.client_work_dir(round_index, plan.client_id), console,
                                base_cache=base_cache, is_main_process=main, secret_dir=paths.root,
                                callbacks=[federation.tracker.client_relay(plan.client_id, round_index)] if federation.tracker else [],
                            )
                    distributed.wait_for_everyone()  # the main process has exported the adapter
                    if federation.accept(plan):
                        trained.append(plan)
                federation.aggregate(round_plan, trained)
            heldout = None
            if recipe.federation.eval_heldout_loss and test_records:
                distributed.wait_for_everyone()  # the global adapter is on disk
                # Every process evaluates a share, with whole weights (see distributed.without_deepspeed).
                with distributed.without_deepspeed():
                    heldout = federation.heldout_loss(round_index, tokenizer, test_records, base_cache=base_cache)
            if main:
                federation.record_round(round_index, heldout)

        if base_cache is not None:
            base_cache.clear()  # lm-eval loads its own model
        if main:  # training is over; the main process publishes, evaluates and pushes alone
            federation.finish(client_sizes)
    finally:
        federation.close()  # the run directory is released however the run ends
    distributed.wait_for_everyone()
    return paths.root
