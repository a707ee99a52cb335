"""What the ServerApp and the ClientApp say to each other: message types, record keys, node config.

Server -> client, ``query.florist_hello`` (once per run, to every node):
    "config": ConfigRecord {recipe (JSON)}
Client -> server:
    "config": ConfigRecord {client-id, num-samples}

Server -> client, ``train`` (one per selected client per round; `TrainRequest` encodes and decodes its config):
    "config": ConfigRecord {recipe (JSON), client-id, round, rank, num-samples,
                            merge-rounds (JSON list: the rounds the global state sums),
                            sent-rounds (JSON list), sent-form, init-round (-1: none), freeze-lora-a}
    FLoRIST, FLoRA: the node keeps the global state (the cumulative update of the merge rounds) and
    is sent what it lacks of it, the sent-rounds, in one of three forms (sent-form):
    "global" + "global.config": one round's global adapter (the node folds it into its state);
    "catch-up" + "catch-up.config": several rounds' updates summed and compacted into one state;
    "global-state" + "global-state.config": the whole state, replacing the node's.
    "init" + "init.config": the global factors to continue from (FedIT, FFA-LoRA, FlexLoRA)
Client -> server:
    "adapter": ArrayRecord, the client's trained LoRA factors under their PEFT key names; under
               federation.secure_aggregation none: the client keeps them, its config record carries
               their layout ("adapter-layout"), and the server sums them through SecAgg+ in
               ``query.florist_secagg`` messages (`flower.secure`)
    "config": ConfigRecord {adapter-config (its adapter_config.json), tensor-dtypes, client-id,
                            round, rank, alpha, scale, client-info (its client.json)}
    "metrics": MetricRecord {num-examples, loss, steps, train-seconds, finite}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Context, MessageType

from florist_hf.errors import FloristError

HELLO = f"{MessageType.QUERY}.florist_hello"
SECAGG = f"{MessageType.QUERY}.florist_secagg"
TRAIN = MessageType.TRAIN

CONFIG = "config"
ADAPTER = "adapter"
METRICS = "metrics"
INIT = "init"
#: sent-form values: the record key of what a train message carries of the global state.
GLOBAL_UPDATE = "global"
CATCH_UP = "catch-up"
GLOBAL_STATE = "global-state"

#: A client that lacks an earlier round's global update (its work dir was reset) raises an error
#: with this text; the server then sends it the round again, with every earlier update.
MISSING_GLOBAL = "missing the global update of round"

#: node_config keys: ``--node-config "partition-id=0 num-partitions=3 work-dir='/data/florist'"``.
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
WORK_DIR = "work-dir"
DATA_FILE = "data-file"


@dataclass
class TrainRequest:
    """The "config" record of a ``train`` message: what one client does in one round and what the
    message carries of the global state. `to_config` and `from_config` are each other's inverse."""

    recipe_json: str
    client_id: int
    round: int
    rank: int
    num_samples: int
    #: The rounds the global state sums after this message, and those it sends (in ``sent_form``).
    merge_rounds: list[int] = field(default_factory=list)
    sent_rounds: list[int] = field(default_factory=list)
    sent_form: str = "none"
    #: The round whose global factors the client continues (None: a fresh LoRA).
    init_round: int | None = None
    freeze_lora_a: bool = False

    def to_config(self) -> ConfigRecord:
        return ConfigRecord({
            "recipe": self.recipe_json, "client-id": self.client_id, "round": self.round, "rank": self.rank,
            "num-samples": self.num_samples, "merge-rounds": json.dumps(self.merge_rounds),
            "sent-rounds": json.dumps(self.sent_rounds), "sent-form": self.sent_form,
            "init-round": -1 if self.init_round is None else self.init_round, "freeze-lora-a": self.freeze_lora_a,
        })

    @classmethod
    def from_config(cls, config) -> "TrainRequest":
        text = config.get("recipe")
        if not isinstance(text, str):
            raise FloristError("the server's message carries no recipe")
        init_round = int(config["init-round"])
        return cls(recipe_json=text, client_id=int(config["client-id"]), round=int(config["round"]), rank=int(config["rank"]),
                   num_samples=int(config["num-samples"]), merge_rounds=json.loads(str(config["merge-rounds"])),
                   sent_rounds=json.loads(str(config["sent-rounds"])), sent_form=str(config["sent-form"]),
                   init_round=None if init_round < 0 else init_round, freeze_lora_a=bool(config["freeze-lora-a"]))


def config_key(record_key: str) -> str:
    return f"{record_key}.config"


def client_id_of(context: Context, num_clients: int | None) -> int:
    """This SuperNode's client index, from its node config (``partition-id``); checked against the
    recipe's ``num_clients`` where the message carries one."""
    node_config = context.node_config
    if PARTITION_ID not in node_config:
        count, last = ("<n>", "<n> - 1") if num_clients is None else (num_clients, num_clients - 1)
        raise FloristError(
            f"SuperNode {context.node_id} has no {PARTITION_ID} in its node config; start it with "
            f"--node-config \"{PARTITION_ID}=<k> {NUM_PARTITIONS}={count}\" (k = 0..{last})"
        )
    try:
        client_id = int(node_config[PARTITION_ID])
    except (TypeError, ValueError):
        raise FloristError(f"SuperNode {context.node_id}: {PARTITION_ID} must be an integer, got {node_config[PARTITION_ID]!r}") from None
    if num_clients is None:
        return client_id
    if NUM_PARTITIONS in node_config and int(node_config[NUM_PARTITIONS]) != num_clients:
        raise FloristError(
            f"SuperNode {context.node_id}: {NUM_PARTITIONS} = {node_config[NUM_PARTITIONS]} but the recipe's "
            f"federation.num_clients = {num_clients}; start the SuperNodes with {NUM_PARTITIONS}={num_clients}"
        )
    if not 0 <= client_id < num_clients:
        raise FloristError(
            f"SuperNode {context.node_id}: {PARTITION_ID} = {client_id} is outside 0..{num_clients - 1} "
            f"(federation.num_clients = {num_clients})"
        )
    return client_id
