"""A Flower simulation of a recipe from Python: one virtual SuperNode per client.

The same ServerApp and ClientApp as ``flwr run``, on Flower's Simulation Runtime, which runs the
ClientApps on Ray (``pip install "flwr[simulation]>=1.41,<1.42"``; flwr 1.41 has no other backend).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from florist_hf.errors import FloristError


def run_simulation(recipe, *, overrides=(), output_dir: str | Path | None = None, work_dir: str | Path | None = None,
                   num_cpus: float = 1, num_gpus: float = 0, force: bool = False, console=None,
                   backend_config: dict | None = None) -> Path:
    """Run ``recipe`` (a path or a ``Recipe``) as a Flower simulation; returns the run directory.

    ``num_cpus``/``num_gpus`` are each client's Ray resources (how many train at once);
    ``work_dir`` is where the virtual clients keep their files (default: the system temp dir).
    """
    from florist_hf.flower.client_app import make_client_app
    from florist_hf.flower.server_app import make_server_app
    from florist_hf.recipe import Recipe, load_recipe

    if importlib.util.find_spec("ray") is None:
        raise FloristError('Flower simulation needs Ray: pip install "flwr[simulation]>=1.41,<1.42"')
    from flwr.simulation import run_simulation as flwr_run_simulation

    loaded = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, list(overrides))
    if output_dir is not None:
        loaded = loaded.model_copy(update={"output_dir": str(output_dir)})
    config = backend_config or {"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}}
    flwr_run_simulation(
        server_app=make_server_app(loaded, force=force, console=console),
        client_app=make_client_app(work_dir),
        num_supernodes=loaded.federation.num_clients,
        backend_config=config,
    )
    return Path(loaded.output_dir)
