"""`FloristStrategy`: a Flower (Message API) strategy that drives florist-hf's round engine
(`florist_hf.engine.Federation`) as ``florist-hf run`` does: every reply's adapter is written to the
run directory as a PEFT adapter, and the engine accepts, aggregates, records and publishes it."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from florist_hf.adapters import read_adapter, read_adapter_layout
from florist_hf.errors import FloristError
from florist_hf.flower import protocol
from florist_hf.flower.nodes import ClientNode, hello_content
from florist_hf.flower.records import adapter_to_records, state_to_records, write_adapter_records, write_layout_records
from florist_hf.server import StreamingServerRound


@dataclass
class _RoundState:
    plan: object = None
    #: the round's client plans, by client id
    plans: dict = field(default_factory=dict)
    #: per node, the rounds of the global state its node holds once it has trained this round
    sent: dict = field(default_factory=dict)
    #: bytes of the adapters the round's train messages carried (ArrayRecord.count_bytes), and the replies'
    downlink_bytes: int = 0
    uplink_bytes: int = 0


class FloristStrategy(Strategy):
    """A Flower strategy driving florist-hf's round engine (`florist_hf.engine.Federation`).

    ``configure_train`` sends each client of the engine's round plan its plan and the global
    state it lacks; ``aggregate_train`` writes the replies as client adapter directories, has the
    engine accept, aggregate and record them, and returns the global adapter as an ArrayRecord
    (PEFT key names). State lives on disk, so a restarted ServerApp resumes. Under secure
    aggregation the replies carry the adapters' layouts only, and the engine's secure server step
    reaches the clients' adapters through the round's secure sums (`flower.secure.FlowerSums`).
    """

    def __init__(self, federation, clients: dict[int, ClientNode], *, tokenizer=None, test_records=(),
                 round_timeout: float | None = None):
        self.federation = federation
        self.recipe = federation.recipe
        self.paths = federation.paths
        self.method = federation.method
        self.console = federation.console
        self.round_timeout = round_timeout
        self._grid = None
        self.recipe_json = json.dumps(self.recipe.as_given())
        self.clients = clients
        self.client_sizes = [clients[k].num_samples for k in range(self.recipe.federation.num_clients)]
        self.node_to_client = {client.node_id: client.client_id for client in clients.values()}
        self.tokenizer = tokenizer
        self.test_records = list(test_records)
        #: merge rounds each node has received (it keeps them in its work dir)
        self.delivered: dict[int, set[int]] = {client.node_id: set() for client in clients.values()}
        self._round = _RoundState()
        #: Under secure aggregation clients keep their adapters; the strategy drives the secure sums.
        self.secure = self.recipe.federation.secure() is not None

    def summary(self) -> None:  # Flower's Strategy interface asks for it
        nodes = [self.clients[k].node_id for k in sorted(self.clients)]
        self.console.print(f"FloristStrategy: {self.recipe.federation.method}, clients on nodes {nodes}, -> {self.paths.root}")

    # --- training -----------------------------------------------------------------------------

    def refresh_nodes(self, grid: Grid) -> None:
        """Re-map clients whose SuperNode reconnected under a new node id: the nodes not known yet
        are asked which client they serve (nodes that do not answer stay unmapped)."""
        current = set(grid.get_node_ids())
        gone = [client for client in self.clients.values() if client.node_id not in current]
        unknown = sorted(current - set(self.node_to_client))
        if not gone or not unknown:
            return
        messages = [Message(hello_content(self.recipe_json), node_id, protocol.HELLO) for node_id in unknown]
        for reply in grid.send_and_receive(messages, timeout=min(self.round_timeout or 60.0, 60.0)):
            if reply.has_error():
                continue
            client_id = int(reply.content[protocol.CONFIG]["client-id"])
            old = self.clients.get(client_id)
            if old is None or old.node_id in current:  # not a client we lost (a duplicate partition-id)
                continue
            node_id = reply.metadata.src_node_id
            self.console.print(f"client {client_id}: its SuperNode reconnected as node {node_id} (was {old.node_id})")
            self.node_to_client.pop(old.node_id, None)
            self.clients[client_id] = ClientNode(client_id, node_id, old.num_samples)
            self.node_to_client[node_id] = client_id
            self.delivered[node_id] = set()  # a new process: send it every global update it needs

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._grid = grid
        self.refresh_nodes(grid)
        round_plan = self.federation.plan_round(server_round, self.client_sizes)
        self._round = _RoundState(plan=round_plan, plans={plan.client_id: plan for plan in round_plan.clients})
        if round_plan.complete:
            self.console.print(f"round {server_round}: already complete, reused")
            return []
        self.console.print(f"[bold]round {server_round}/{self.recipe.federation.rounds}[/]: clients {round_plan.selected}")
        messages = []
        for plan in round_plan.clients:
            if plan.export_dir.exists():
                self.console.print(f"  client {plan.client_id}: already trained this round, reused")
                continue
            messages.append(self._train_message(plan, resend_all=False))
        return messages

    def _train_message(self, plan, *, resend_all: bool) -> Message:
        """One client's train message: its plan and the part of the global state it lacks.

        A node keeps the global state it was sent (the cumulative update, `global_state`). It is
        sent what it misses since: one round's global adapter as it is (the node folds it in as
        the server did, so both hold the same state), several rounds summed and compacted into
        one update, or the whole state where that is no larger (always, to a node that holds none).
        """
        from florist_hf.rounds import catch_up_form
        from florist_hf.global_state import read_global_state, read_state_record, record_wire_bytes

        node_id = self.clients[plan.client_id].node_id
        state_record = read_state_record(plan.global_state) if plan.global_state is not None else None
        merge_rounds = list(state_record["rounds"]) if state_record else []
        missing = [t for t in merge_rounds if resend_all or t not in self.delivered[node_id]]
        init_round = int(plan.init_adapter.parent.name) if plan.init_adapter is not None else None
        form, payload = "none", None
        if missing:
            @functools.cache
            def compacted():  # made at most once, and only where the rule asks for its size
                return self.federation.history.catch_up_state(missing)

            chosen = catch_up_form(missing, merge_rounds, record_wire_bytes(state_record), lambda: compacted().wire_bytes)
            if chosen == "round":
                form, payload = protocol.GLOBAL_UPDATE, adapter_to_records(self.federation.history.state_update_dir(missing[0]))
            elif chosen == "compacted":
                form, payload = protocol.CATCH_UP, state_to_records(compacted())
            else:
                form, payload = protocol.GLOBAL_STATE, state_to_records(read_global_state(plan.global_state))
        request = protocol.TrainRequest(
            recipe_json=self.recipe_json, client_id=plan.client_id, round=plan.round, rank=plan.rank,
            num_samples=plan.num_samples, merge_rounds=merge_rounds, sent_rounds=missing, sent_form=form,
            init_round=init_round, freeze_lora_a=plan.freeze_lora_a,
        )
        content = RecordDict({protocol.CONFIG: request.to_config()})
        if payload is not None:
            content[form], content[protocol.config_key(form)] = payload
        if plan.init_adapter is not None:
            init_arrays, init_config = adapter_to_records(plan.init_adapter)
            content[protocol.INIT], content[protocol.config_key(protocol.INIT)] = init_arrays, init_config
        self._round.sent[node_id] = merge_rounds
        self._round.downlink_bytes += sum(record.count_bytes() for record in content.array_records.values())
        return Message(content, node_id, protocol.TRAIN, group_id=str(plan.round))

    def _receive(self, server_round: int, reply: Message) -> int | None:
        """Store one reply as a client adapter directory; returns a client to ask again, if any."""
        from florist_hf.io_utils import retire_directory

        node_id = reply.metadata.src_node_id
        client_id = self.node_to_client.get(node_id)
        if reply.has_error():
            reason = reply.error.reason
            if protocol.MISSING_GLOBAL in reason and client_id in self._round.plans:
                self.delivered[node_id] = set()  # its work dir was reset: send every earlier update again
                self.console.print(f"  client {client_id} (node {node_id}) lost the earlier global updates; sending them again")
                return client_id
            self.console.print(f"  [yellow]client {client_id} (node {node_id}): failed: {reason}[/]")
            return None
        content = reply.content
        config = content[protocol.CONFIG]
        if client_id is None or int(config["client-id"]) != client_id or int(config["round"]) != server_round:
            self.console.print(f"  [yellow]node {node_id}: unexpected reply (client {config.get('client-id')}, round {config.get('round')}), ignored[/]")
            return None
        plan = self._round.plans.get(client_id)
        if plan is None:
            return None
        self.delivered[node_id] = set(self._round.sent.get(node_id, []))  # the node now holds this state
        self._round.uplink_bytes += sum(record.count_bytes() for record in content.array_records.values())
        try:
            info = json.loads(str(config["client-info"]))
            if not isinstance(info, dict):
                raise FloristError(f"client {client_id}'s reply holds no client info")
            if self.secure:  # the client keeps its factors: the server records their layout
                if content.array_records:
                    raise FloristError(f"client {client_id} sent arrays in the clear under secure aggregation")
                write_layout_records(plan.export_dir, config, client_info=info, source=f"client {client_id}'s reply")
            elif protocol.ADAPTER not in content.array_records:
                raise FloristError(f"client {client_id}'s reply holds no adapter")
            else:
                write_adapter_records(
                    plan.export_dir, content.array_records[protocol.ADAPTER], config, client_info=info,
                    overwrite=True, source=f"client {client_id}'s reply",
                )
            if info.get("finite", True):  # a diverged client is logged, then left out, as in florist-hf run
                read = read_adapter_layout if self.secure else read_adapter
                ranks = {module.rank for module in read(plan.export_dir).modules.values()}
            else:
                ranks = {plan.rank}
            if ranks != {plan.rank}:
                raise FloristError(f"client {client_id} sent LoRA rank(s) {sorted(ranks)}, not its rank {plan.rank}")
        except (FloristError, json.JSONDecodeError, KeyError) as error:
            if plan.export_dir.exists():
                retire_directory(plan.export_dir, plan.export_dir.with_name(plan.export_dir.name + ".invalid"))
            self.console.print(f"  [yellow]client {client_id}: unusable reply ({error}); left out of round {server_round}[/]")
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        from florist_hf.clients.callback import read_client_info

        federation = self.federation
        global_dir = self.paths.global_dir(server_round)
        trained = []
        if self._round.plan.complete:
            if federation.is_recorded(server_round):
                return adapter_to_records(global_dir)[0], None
            # Stopped between the aggregation and the round's record: rebuilt from the sidecar below.
        else:
            trained = self._train_round(server_round, replies)
        heldout = None
        if self.recipe.federation.eval_heldout_loss and self.test_records:
            heldout = federation.heldout_loss(server_round, self.tokenizer, self.test_records)
        measured = None if self._round.plan.complete else {
            "flower_downlink_bytes": self._round.downlink_bytes, "flower_uplink_bytes": self._round.uplink_bytes}
        record = federation.record_round(server_round, heldout, measured=measured)
        metrics = {key: value for key, value in record.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round"}
        losses = [read_client_info(plan.export_dir).get("loss") for plan in trained]
        losses = [loss for loss in losses if isinstance(loss, (int, float))]
        if losses:
            metrics["client_loss_mean"] = sum(losses) / len(losses)
        return adapter_to_records(global_dir)[0], MetricRecord(metrics)

    def _train_round(self, server_round: int, replies: Iterable[Message]) -> list:
        """Collect the round's client adapters, retry once where a node lacked global updates,
        and have the engine aggregate the ones that trained; returns their plans.

        With streaming aggregation each client is accepted and folded in as its reply arrives
        (``ArrivingReplies`` yields them one by one), so the server never holds every client.
        """
        from florist_hf.io_utils import retire_directory

        streamed = (StreamingServerRound(self.method, self.federation.update_bounding(self._round.plan.round))
                    if self.method.streaming else None)
        trained, handled = [], set()

        def take(client_id) -> None:
            """Accept a client once its adapter is on disk (and fold it in, when streaming)."""
            plan = self._round.plans.get(client_id)
            if plan is None or client_id in handled or not plan.export_dir.exists():
                return
            handled.add(client_id)
            if not self.federation.accept(plan):
                return
            if streamed is not None:
                try:  # read and checked before anything is folded: a bad client leaves the others intact
                    streamed.add(plan.export_dir, plan.num_samples)
                except FloristError as error:
                    retire_directory(plan.export_dir, plan.export_dir.with_name(plan.export_dir.name + ".invalid"))
                    self.console.print(f"  [yellow]client {client_id}: unusable adapter ({error}); left out of round {server_round}[/]")
                    return
            trained.append(plan)

        retry = []
        for reply in replies:
            client = self._receive(server_round, reply)
            if client is not None:
                retry.append(client)
            else:
                take(self.node_to_client.get(reply.metadata.src_node_id))
        if retry:  # once, with every earlier global update
            messages = [self._train_message(self._round.plans[client], resend_all=True) for client in retry]
            for reply in self._grid.send_and_receive(messages, timeout=self.round_timeout):
                self._receive(server_round, reply)
                take(self.node_to_client.get(reply.metadata.src_node_id))
        for plan in self._round.plan.clients:
            if plan.client_id in handled:
                continue
            if not plan.export_dir.exists():
                self.console.print(f"  [yellow]client {plan.client_id}: no adapter this round; left out of round {server_round}[/]")
                continue
            take(plan.client_id)  # trained before a restart
        if streamed is None:  # stacked: in the plan's order, as florist-hf run aggregates
            trained.sort(key=self._round.plan.clients.index)
        secure_sums = None
        if self.secure and trained:
            from florist_hf.flower.secure import FlowerSums

            secure_sums = FlowerSums(self._grid, [self.clients[plan.client_id].node_id for plan in trained], server_round,
                                     timeout=self.round_timeout, console=self.console)
        self.federation.aggregate(self._round.plan, trained, streamed, secure_sums=secure_sums)
        return trained

    # --- no federated evaluation: the server evaluates the global adapter itself ----------------

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
