"""The Flower ServerApp: ``florist-hf run``'s round loop with Flower carrying the messages.

``FloristStrategy`` is a Flower (Message API) strategy whose aggregation is florist-hf's own
``aggregate_adapters``: every reply's adapter is written to the run directory as a PEFT adapter
(the same ``rounds/<t>/clients/client_<k>`` layout as ``florist-hf run``), and the global adapter,
its sidecar, ``metrics.jsonl``, ``global_adapter/`` and ``run.json`` are made by the same helpers.
Any method, any τ, heterogeneous ranks: whatever the recipe says.

Run config (``[tool.flwr.app.config]`` or ``flwr run --run-config``):
    recipe          path of the recipe YAML; a relative path is looked up in the Flower app
                    (the FAB: put the recipe beside pyproject.toml) and then in the working directory
    overrides       ';'-separated ``key=value`` overrides, as ``florist-hf run --set`` takes them
    output-dir      where the run is written (default: the recipe's output_dir)
    force           continue a run directory that holds another recipe
    round-timeout   seconds to wait for a round's replies (0: no limit)
    node-timeout    seconds to wait until every client's SuperNode has connected
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from florist_hf.adapters import read_adapter
from florist_hf.errors import FloristError
from florist_hf.flower import protocol
from florist_hf.flower.records import adapter_to_records, write_adapter_records

DEFAULT_NODE_TIMEOUT = 600.0


@dataclass
class ClientNode:
    """One client of the federation: the SuperNode that runs it and its sample count."""

    client_id: int
    node_id: int
    num_samples: int


def _method(recipe):
    from florist_hf.aggregation import get_method

    federation = recipe.federation
    if federation.method == "florist":
        return get_method(federation.method, threshold=federation.threshold)
    return get_method(federation.method)


def _hello_content(recipe_json: str) -> RecordDict:
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
    recipe_json = recipe.model_dump_json()
    messages = [Message(_hello_content(recipe_json), node_id, protocol.HELLO) for node_id in node_ids]
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


@dataclass
class _RoundState:
    plans: dict = field(default_factory=dict)
    #: per node, the merge rounds this round's message carried
    sent: dict = field(default_factory=dict)
    reused: bool = False


class FloristStrategy(Strategy):
    """A Flower strategy whose aggregation is florist-hf's (``aggregate_adapters``), state on disk.

    ``configure_train`` sends each selected client its round plan and the global state;
    ``aggregate_train`` writes the replies as client adapter directories, aggregates them with
    the recipe's method and returns the global adapter as an ArrayRecord (PEFT key names).
    Finished rounds and clients found on disk are reused, so a restarted ServerApp resumes.
    """

    def __init__(self, recipe, paths, clients: dict[int, ClientNode], *, base_path: str, console,
                 tokenizer=None, test_records=(), logged: set | None = None, round_timeout: float | None = None):
        self.recipe = recipe
        self.round_timeout = round_timeout
        self._grid = None
        self.recipe_json = recipe.model_dump_json()
        self.paths = paths
        self.method = _method(recipe)
        self.clients = clients
        self.node_to_client = {client.node_id: client.client_id for client in clients.values()}
        self.base_path = base_path
        self.console = console
        self.tokenizer = tokenizer
        self.test_records = list(test_records)
        self.logged = logged if logged is not None else set()
        self.rounds_done: list[int] = []
        #: merge rounds each node has received (it keeps them in its work dir)
        self.delivered: dict[int, set[int]] = {client.node_id: set() for client in clients.values()}
        self._round = _RoundState()

    def summary(self) -> None:
        federation = self.recipe.federation
        self.console.print(
            f"FloristStrategy: {federation.method}"
            + (f" (τ = {federation.threshold})" if federation.method == "florist" else "")
            + f", {federation.num_clients} clients on nodes {[self.clients[k].node_id for k in sorted(self.clients)]}, "
            f"{federation.rounds} rounds -> {self.paths.root}"
        )

    # --- training -----------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        from florist_hf.client import ClientRound
        from florist_hf.server import sample_clients

        recipe, paths, federation = self.recipe, self.paths, self.recipe.federation
        self._grid = grid
        self._round = state = _RoundState()
        selected = sample_clients(federation.num_clients, federation.clients_per_round, federation.seed, server_round)
        if paths.global_dir(server_round).exists():
            self.console.print(f"round {server_round}: already complete, reused")
            state.reused = True
            return []
        self.console.print(f"[bold]round {server_round}/{federation.rounds}[/]: clients {selected}")
        merges = self.method.merges_into_base
        init_round = None if merges else (self.rounds_done[-1] if self.rounds_done else 0)
        messages = []
        for client_id in selected:
            plan = ClientRound(
                client_id=client_id,
                round=server_round,
                rank=recipe.client_rank(client_id),
                num_samples=self.clients[client_id].num_samples,
                export_dir=paths.client_dir(server_round, client_id),
                merge_adapters=[paths.global_dir(t) for t in self.rounds_done] if merges else [],
                init_adapter=None if merges else paths.global_dir(init_round),
                freeze_lora_a=self.method.name == "ffa",
            )
            state.plans[client_id] = plan
            if plan.export_dir.exists():
                self.console.print(f"  client {client_id}: already trained this round, reused")
                continue
            messages.append(self._train_message(plan, init_round))
        return messages

    def _train_message(self, plan, init_round: int | None) -> Message:
        """One client's train message: its plan and the global state it does not have yet."""
        node_id = self.clients[plan.client_id].node_id
        merges = self.method.merges_into_base
        content = RecordDict(
            {
                protocol.CONFIG: ConfigRecord(
                    {
                        "recipe": self.recipe_json,
                        "client-id": plan.client_id,
                        "round": plan.round,
                        "rank": plan.rank,
                        "num-samples": plan.num_samples,
                        "merge-rounds": json.dumps(list(self.rounds_done) if merges else []),
                        "init-round": -1 if init_round is None else init_round,
                        "freeze-lora-a": plan.freeze_lora_a,
                    }
                )
            }
        )
        sent = []
        if merges:
            for earlier in self.rounds_done:
                if earlier not in self.delivered[node_id]:
                    global_arrays, global_config = adapter_to_records(self.paths.global_dir(earlier))
                    content[protocol.global_key(earlier)] = global_arrays
                    content[protocol.config_key(protocol.global_key(earlier))] = global_config
                    sent.append(earlier)
        else:
            init_arrays, init_config = adapter_to_records(self.paths.global_dir(init_round))
            content[protocol.INIT], content[protocol.config_key(protocol.INIT)] = init_arrays, init_config
        self._round.sent[node_id] = sent
        return Message(content, node_id, protocol.TRAIN, group_id=str(plan.round))

    def _receive(self, server_round: int, reply: Message) -> int | None:
        """Store one reply as a client adapter directory; returns a client to ask again, if any."""
        from florist_hf.server import _retire

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
        self.delivered[node_id].update(self._round.sent.get(node_id, []))
        try:
            info = json.loads(str(config["client-info"]))
            if protocol.ADAPTER not in content.array_records or not isinstance(info, dict):
                raise FloristError(f"client {client_id}'s reply holds no adapter or no client info")
            write_adapter_records(
                plan.export_dir, content.array_records[protocol.ADAPTER], config, client_info=info,
                overwrite=True, source=f"client {client_id}'s reply",
            )
            if info.get("finite", True):  # a diverged client is logged, then left out, as in run_federation
                ranks = {module.rank for module in read_adapter(plan.export_dir).modules.values()}
            else:
                ranks = {plan.rank}
            if ranks != {plan.rank}:
                raise FloristError(f"client {client_id} sent LoRA rank(s) {sorted(ranks)}, not its rank {plan.rank}")
        except (FloristError, json.JSONDecodeError, KeyError) as error:
            if plan.export_dir.exists():
                _retire(plan.export_dir, plan.export_dir.with_name(plan.export_dir.name + ".invalid"))
            self.console.print(f"  [yellow]client {client_id}: unusable reply ({error}); left out of round {server_round}[/]")
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        from florist_hf.client import read_client_info
        from florist_hf.io_utils import append_jsonl
        from florist_hf.server import (
            _evaluate_and_log,
            describe_round,
            global_heldout_loss,
            round_record,
            write_published_adapter,
        )

        recipe, paths, federation, console = self.recipe, self.paths, self.recipe.federation, self.console
        global_dir = paths.global_dir(server_round)
        if self._round.reused:
            self.rounds_done.append(server_round)
            if ("round", server_round, None) in self.logged:
                return adapter_to_records(global_dir)[0], None
            # Stopped between the aggregation and the round's record: rebuilt from the sidecar below.
            trained = None
        else:
            trained = self._train_round(server_round, replies)
        heldout = None
        if federation.eval_heldout_loss and self.test_records:
            heldout = global_heldout_loss(
                recipe, self.base_path, paths, self.method, server_round, self.tokenizer, self.test_records
            )
        record = round_record(paths, server_round, heldout)
        append_jsonl(paths.metrics, record)
        self.logged.add(("round", server_round, None))
        if recipe.evaluation is not None and recipe.evaluation.every_round and server_round < federation.rounds:
            published = write_published_adapter(paths, self.method, self.rounds_done, paths.round_dir(server_round) / "published")
            _evaluate_and_log(recipe, self.base_path, published, paths, server_round, self.logged, console)
        console.print(describe_round(record))
        metrics = {key: value for key, value in record.items() if isinstance(value, (int, float)) and key != "round"}
        losses = [read_client_info(plan.export_dir).get("loss") for plan in trained or []]
        losses = [loss for loss in losses if isinstance(loss, (int, float))]
        if losses:
            metrics["client_loss_mean"] = sum(losses) / len(losses)
        return adapter_to_records(global_dir)[0], MetricRecord(metrics)

    def _train_round(self, server_round: int, replies: Iterable[Message]) -> list:
        """Collect the round's client adapters, retry once where a node lacked global updates,
        and aggregate the ones that trained; returns their plans."""
        from florist_hf.server import accept_client_result, aggregate_round, require_quorum

        paths, federation, console = self.paths, self.recipe.federation, self.console
        retry = [client for reply in replies if (client := self._receive(server_round, reply)) is not None]
        if retry:  # once, with every earlier global update
            messages = [self._train_message(self._round.plans[client], None) for client in retry]
            for reply in self._grid.send_and_receive(messages, timeout=self.round_timeout):
                self._receive(server_round, reply)

        # From here on, the same steps as run_federation's round.
        trained = []
        for client_id, plan in self._round.plans.items():
            if not plan.export_dir.exists():
                console.print(f"  [yellow]client {client_id}: no adapter this round; left out of round {server_round}[/]")
                continue
            if accept_client_result(paths, plan, self.logged, console):
                trained.append(plan)
        require_quorum(paths, server_round, len(trained), len(self._round.plans), federation.min_clients)
        aggregate_round(paths, self.method, trained, server_round)
        self.rounds_done.append(server_round)
        return trained

    # --- no federated evaluation: the server evaluates the global adapter itself ----------------

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


def run_flower_federation(grid: Grid, recipe, *, force: bool = False, console=None,
                          round_timeout: float | None = None, node_timeout: float = DEFAULT_NODE_TIMEOUT) -> Path:
    """The ServerApp's work: discover the clients, run every round through Flower, publish; returns the run dir."""
    from rich.console import Console

    from florist_hf.io_utils import write_json_atomic
    from florist_hf.loading import load_tokenizer
    from florist_hf.server import (
        GLOBAL_ADAPTER,
        RUN_SUMMARY,
        RunPaths,
        _check_recipe_record,
        _evaluate_and_log,
        _logged_keys,
        prepare_base_model,
        prepare_client_data,
        summarize_run,
        write_published_adapter,
    )

    console = console or Console()
    paths = RunPaths(Path(recipe.output_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    _check_recipe_record(paths, recipe, force)
    federation = recipe.federation
    method = _method(recipe)
    clients = discover_clients(grid, recipe, timeout=node_timeout, console=console)
    sizes = [clients[k].num_samples for k in range(federation.num_clients)]
    base_path = prepare_base_model(recipe, paths)
    tokenizer, test_records = None, []
    if federation.eval_heldout_loss:
        try:
            _, test_records = prepare_client_data(recipe)
        except FloristError as error:
            raise FloristError(
                f"{error} (the ServerApp reads the recipe's data for the held-out loss: make it readable on the "
                "SuperLink's machine or set federation.eval_heldout_loss=false)"
            ) from None
        if test_records:
            tokenizer = load_tokenizer(
                base_path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
            )
    console.print(
        f"[bold]{recipe.name}[/] on Flower: {federation.method}"
        + (f" (τ = {federation.threshold})" if federation.method == "florist" else "")
        + f", {federation.num_clients} clients {sizes} samples, ranks "
        f"{[recipe.client_rank(k) for k in range(federation.num_clients)]}, {federation.rounds} rounds -> {paths.root}"
    )
    if not method.merges_into_base and not paths.global_dir(0).exists():
        from florist_hf.server import build_initial_adapter

        build_initial_adapter(base_path, recipe, paths.global_dir(0))

    logged = _logged_keys(paths.metrics)
    strategy = FloristStrategy(
        recipe, paths, clients, base_path=base_path, console=console, tokenizer=tokenizer,
        test_records=test_records, logged=logged, round_timeout=round_timeout,
    )
    strategy.start(grid, ArrayRecord(), num_rounds=federation.rounds, timeout=round_timeout)

    final_dir = write_published_adapter(paths, method, strategy.rounds_done, paths.root / GLOBAL_ADAPTER)
    evaluation = None
    if recipe.evaluation is not None:
        evaluation = _evaluate_and_log(recipe, base_path, final_dir, paths, strategy.rounds_done[-1], logged, console)
    summary = summarize_run(recipe, paths, [range(size) for size in sizes], base_path)
    summary["evaluation"] = evaluation
    summary["runtime"] = {"flower": {"nodes": {str(k): clients[k].node_id for k in sorted(clients)}}}
    write_json_atomic(paths.root / RUN_SUMMARY, summary)
    if recipe.hub is not None and recipe.hub.push:
        from florist_hf.hub import push

        url = push(paths.root, recipe.hub.repo_id, private=recipe.hub.private,
                   include_client_details=recipe.hub.include_client_details)
        console.print(f"pushed to {url}")
    console.print(f"global adapter: {final_dir}")
    return paths.root


# --- the ServerApp ------------------------------------------------------------------------------


def split_overrides(text: str) -> list[str]:
    """``"a.b=1; c=[1, 2]"`` -> ``["a.b=1", "c=[1, 2]"]`` (';' or newlines separate overrides)."""
    return [part.strip() for part in text.replace("\n", ";").split(";") if part.strip()]


def _fab_dir(grid: Grid) -> Path | None:
    """Where the SuperLink installed this run's Flower app (the FAB), if it came as one."""
    try:
        run = grid.run
        if not run.fab_id or not run.fab_hash:
            return None
        from flwr.common.config import get_project_dir

        return get_project_dir(run.fab_id, run.fab_version, run.fab_hash)
    except (AttributeError, RuntimeError, TypeError, ValueError):  # no run or no FAB: a Python-API simulation
        return None


def resolve_recipe_path(path: str | Path, app_dir: Path | None) -> Path:
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    for base in ([app_dir] if app_dir else []) + [Path.cwd()]:
        if (base / path).is_file():
            return base / path
    return path


def load_server_recipe(grid: Grid, run_config, *, recipe=None, overrides=(), output_dir=None):
    """The recipe this run uses: the run config's, else the factory's default, with overrides."""
    from florist_hf.recipe import Recipe, load_recipe

    source = run_config.get("recipe") or recipe
    if not source:
        raise FloristError("no recipe: set recipe = \"path/to/recipe.yaml\" in [tool.flwr.app.config] or --run-config")
    extra = list(overrides) + split_overrides(str(run_config.get("overrides", "") or ""))
    if isinstance(source, Recipe):
        loaded = source
        if extra:
            raise FloristError("overrides need a recipe file; apply them to the Recipe object instead")
    else:
        loaded = load_recipe(resolve_recipe_path(source, _fab_dir(grid)), extra)
    out = run_config.get("output-dir") or output_dir
    if out:
        loaded = loaded.model_copy(update={"output_dir": str(out)})
    return loaded


def make_server_app(recipe=None, *, overrides=(), output_dir: str | Path | None = None, force: bool = False,
                    round_timeout: float | None = None, node_timeout: float = DEFAULT_NODE_TIMEOUT, console=None) -> ServerApp:
    """A ServerApp running a florist-hf federation.

    The arguments are defaults for the run config's keys (``recipe``, ``overrides``, ``output-dir``,
    ``force``, ``round-timeout``, ``node-timeout``): ``flwr run`` takes them from the app's
    pyproject.toml, a Python-API simulation from here. ``recipe`` may be a path or a ``Recipe``.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = context.run_config
        loaded = load_server_recipe(grid, run_config, recipe=recipe, overrides=overrides, output_dir=output_dir)
        timeout = float(run_config.get("round-timeout", round_timeout or 0) or 0)
        run_flower_federation(
            grid, loaded, force=bool(run_config.get("force", force)), console=console,
            round_timeout=timeout or None, node_timeout=float(run_config.get("node-timeout", node_timeout)),
        )

    return server_app


#: ``[tool.flwr.app.components] serverapp = "florist_hf.flower.server_app:app"``
app = make_server_app()
