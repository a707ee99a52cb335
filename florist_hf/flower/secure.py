"""Secure aggregation over Flower: each stage of a secure sum (`secure.protocol`) is one message from
the ServerApp to every client still in the sum and its reply, so `FloristStrategy` drives SecAgg+
with its own messages (Flower's SecAgg+ workflow serves only its legacy strategies).

The server side (`FlowerSums`) is a `secure.server_step.SumRunner`: it sends the stage's requests and
hands the protocol's server the replies, which hold public keys, ciphertexts it cannot read, masked
uint64 arrays and secret shares, never a client's factors. The client side (`answer_stage`) keeps
the client's secrets between stages in the node's own state (a Flower ClientApp runs each message in
a fresh process), computes its arrays from the adapter it kept on the node, and masks them.

Server -> client, ``query.florist_secagg`` (group id ``<round>.<first|second>``):
    "config": ConfigRecord {stage, round, sum, secagg-id,
        keys:   client-ids (JSON), threshold, fraction-bits, and the sum's public task: plans (JSON),
                seed, weights (JSON), needs (JSON), freezes-lora-a, clip (JSON), relative, rescale,
                unit-sketch
        shares: share-key.<id>, mask-key.<id> (every client's public keys)
        masked: ct.<id> (the shares addressed to this client)
        unmask: survivors (JSON), dropped (JSON)}
    "bases": ArrayRecord (masked stage of the second sum): Q per module as Householder reflectors,
        fp64: <module>/reflectors (m×p), <module>/tau (p)
Client -> server:
    "config": ConfigRecord {keys: share-key, mask-key | shares: ct.<id> | unmask: seed.<id>, key.<id>}
    "masked": ArrayRecord (masked stage): the masked encodings, uint64
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from florist_hf.errors import FloristError
from florist_hf.flower import protocol
from florist_hf.flower.nodes import ArrivingReplies
from florist_hf.secure.local import SecureSum
from florist_hf.secure.protocol import (
    ArrayJobs,
    EncryptedShares,
    MaskedInput,
    PublicKeys,
    RevealedShares,
    SecAggClient,
    SecAggServer,
    Setup,
    UnmaskRequest,
    run_stages,
)
from florist_hf.secure.settings import SecAggSettings

if TYPE_CHECKING:  # the sums' tasks and bases are torch's: imported where a masked stage computes or reads them
    from florist_hf.aggregation.sketch import RangeBasis
    from florist_hf.secure.server_step import SumTask, Traffic

#: The node's state record that holds a client's secrets between the stages of one sum.
STATE_KEY = "florist-secagg"
BASES = "bases"
MASKED = "masked"
#: The keys stage's config keys that carry the sum's public task (kept by the node for the later stages).
TASK_KEYS = ("plans", "seed", "weights", "needs", "freezes-lora-a", "clip", "relative", "rescale", "unit-sketch")


def _ids(config: ConfigRecord, prefix: str) -> dict[int, bytes]:
    return {int(key[len(prefix):]): bytes(value) for key, value in config.items() if key.startswith(prefix)}


def _task_config(task: SumTask) -> dict:
    return {"plans": json.dumps([[p.name, *p.shape, p.max_rank, p.columns, p.exact_columns] for p in task.plans]),
            "seed": task.seed, "weights": json.dumps(list(task.weights)), "needs": json.dumps(list(task.needs)),
            "freezes-lora-a": task.freezes_lora_a, "clip": json.dumps(task.clip), "relative": task.relative,
            "rescale": float(task.rescale), "unit-sketch": task.unit_sketch}


def _task_of(held: ConfigRecord, kind: str, bases: ArrayRecord | None) -> SumTask:
    from florist_hf.secure.server_step import ModulePlan, SumTask

    plans = tuple(ModulePlan(name, (m, n), max_rank, columns, exact)
                  for name, m, n, max_rank, columns, exact in json.loads(str(held["plans"])))
    return SumTask(kind, plans, int(held["seed"]), tuple(json.loads(str(held["weights"]))),
                   tuple(json.loads(str(held["needs"]))), bool(held["freezes-lora-a"]),
                   None if bases is None else _bases_of(bases),
                   clip=json.loads(str(held["clip"])), relative=bool(held["relative"]), rescale=float(held["rescale"]),
                   unit_sketch=bool(held["unit-sketch"]))


def _bases_of(record: ArrayRecord) -> dict[str, RangeBasis]:
    import torch

    from florist_hf.aggregation.sketch import RangeBasis

    # copy(order="K"): writeable, and the reflectors keep the column-major layout ormqr reads.
    parts = {name: torch.from_numpy(array.numpy().copy(order="K")) for name, array in record.items()}
    modules = {name.rsplit("/", 1)[0] for name in parts}
    return {module: RangeBasis(parts[f"{module}/reflectors"], parts[f"{module}/tau"]) for module in sorted(modules)}


def _bases_record(bases: Mapping[str, RangeBasis]) -> ArrayRecord:
    record = {}
    for name, basis in sorted(bases.items()):
        record[f"{name}/reflectors"], record[f"{name}/tau"] = Array(basis.reflectors.numpy()), Array(basis.tau.numpy())
    return ArrayRecord(record)


# ---- the server's side ----------------------------------------------------------------------------


def request_content(stage: str, request, index: int, round_index: int, task: SumTask) -> RecordDict:
    """What the server sends client ``index`` at ``stage`` of one sum (module docstring)."""
    config: dict = {"stage": stage, "round": round_index, "sum": task.kind, "secagg-id": index}
    content = RecordDict()
    if stage == "keys":
        config.update({"client-ids": json.dumps(list(request.client_ids)), "threshold": request.threshold,
                       "fraction-bits": request.fraction_bits, **_task_config(task)})
    elif stage == "shares":
        for cid, keys in request.items():
            config[f"share-key.{cid}"], config[f"mask-key.{cid}"] = keys.share_key, keys.mask_key
    elif stage == "masked":
        config.update({f"ct.{cid}": ciphertext for cid, ciphertext in request.items()})
        if task.bases is not None:
            content[BASES] = _bases_record(task.bases)
    else:
        config.update({"survivors": json.dumps(list(request.survivors)), "dropped": json.dumps(list(request.dropped))})
    content[protocol.CONFIG] = ConfigRecord(config)
    return content


def reply_message(stage: str, content: RecordDict, index: int):
    """A client's reply as the protocol's message, its sender the client the server addressed."""
    config = content[protocol.CONFIG]
    if stage == "keys":
        return PublicKeys(index, bytes(config["share-key"]), bytes(config["mask-key"]))
    if stage == "shares":
        return EncryptedShares(index, _ids(config, "ct."))
    if stage == "masked":
        return MaskedInput(index, {name: np.ascontiguousarray(array.numpy(), dtype=np.uint64)
                                   for name, array in content[MASKED].items()})
    return RevealedShares(index, _ids(config, "seed."), _ids(config, "key."))


class FlowerSums:
    """The round's clients as Flower nodes (``nodes[k]`` serves SecAgg+ client k): a `SumRunner`.

    A client whose node replies with an error, or not within ``timeout``, has vanished from the sum
    from that stage on; fewer than the threshold at any stage fails the round (`SecureAggregationError`).
    """

    def __init__(self, grid, nodes: Sequence[int], round_index: int, *, timeout: float | None = None, console=None):
        self.grid, self.nodes, self.round, self.timeout = grid, list(nodes), round_index, timeout
        self.console = console
        self.index = {node: k for k, node in enumerate(self.nodes)}

    def __call__(self, task: SumTask, settings: SecAggSettings, traffic: Traffic,
                 jobs: ArrayJobs | None = None) -> SecureSum:
        server = SecAggServer(range(len(self.nodes)), settings)

        def exchange(stage: str, requests: Mapping[int, object]) -> Iterator:
            messages = [Message(request_content(stage, request, k, self.round, task), self.nodes[k], protocol.SECAGG,
                                group_id=f"{self.round}.{task.kind}") for k, request in requests.items()]
            grid = self.grid
            if stage == "masked":  # the large replies: each pulled, added and let go before the next is pulled
                grid = ArrivingReplies(self.grid)
                grid.pull_batch = 1
            for reply in grid.send_and_receive(messages, timeout=self.timeout):
                k = self.index.get(reply.metadata.src_node_id)
                if k is None or k not in requests:
                    continue
                if reply.has_error():
                    self._say(f"  [yellow]client at node {self.nodes[k]}: left the {task.kind} secure sum at its "
                              f"{stage} stage ({reply.error.reason})[/]")
                    continue
                try:
                    message = reply_message(stage, reply.content, k)
                except (KeyError, TypeError, ValueError) as error:
                    self._say(f"  [yellow]client at node {self.nodes[k]}: unreadable {stage} reply ({error!r}); "
                              "left out of the sum[/]")
                    continue
                del reply  # its record, now read: not held beside the message
                traffic(message)
                yield message
                del message  # taken (a masked input added): not held while the next reply is pulled

        arrays = run_stages(server, exchange, jobs)
        return SecureSum(arrays, server.survivors)

    def _say(self, line: str) -> None:
        if self.console is not None:
            self.console.print(line)


# ---- the client's side ----------------------------------------------------------------------------


def _request(stage: str, content: RecordDict):
    config = content[protocol.CONFIG]
    if stage == "keys":
        return Setup(tuple(json.loads(str(config["client-ids"]))), int(config["threshold"]), int(config["fraction-bits"]))
    if stage == "shares":
        shares, masks = _ids(config, "share-key."), _ids(config, "mask-key.")
        return {cid: PublicKeys(cid, shares[cid], masks[cid]) for cid in shares}
    if stage == "masked":
        return _ids(config, "ct.")
    return UnmaskRequest(tuple(json.loads(str(config["survivors"]))), tuple(json.loads(str(config["dropped"]))))


def _reply_content(reply) -> RecordDict:
    content = RecordDict()
    if isinstance(reply, PublicKeys):
        config = {"share-key": reply.share_key, "mask-key": reply.mask_key}
    elif isinstance(reply, EncryptedShares):
        config = {f"ct.{cid}": ciphertext for cid, ciphertext in reply.ciphertexts.items()}
    elif isinstance(reply, MaskedInput):
        config = {}
        content[MASKED] = ArrayRecord({name: Array(array) for name, array in sorted(reply.arrays.items())})
    else:
        config = {**{f"seed.{cid}": share for cid, share in reply.seed_shares.items()},
                  **{f"key.{cid}": share for cid, share in reply.key_shares.items()}}
    content[protocol.CONFIG] = ConfigRecord(config)
    return content


def answer_stage(message: Message, context: Context, kept: Callable[[int], tuple[Path, Path | None]],
                 client_id: int) -> Message:
    """This node's reply to one stage of a secure sum; ``kept(round)`` is where the node kept the adapter
    it trained that round and the global it continued then (None: a fresh LoRA); its arrays are
    computed from them at the masked stage (bounded first where the round clips)."""
    content = message.content
    config = content[protocol.CONFIG]
    stage, round_index, kind, index = str(config["stage"]), int(config["round"]), str(config["sum"]), int(config["secagg-id"])
    session = f"{round_index}.{kind}"
    if stage == "keys":
        held = ConfigRecord({"session": session, **{key: config[key] for key in TASK_KEYS}})
    else:
        held = context.state.config_records.get(STATE_KEY)
        if held is None or held.get("session") != session:
            raise FloristError(f"client {client_id}: holds no secure-aggregation session {session} (its node restarted "
                               "since the sum began); it drops out of this sum")
    bases = content.array_records.get(BASES)

    def arrays() -> dict[str, np.ndarray]:  # the masked stage's: the one that needs torch
        from florist_hf.adapters import read_adapter

        task = _task_of(held, kind, bases)
        where, continued = kept(round_index)
        reference = read_adapter(continued).modules if task.relative and continued is not None else None
        try:
            return task.compute(index, read_adapter(where).modules, reference)
        except KeyError as error:
            raise FloristError(f"client {client_id}: the secure sum asks for module {error} that its adapter in {where} "
                               "lacks") from None

    secrets = {key: bytes(value) for key, value in held.items() if key.startswith("secret.")}
    client = SecAggClient.restore(index, {key.removeprefix("secret."): value for key, value in secrets.items()}, arrays)
    reply = client.respond(stage, _request(stage, content))
    if stage == "unmask":  # the sum is done: nothing of it is kept
        del context.state[STATE_KEY]
    else:
        kept = {key: value for key, value in held.items() if not key.startswith("secret.")}
        context.state[STATE_KEY] = ConfigRecord({**kept, **{f"secret.{key}": value for key, value in client.state().items()}})
    return Message(_reply_content(reply), reply_to=message)
