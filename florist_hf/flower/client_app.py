"""The Flower ClientApp: one florist-hf client (the same Trainer + FederatedCallback as ``florist-hf run``).

Each train message carries the recipe, this client's round plan and what the node lacks of the
global state; the client brings its kept global state up to date (`update_global_state`), runs
``run_client_round`` exactly as the in-process round loop does, and replies with its adapter's tensors (PEFT key names) plus its
rank, alpha, scale and sample count. Under secure aggregation it replies with its adapter's layout
only, keeps the adapter, and answers the round's secure-sum stages (``query.florist_secagg``,
`flower.secure`) from it.

Node config (``flower-supernode --node-config "..."``):
    partition-id    this node's client index k (required in deployment; set by the simulation)
    num-partitions  optional, checked against the recipe's federation.num_clients
    work-dir        optional, where the client keeps its base model, its global state
                    and working files (default: <system temp>/florist-hf-flower)
    data-file       optional, a local .json/.jsonl file with this client's own records; without
                    it the client takes shard k of the recipe's data section
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from florist_hf.errors import FloristError
from florist_hf.flower import protocol

# The training side's imports (torch, transformers, the recipe) are made where a train or hello message needs
# them: a ClientApp process serves one message, and a secure sum's key, share and unmask stages need none of it.

#: Per-process caches (a simulation worker or a long-lived process serves many rounds).
_RECORDS_CACHE: dict[tuple, list[dict]] = {}
_TOKENIZER_CACHE: dict[tuple, object] = {}
_DATASET_CACHE: dict[tuple, object] = {}
_BASE_CACHE = None  # a loading.BaseModelCache, made on first use (the base stays loaded between rounds)
_PRECISION_SAID: set[str] = set()  # the node's precision lines already printed (once per process)


def _recipe(config: ConfigRecord):
    text = config.get("recipe")
    if not isinstance(text, str):
        raise FloristError("the server's message carries no recipe")
    return _recipe_of(text)


def _recipe_of(text: str):
    from florist_hf.recipe import Recipe

    return Recipe.model_validate_json(text)


def _work_root(context: Context, default: str | Path | None, client_id: int) -> Path:
    base = context.node_config.get(protocol.WORK_DIR) or default or Path(tempfile.gettempdir()) / "florist-hf-flower"
    root = Path(str(base)).expanduser() / f"run_{context.run_id}" / f"client_{client_id}"
    root.mkdir(parents=True, exist_ok=True)
    return root


def client_records(recipe, context: Context, client_id: int) -> list[dict]:
    """This client's training records: its own ``data-file``, else shard k of the recipe's data."""
    data_file = context.node_config.get(protocol.DATA_FILE)
    key = (recipe.fingerprint(), str(data_file), client_id)
    if key not in _RECORDS_CACHE:
        if data_file:
            from florist_hf.data import client_sample_seed, load_records, sample_records

            records = load_records(str(data_file), format=recipe.data.format, fields=recipe.data.fields)
            records = sample_records(
                records, recipe.data.max_samples_per_client, client_sample_seed(recipe.data.seed, client_id)
            )
        else:
            from florist_hf.data import client_shard

            records = client_shard(recipe, client_id)
        _RECORDS_CACHE[key] = records
    return _RECORDS_CACHE[key]


def _tokenizer(base_path: str, revision):
    key = (base_path, revision)
    if key not in _TOKENIZER_CACHE:
        from florist_hf.loading import load_tokenizer

        _TOKENIZER_CACHE[key] = load_tokenizer(base_path, revision=revision)
    return _TOKENIZER_CACHE[key]


def hello(message: Message, context: Context) -> Message:
    """Tell the server which client this node is and how many examples it holds."""
    from florist_hf.flower.policy import check_request, load_policy

    recipe = _recipe(message.content[protocol.CONFIG])
    client_id = protocol.client_id_of(context, recipe.federation.num_clients)
    policy, source = load_policy(context.node_config)
    try:  # before the server's data source is read
        check_request(policy, source, recipe, client_id, own_data=bool(context.node_config.get(protocol.DATA_FILE)))
    except FloristError as refusal:
        # Still say which client this node is: its train messages are refused (and left out) the same way.
        return Message(RecordDict({protocol.CONFIG: ConfigRecord(
            {"client-id": client_id, "num-samples": 0, "refused": str(refusal)})}), reply_to=message)
    records = client_records(recipe, context, client_id)
    if not records:
        raise FloristError(f"client {client_id} has no training records")
    return Message(
        RecordDict({protocol.CONFIG: ConfigRecord({"client-id": client_id, "num-samples": len(records)})}),
        reply_to=message,
    )


def _materialise(message: Message, record_key: str, out_dir: Path) -> None:
    from florist_hf.flower.records import write_adapter_records

    content = message.content
    write_adapter_records(
        out_dir, content.array_records[record_key], content.config_records[protocol.config_key(record_key)],
        source=f"server message ({record_key})",
    )


def update_global_state(message: Message, state_dir: Path, client_id: int) -> Path | None:
    """Bring this node's global state (kept in ``state_dir`` between rounds) up to the rounds the
    server's message names, from what the message carries of it (see `protocol`); returns the
    directory, or None before any round is done. A node that lacks what the message assumes (its
    work dir was reset) raises `protocol.MISSING_GLOBAL`, and the server sends the whole state."""
    from florist_hf.adapters import read_adapter
    from florist_hf.global_state import fold, fold_state, read_global_state, read_state_record, write_global_state
    from florist_hf.flower.records import records_to_state

    content = message.content
    request = protocol.TrainRequest.from_config(content[protocol.CONFIG])
    merge_rounds, sent, form = request.merge_rounds, request.sent_rounds, request.sent_form
    if not merge_rounds:
        return None
    record = read_state_record(state_dir)
    held = list(record["rounds"]) if record is not None else []
    base = sorted(set(merge_rounds) - set(sent))  # the rounds what is sent goes on top of
    if form in content.array_records and form == protocol.GLOBAL_STATE:
        state = records_to_state(content.array_records[form], content.config_records[protocol.config_key(form)],
                                 source="server message (global state)")
        write_global_state(state, state_dir)
    elif form in content.array_records and (held == base or not base):
        # What is sent goes on top of the rounds it assumes held; sent everything (a new or
        # restarted server), the node starts afresh, whatever it kept.
        state = read_global_state(state_dir) if base else None
        if form == protocol.GLOBAL_UPDATE:
            update_dir = state_dir.parent / f"round_{sent[0]}"
            _materialise(message, form, update_dir)
            state = fold(state, [read_adapter(update_dir)], sent)
            shutil.rmtree(update_dir, ignore_errors=True)
        else:
            catch_up = records_to_state(content.array_records[form], content.config_records[protocol.config_key(form)],
                                        source="server message (catch-up)")
            state = catch_up if state is None else fold_state(state, catch_up)
        write_global_state(state, state_dir)
    record = read_state_record(state_dir)
    if record is None or list(record["rounds"]) != merge_rounds:
        missing = sorted(set(merge_rounds) - set(record["rounds"] if record else []))
        raise FloristError(f"client {client_id}: {protocol.MISSING_GLOBAL} {missing[0] if missing else merge_rounds[-1]} "
                           f"(its work dir {state_dir.parent.parent} was reset)")
    return state_dir


def train_client(message: Message, context: Context, work_dir: str | Path | None = None, console=None) -> Message:
    """Run one client round for a ``train`` message and reply with the trained adapter."""
    from rich.console import Console

    from florist_hf.adapters import peft_scale
    from florist_hf.clients.callback import ClientRound, read_client_info
    from florist_hf.clients.config import precision_of
    from florist_hf.clients.dp_sgd import client_privacy
    from florist_hf.clients.run import run_client_round, prepare_shard
    from florist_hf.flower.policy import check_privacy, check_request, load_policy
    from florist_hf.flower.records import adapter_to_records, layout_to_config
    from florist_hf.loading import prepare_base_model

    console = console or Console(stderr=True)
    request = protocol.TrainRequest.from_config(message.content[protocol.CONFIG])
    recipe = _recipe_of(request.recipe_json)
    client_id = protocol.client_id_of(context, recipe.federation.num_clients)
    # The node operator's policy, before anything is loaded, downloaded or written.
    policy, source = load_policy(context.node_config)
    check_request(policy, source, recipe, client_id, own_data=bool(context.node_config.get(protocol.DATA_FILE)))
    if request.client_id != client_id:
        raise FloristError(f"the server addressed client {request.client_id} but this node is client {client_id}")
    round_index = request.round
    root = _work_root(context, work_dir, client_id)

    state_dir = update_global_state(message, root / "globals" / "state", client_id)
    init_dir = None
    if request.init_round is not None:
        init_dir = root / "init" / f"round_{round_index}"
        _materialise(message, protocol.INIT, init_dir)

    records = client_records(recipe, context, client_id)
    # Its own accounting on its own records, before the base is loaded.
    check_privacy(policy, source, client_privacy(recipe, client_id, round_index, len(records)))
    base_path = prepare_base_model(recipe, root)
    tokenizer = _tokenizer(base_path, recipe.model.revision)
    plan = ClientRound(
        client_id=client_id,
        round=round_index,
        rank=request.rank,
        num_samples=len(records),
        export_dir=root / "rounds" / str(round_index) / "export",
        global_state=state_dir,
        init_adapter=init_dir,
        freeze_lora_a=request.freeze_lora_a,
    )
    dataset_key = (recipe.fingerprint(), str(context.node_config.get(protocol.DATA_FILE)), client_id, base_path)
    if dataset_key not in _DATASET_CACHE:
        _DATASET_CACHE[dataset_key] = prepare_shard(recipe, tokenizer, records)
    precision = precision_of(recipe, client_id).line  # this node's hardware decides, unless the recipe does
    if precision not in _PRECISION_SAID:
        _PRECISION_SAID.add(precision)
        console.print(f"client {client_id} trains in {precision}")
    global _BASE_CACHE
    if _BASE_CACHE is None:
        from florist_hf.loading import BaseModelCache

        _BASE_CACHE = BaseModelCache()
    # Its own work dir: with training.save_steps a node restarted mid-round resumes the round from
    # its last checkpoint when the server sends it again.
    work = plan.export_dir.parent / "work"
    run_client_round(recipe, plan, base_path, tokenizer, _DATASET_CACHE[dataset_key], work, console, base_cache=_BASE_CACHE,
                     secret_dir=root)

    secure = recipe.federation.secure() is not None
    if secure:  # the adapter stays here, for the round's secure sums; the server learns its layout only
        arrays, adapter_config = None, layout_to_config(plan.export_dir)
    else:
        arrays, adapter_config = adapter_to_records(plan.export_dir)
    info = read_client_info(plan.export_dir)
    alpha = float(recipe.client_alpha(client_id))
    scale = peft_scale(alpha, plan.rank, recipe.lora.use_rslora)
    reply_config = ConfigRecord(
        {
            **adapter_config,
            "client-id": client_id,
            "round": round_index,
            "rank": plan.rank,
            "alpha": alpha,
            "scale": scale,
            "client-info": json.dumps(info),
        }
    )
    metrics = {"num-examples": plan.num_samples, "finite": int(bool(info.get("finite", True)))}
    for key, metric in (("loss", "loss"), ("steps", "steps"), ("train_seconds", "train-seconds")):
        value = info.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            metrics[metric] = value
    if secure:  # the adapter and the global it continued wait for the round's secure sums
        shutil.rmtree(work, ignore_errors=True)
        for earlier, kept in kept_rounds(root).items():  # those of rounds whose sums are done
            if earlier < round_index:
                for path in kept:
                    shutil.rmtree(path, ignore_errors=True)
    else:
        shutil.rmtree(plan.export_dir.parent, ignore_errors=True)
        if init_dir is not None:
            shutil.rmtree(init_dir, ignore_errors=True)
    content = RecordDict({protocol.CONFIG: reply_config, protocol.METRICS: MetricRecord(metrics)})
    if arrays is not None:
        content[protocol.ADAPTER] = arrays
    return Message(content, reply_to=message)


def secure_stage(message: Message, context: Context, work_dir: str | Path | None = None) -> Message:
    """One stage of a secure sum over the adapter this node trained in the sum's round (`flower.secure`)."""
    from florist_hf.flower.secure import answer_stage

    client_id = protocol.client_id_of(context, None)  # the message carries no recipe to check it against
    root = _work_root(context, work_dir, client_id)

    def kept(round_index: int) -> tuple[Path, Path | None]:
        init_dir = root / "init" / f"round_{round_index}"
        return root / "rounds" / str(round_index) / "export", init_dir if init_dir.is_dir() else None

    return answer_stage(message, context, kept, client_id)


def kept_rounds(root: Path) -> dict[int, list[Path]]:
    """What a node keeps per round under secure aggregation: the round's directory (its adapter) and
    the global it continued that round."""
    kept: dict[int, list[Path]] = {}
    for path in [*(root / "rounds").glob("*"), *(root / "init").glob("round_*")]:
        number = path.name.removeprefix("round_")
        if number.isdigit():
            kept.setdefault(int(number), []).append(path)
    return kept


def make_client_app(work_dir: str | Path | None = None) -> ClientApp:
    """A ClientApp running florist-hf clients; ``work_dir`` is the default for node config ``work-dir``."""
    client_app = ClientApp()

    @client_app.query("florist_hello")
    def _hello(message: Message, context: Context) -> Message:
        return hello(message, context)

    @client_app.query("florist_secagg")
    def _secagg(message: Message, context: Context) -> Message:
        return secure_stage(message, context, work_dir)

    @client_app.train()
    def _train(message: Message, context: Context) -> Message:
        return train_client(message, context, work_dir)

    return client_app


#: ``[tool.flwr.app.components] clientapp = "florist_hf.flower.client_app:app"``
app = make_client_app()
