"""The Flower ServerApp: ``florist-hf run``'s round loop with Flower carrying the messages (the
driver and its run config here; the strategy in `strategy.py`, the nodes in `nodes.py`).

``FloristStrategy`` is a Flower (Message API) strategy that drives florist-hf's round engine
(`florist_hf.engine.Federation`), as ``florist-hf run`` does: every reply's adapter is written to the
run directory as a PEFT adapter (the same ``rounds/<t>/clients/client_<k>`` layout), and the engine
accepts, aggregates, records and publishes exactly as it does for ``florist-hf run``.
Any method, any τ, heterogeneous ranks: whatever the recipe says.

Run config (``[tool.flwr.app.config]`` or ``flwr run --run-config``):
    recipe          path of the recipe YAML; a relative path is looked up in the Flower app
                    (the FAB: put the recipe beside pyproject.toml) and then in the working directory
    overrides       ';'-separated ``key=value`` overrides, as ``florist-hf run --set`` takes them
    output-dir      where the run is written (default: the recipe's output_dir)
    force           continue a run directory that holds another recipe (as florist-hf run --force:
                    new server settings re-aggregate, a change to client training is refused)
    round-timeout   seconds to wait for a round's replies (default 21600, 6 h; 0: no limit); then
                    the round aggregates the replies it has if federation.min_clients holds
    node-timeout    seconds to wait until every client's SuperNode has connected
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from florist_hf.errors import FloristError
from florist_hf.flower.nodes import DEFAULT_NODE_TIMEOUT, DEFAULT_ROUND_TIMEOUT, ArrivingReplies, discover_clients
from florist_hf.flower.strategy import FloristStrategy


def run_flower_federation(grid: Grid, recipe, *, force: bool = False, console=None,
                          round_timeout: float | None = None, node_timeout: float = DEFAULT_NODE_TIMEOUT) -> Path:
    """The ServerApp's work: discover the clients, run every round through Flower, publish; returns the run dir."""
    from florist_hf.data import prepare_client_data
    from florist_hf.engine import Federation
    from florist_hf.loading import load_tokenizer

    federation = Federation(recipe, console=console)
    try:
        base_path = federation.open(force=force)
        console = federation.console
        clients = discover_clients(grid, recipe, timeout=node_timeout, console=console)
        sizes = [clients[k].num_samples for k in range(recipe.federation.num_clients)]
        tokenizer, test_records = None, []
        if recipe.federation.eval_heldout_loss:
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
        console.print(federation.describe(sizes, " on Flower"))
        federation.ensure_initial_adapter()
        strategy = FloristStrategy(federation, clients, tokenizer=tokenizer, test_records=test_records, round_timeout=round_timeout)
        # Streaming aggregation folds each reply in as it arrives, so replies are handed over one by one.
        driving_grid = ArrivingReplies(grid) if federation.method.streaming else grid
        strategy.start(driving_grid, ArrayRecord(), num_rounds=recipe.federation.rounds, timeout=round_timeout)
        final_dir = federation.finish(sizes, runtime={"flower": {"nodes": {str(k): clients[k].node_id for k in sorted(clients)}}})
    finally:
        federation.close()  # the run directory is released however the run ends
    console.print(f"global adapter: {final_dir}")
    return federation.paths.root


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
                    round_timeout: float = DEFAULT_ROUND_TIMEOUT, node_timeout: float = DEFAULT_NODE_TIMEOUT,
                    console=None) -> ServerApp:
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
        timeout = float(run_config.get("round-timeout", round_timeout) or 0)  # 0: no limit
        run_flower_federation(
            grid, loaded, force=bool(run_config.get("force", force)), console=console,
            round_timeout=timeout or None, node_timeout=float(run_config.get("node-timeout", node_timeout)),
        )

    return server_app


#: ``[tool.flwr.app.components] serverapp = "florist_hf.flower.server_app:app"``
app = make_server_app()
