"""How the ServerApp finds and hears its clients: each client's SuperNode (found by a hello to
every node, by its partition-id) and a Grid whose replies arrive one by one."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from florist_hf.errors import FloristError
from florist_hf.flower import protocol

DEFAULT_NODE_TIMEOUT = 600.0
#: A silent node must not hold a round forever: after this the round aggregates what has arrived
#: (if federation.min_clients holds). Long enough for a 7B client's round on one GPU.
DEFAULT_ROUND_TIMEOUT = 6 * 3600.0


@dataclass
class ClientNode:
    """One client of the federation: the SuperNode that runs it and its sample count."""

    client_id: int
    node_id: int
    num_samples: int


def hello_content(recipe_json: str) -> RecordDict:
    return RecordDict({protocol.CONFIG: ConfigRecord({"recipe": recipe_json})})


def discover_clients(grid: Grid, recipe, *, timeout: float = DEFAULT_NODE_TIMEOUT, console=None) -> dict[int, ClientNode]:
    """Wait for the SuperNodes, ask each which client it is; returns ``{client_id: ClientNode}``."""
    num_clients = recipe.federation.num_clients
    deadline = time.monotonic() + timeout
    announced = -1
    while len(node_ids := sorted(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise FloristError(
                f"only {len(node_ids)} of {num_clients} SuperNodes connected within {timeout:.0f} s; start one "
                f"per client: flower-supernode ... --node-config \"partition-id=<k> num-partitions={num_clients}\""
            )
        if len(node_ids) != announced and console is not None:
            console.print(f"waiting for SuperNodes: {len(node_ids)} of {num_clients} connected")
            announced = len(node_ids)
        time.sleep(1.0)
    recipe_json = json.dumps(recipe.as_given())
    messages = [Message(hello_content(recipe_json), node_id, protocol.HELLO) for node_id in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=max(deadline - time.monotonic(), 60.0)))
    clients: dict[int, ClientNode] = {}
    problems = []
    for reply in replies:
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            problems.append(f"node {node_id}: {reply.error.reason}")
            continue
        config = reply.content[protocol.CONFIG]
        client_id, num_samples = int(config["client-id"]), int(config["num-samples"])
        if "refused" in config and console is not None:
            console.print(f"[yellow]client {client_id} (node {node_id}): {config['refused']}[/]")
        if client_id in clients:
            raise FloristError(
                f"SuperNodes {clients[client_id].node_id} and {node_id} both claim client {client_id}; give every "
                "SuperNode its own partition-id"
            )
        clients[client_id] = ClientNode(client_id, node_id, num_samples)
    missing = sorted(set(range(num_clients)) - set(clients))
    if missing:
        detail = "; ".join(problems) or f"{len(node_ids) - len(replies)} node(s) did not answer"
        raise FloristError(f"no SuperNode serves client(s) {missing} ({detail})")
    return clients


class ArrivingReplies:
    """A Grid whose ``send_and_receive`` yields each reply as soon as it has been pulled, instead
    of returning them all once the last has arrived or the timeout has passed; everything else is
    the wrapped Grid's."""

    #: seconds between pulls while replies are outstanding
    pull_interval = 1.0
    #: replies asked for per pull: what arrived together is not all held at once
    pull_batch = 4

    def __init__(self, grid: Grid):
        self._grid = grid

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        message_ids = list(self._grid.push_messages(messages))
        del messages  # the train messages carry the global adapters: not kept while replies are folded
        deadline = None if timeout is None else time.monotonic() + timeout
        while message_ids:
            pulled = False
            for start in range(0, len(message_ids), self.pull_batch):
                for reply in self._grid.pull_messages(message_ids[start : start + self.pull_batch]):
                    pulled = True
                    if reply.metadata.reply_to_message_id in message_ids:
                        message_ids.remove(reply.metadata.reply_to_message_id)
                    yield reply
                    del reply  # taken: not held while the next is pulled
            if not message_ids or (deadline is not None and time.monotonic() >= deadline):
                return
            if not pulled:
                time.sleep(self.pull_interval)
