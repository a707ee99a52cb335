"""Differential privacy's accounting and secrets: the ε of record-level and client-level budgets over
the rounds of a federation (Opacus' accountants), the noise calibrated to a target ε, the secret seed
the noise is drawn from, and what a run guarantees. The client's DP-SGD is `florist_hf.clients.dp_sgd`;
the server's bounding and central noise of a round is `server.round_bounding` (its math in
`aggregation.bounding`).

Record level (``privacy.mode: dp_sgd``): a client's ε after round t composes every round it took part
in (Opacus' accountant over ``steps × rounds`` steps at (σ, q)).

Client level (``federation.central_dp``: fedit and ffa, florist under secure aggregation): one step
per round at q = n/K (the clients sampled of all), the Poisson-subsampled Gaussian's accountant as the
usual approximation of fixed-size sampling (as DP-FedAvg does). FLoRIST's round noises two sums at
√2·σ each, which together are one Gaussian mechanism at σ (`server.UpdateBounding.noised_sums`).

The noise and the Poisson draws come from a secret seed kept in the run directory (or a Flower node's
own work directory), never from the recipe, so that nobody who reads the recipe can subtract the
noise; a resumed run reads the same secret and ends where an uninterrupted one ends.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import secrets
import warnings
from pathlib import Path

from florist_hf.errors import FloristError

#: The secret seed's file, in the run directory (never uploaded) or a Flower node's work directory.
SECRET_SEED_FILE = "privacy-seed"


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv") -> float:
    """ε of ``steps`` Poisson-subsampled Gaussian steps at (σ, q), by Opacus' accountant."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    return _epsilon(float(noise_multiplier), float(sample_rate), int(steps), float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    ledger = create_accountant(mechanism=accountant)
    ledger.history = [(noise_multiplier, sample_rate, steps)]
    with _edge_orders_quiet():
        return float(ledger.get_epsilon(delta=delta))


@contextlib.contextmanager
def _edge_orders_quiet():
    """Opacus' RDP accountant warns when the best order is the smallest (largest) it tries, as at a large (tiny)
    ε: the bound is valid, only not the tightest; nothing for a user to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        yield


@functools.lru_cache(maxsize=1024)
def calibrated_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest σ (to Opacus' search tolerance) whose ``steps`` steps at rate q spend at most ε."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with _edge_orders_quiet():
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                              steps=steps, accountant=accountant, epsilon_tolerance=0.01))
    except ValueError:
        raise FloristError(f"target_epsilon {target_epsilon} cannot be reached over {steps} steps at sampling rate "
                           f"{sample_rate:.4g} (σ would exceed 10⁶); raise the budget or train fewer steps") from None


def require_opacus() -> None:
    """One line when Opacus, which DP accounting and DP-SGD need, is not installed."""
    import importlib.util

    if importlib.util.find_spec("opacus") is None:
        raise FloristError("differential privacy needs Opacus: pip install 'florist-hf[dp]' (opacus 1.6)")


def central_delta(central_dp, num_clients: int) -> float:
    """δ of the client-level guarantee: the recipe's, else 1 / the clients."""
    return central_dp.delta if central_dp.delta is not None else 1.0 / num_clients


def central_epsilon(central_dp, noise_multiplier: float, sample_rate: float, rounds: int, num_clients: int) -> float:
    """Client-level ε of ``rounds`` rounds of DP-FedAvg at noise σ and client sampling rate q."""
    return epsilon(noise_multiplier, sample_rate, rounds, central_delta(central_dp, num_clients), central_dp.accountant)


def central_noise_multiplier(central_dp, sample_rate: float, rounds: int, num_clients: int) -> float:
    """The recipe's client-level σ, or the one calibrated to its target ε over ``rounds`` rounds."""
    if central_dp.noise_multiplier is not None:
        return central_dp.noise_multiplier
    return calibrated_noise(central_dp.target_epsilon, central_delta(central_dp, num_clients), sample_rate, rounds,
                            central_dp.accountant)


def secret_seed(directory: Path) -> bytes:
    """The secret the noise is drawn from, created once in ``directory`` (readable by its owner alone)."""
    directory = Path(directory)
    path = directory / SECRET_SEED_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f".{SECRET_SEED_FILE}.{os.getpid()}"
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(staging, path)  # the first writer's secret wins; a concurrent one reads it
    except FileExistsError:
        pass
    finally:
        staging.unlink()
    return bytes.fromhex(path.read_text().strip())


def derived_seed(secret: bytes, *parts) -> int:
    """A 63-bit generator seed for one use of the secret (a client's round, a server round, ...)."""
    digest = hashlib.sha256(secret + repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# --- what a run guarantees --------------------------------------------------------------------------


def privacy_summary(recipe, metrics: list[dict], rounds_done, last_sidecar: dict | None) -> dict | None:
    """What a run guarantees and bounds (run.json, the model card): each client's record-level
    (ε, δ) after its last round, the client-level ε of central DP, the update bound, the robust rule,
    and secure aggregation (what the server learned: sums over each round's clients, never a client's update)."""
    federation = recipe.federation
    summary: dict = {}
    if recipe.privacy is not None:
        last: dict = {}
        for record in metrics:
            if record.get("kind") == "client" and "epsilon" in record and record.get("round") in rounds_done:
                last[record["client"]] = record
        if last:
            summary["record_level"] = {
                "mechanism": "DP-SGD (Opacus)", "accountant": recipe.privacy.accountant,
                "max_grad_norm": recipe.privacy.max_grad_norm,
                "epsilon_max": max(record["epsilon"] for record in last.values()),
                "delta_max": max(record["delta"] for record in last.values()),
                "per_client": {str(client): {"epsilon": record["epsilon"], "delta": record["delta"]}
                               for client, record in sorted(last.items())},
            }
    if federation.clip_update_norm is not None:
        summary["clip_update_norm"] = federation.clip_update_norm
    if federation.central_dp is not None and last_sidecar is not None:
        central = (last_sidecar.get("bounding") or {}).get("central_dp", {})
        from florist_hf.aggregation import METHODS, SKETCH_SUMS

        noised = ("Gaussian noise on the two sketch sums of the clipped updates, √2·σ on each"
                  if METHODS[federation.method].central_dp_on == SKETCH_SUMS else "Gaussian noise on the clipped mean")
        summary["client_level"] = {"mechanism": f"DP-FedAvg ({noised})",
                                   **{key: central.get(key) for key in ("epsilon", "delta", "noise_multiplier", "sample_rate",
                                                                        "accountant", "rounds")}}
    if federation.robust is not None:
        summary["robust"] = federation.robust
    secure = (last_sidecar or {}).get("secure_aggregation")
    if federation.secure() is not None and secure is not None:
        summary["secure_aggregation"] = {key: secure.get(key) for key in ("protocol", "threshold", "sums", "needs")}
    return summary or None
