"""Synthetic client LoRA updates for server-step benchmarks: random factors (the worst case) and
updates whose spectra match trained clients (a shared signal plus client-specific parts).

    python -m benchmarks.client_updates            # fit to the quality benchmark's trained clients, compare

Trained LoRA updates are not random. Measured on the quality benchmark's FLoRIST clients (round 1,
8 clients, every q/v module; ``fit``):
- a client's singular values decay roughly as a power law, sigma_i / sigma_1 ~ i^-decay;
- clients share a little of their update: the aggregate's squared norm exceeds what independent
  clients would give, ||sum_k p_k dW_k||² / sum_k p_k² ||dW_k||² = 1 + (K - 1)-ish x shared share.

``realistic_update`` draws client k's update (unit Frobenius norm) with a power-law spectrum over
its r_k components, each of whose singular vectors leans towards the same component of one shared
matrix, so that two clients overlap in a share f of their energy (every client learns the strongest
common directions first, and directions of its own).
- a client's update is larger the more data it has (more steps): norm ~ weight^norm_exponent.
``fit`` takes ``decay`` from the clients' spectra, ``norm_exponent`` from their norms and picks
``f`` (``shared_energy``) so that the aggregate's alignment ratio matches; it then compares the
aggregate energy curves (rank at 80/90/95/99 %), which are not fitted.
Every factor is drawn from its own seed, so a client can be regenerated without the others: a
streaming benchmark holds one client at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from florist_hf.aggregation import ClientModule
from florist_hf.aggregation.linalg import energy

QUALITY_RUNS = Path(__file__).resolve().parent / "quality" / "_cache" / "runs"
#: Energy levels whose ranks summarise an energy curve.
ENERGY_LEVELS = (0.8, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class SpectrumModel:
    """What ``realistic_update`` needs; the defaults are ``fit``'s to the homogeneous-rank quality
    benchmark clients (2026-11-27), the setting of the paper's Llama-7B runs (every client r = 16)."""

    decay: float = 0.703
    shared_energy: float = 0.0397
    #: A client's update norm grows as (its data weight)^this: more data, more steps, a larger update.
    norm_exponent: float = 0.508


def _orthonormal(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """Random orthonormal columns; the first j are the same whatever ``columns`` is (nested draws)."""
    return torch.linalg.qr(torch.randn(columns, rows, generator=generator, dtype=torch.float64).T).Q


def _power_law(count: int, decay: float) -> torch.Tensor:
    return torch.arange(1, count + 1, dtype=torch.float64) ** -decay


def random_update(shape: tuple[int, int], rank: int, seed: int, dtype=torch.float32) -> ClientModule:
    """The worst case: Gaussian factors (A ~ N(0, 1/n), B ~ N(0, 1/m)), lora_alpha = 2r."""
    generator = torch.Generator().manual_seed(seed)
    m, n = shape
    lora_a = torch.randn(rank, n, generator=generator) / n**0.5
    lora_b = torch.randn(m, rank, generator=generator) / m**0.5
    return ClientModule(lora_a.to(dtype), lora_b.to(dtype), 2.0)


def realistic_update(
    shape: tuple[int, int], rank: int, client_seed: int, shared_seed: int, model: SpectrumModel, norm: float = 1.0,
    dtype=torch.float32,
) -> ClientModule:
    """One client's update as the module docstring describes, as LoRA factors with lora_alpha = 2r.

    Component i of the client has singular value ~ i^-decay (Frobenius norm ``norm``); its left and
    right vectors are sqrt(c)·(the shared matrix's i-th vector) + sqrt(1 - c)·(a vector of its own),
    c = sqrt(f): two clients' updates then overlap in a share f of their energy (c on each side).
    """
    m, n = shape
    shared = torch.Generator().manual_seed(shared_seed)
    # The shared matrix's leading vectors: the same for every client with this shared_seed.
    shared_left, shared_right = _orthonormal(m, rank, shared), _orthonormal(n, rank, shared)
    own = torch.Generator().manual_seed(client_seed)
    sigma = _power_law(rank, model.decay)
    sigma = norm * sigma / sigma.norm()
    c = math.sqrt(model.shared_energy)
    left = math.sqrt(c) * shared_left + math.sqrt(1 - c) * _orthonormal(m, rank, own)
    right = math.sqrt(c) * shared_right + math.sqrt(1 - c) * _orthonormal(n, rank, own)
    # Split sigma between the factors and mix them by a random invertible matrix, as training leaves
    # them (B and A are not orthogonal); the 2 is PEFT's scale lora_alpha / r.
    mix = torch.eye(rank, dtype=torch.float64) + 0.3 * torch.randn(rank, rank, generator=own, dtype=torch.float64) / rank**0.5
    lora_b = (left * sigma.sqrt()) @ mix / 2.0
    lora_a = torch.linalg.solve(mix, sigma.sqrt()[:, None] * right.T)
    return ClientModule(lora_a.to(dtype), lora_b.to(dtype), 2.0)


def client_updates(kind: str, shape, ranks: Sequence[int], weights: Sequence[float], seed: int,
                   model: SpectrumModel | None = None, dtype=torch.float32) -> Iterator[ClientModule]:
    """Client after client (one module each), regenerated from seeds: ``kind`` is random or realistic."""
    model = model or SpectrumModel()
    mean_weight = sum(weights) / len(weights)
    for index, (rank, weight) in enumerate(zip(ranks, weights)):
        client_seed = seed * 1_000_003 + index + 1
        if kind == "random":
            yield random_update(shape, rank, client_seed, dtype)
        elif kind == "realistic":
            norm = (weight / mean_weight) ** model.norm_exponent
            yield realistic_update(shape, rank, client_seed, seed, model, norm, dtype)
        else:
            raise ValueError(f"unknown client update kind {kind!r}: random or realistic")


# --- statistics and the fit ----------------------------------------------------------------------


def update_of(module: ClientModule) -> torch.Tensor:
    return module.scale * module.lora_b.double() @ module.lora_a.double()


def decay_exponent(sigma: torch.Tensor) -> float:
    """Least-squares slope of -log(sigma_i / sigma_1) against log i over the non-zero values."""
    sigma = sigma[sigma > sigma[0] * 1e-6]
    if sigma.numel() < 2:
        return 0.0
    x, y = torch.log(torch.arange(1, sigma.numel() + 1, dtype=torch.float64)), -torch.log(sigma / sigma[0])
    return float((x * y).sum() / (x * x).sum())


def module_statistics(clients: Sequence[ClientModule], weights: Sequence[float]) -> dict:
    """Decay exponent of each client's spectrum, the alignment ratio and the aggregate's energy ranks."""
    p = torch.tensor(weights, dtype=torch.float64)
    p = p / p.sum()
    updates = [update_of(client) for client in clients]
    aggregate = sum(weight * update for weight, update in zip(p, updates))
    independent = sum(float(weight**2 * update.norm() ** 2) for weight, update in zip(p, updates))
    sigma = torch.linalg.svdvals(aggregate)
    curve = energy(sigma)
    return {
        "decay": statistics.median(decay_exponent(torch.linalg.svdvals(u)[: c.rank]) for u, c in zip(updates, clients)),
        "alignment": float(aggregate.norm() ** 2) / independent,
        "ranks": {level: int((curve < level).sum()) + 1 for level in ENERGY_LEVELS},
    }


def trained_clients(setting: str = "homo", seed: int = 0) -> tuple[list[dict[str, ClientModule]], list[float]] | None:
    """The quality benchmark's round-1 FLoRIST clients, if its cache is here."""
    from florist_hf.adapters import client_weights, read_client_adapters

    directory = QUALITY_RUNS / setting / "sweep" / f"seed_{seed}" / "tau_0.9" / "rounds" / "1" / "clients"
    if not directory.is_dir():
        return None
    adapters = read_client_adapters(sorted(directory.iterdir()))
    return [adapter.modules for adapter in adapters], client_weights(adapters)


def summarise(per_module: Sequence[dict]) -> dict:
    return {
        "decay": statistics.median(s["decay"] for s in per_module),
        "alignment": statistics.median(s["alignment"] for s in per_module),
        "ranks": {level: statistics.median(s["ranks"][level] for s in per_module) for level in ENERGY_LEVELS},
    }


def synthetic_statistics(model: SpectrumModel, shape, ranks, weights, seeds=range(8)) -> dict:
    return summarise([
        module_statistics(list(client_updates("realistic", shape, ranks, weights, seed, model)), weights) for seed in seeds
    ])


def fit(setting: str = "homo") -> tuple[SpectrumModel, dict, dict]:
    """(model, trained statistics, synthetic statistics) for the quality benchmark's clients."""
    loaded = trained_clients(setting)
    if loaded is None:
        raise FileNotFoundError(f"no quality-benchmark clients under {QUALITY_RUNS}; run python -m benchmarks.quality first")
    clients, weights = loaded
    names = list(clients[0])
    trained = summarise([module_statistics([client[name] for client in clients], weights) for name in names])
    shape = clients[0][names[0]].shape
    ranks = [client[names[0]].rank for client in clients]
    decay = trained["decay"]
    # Update norm against data weight, on a log-log scale, over every module: the slope.
    log_weights = torch.log(torch.tensor(weights, dtype=torch.float64))
    log_weights = log_weights - log_weights.mean()
    slopes = []
    for name in names:
        log_norms = torch.log(torch.stack([update_of(client[name]).norm() for client in clients]))
        slopes.append(float((log_weights * (log_norms - log_norms.mean())).sum() / (log_weights**2).sum()))
    norm_exponent = round(statistics.median(slopes), 3)
    low, high = 0.0, 1.0  # the alignment grows with the shared energy: bisect on it
    for _ in range(12):
        middle = (low + high) / 2
        candidate = SpectrumModel(decay, middle, norm_exponent)
        if synthetic_statistics(candidate, shape, ranks, weights, range(4))["alignment"] < trained["alignment"]:
            low = middle
        else:
            high = middle
    model = SpectrumModel(round(decay, 3), round((low + high) / 2, 4), norm_exponent)
    return model, trained, synthetic_statistics(model, shape, ranks, weights)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the fit and both statistics here")
    args = parser.parse_args(argv)
    results = {}
    for setting in ("homo", "heter"):
        model, trained, synthetic = fit(setting)
        results[setting] = {"model": asdict(model), "trained": trained, "synthetic": synthetic}
        print(f"{setting}: decay {model.decay}, shared energy {model.shared_energy}, norm exponent {model.norm_exponent}")
        for label, stats in (("trained", trained), ("synthetic", synthetic)):
            ranks = ", ".join(f"{int(level * 100)}%: {rank:g}" for level, rank in stats["ranks"].items())
            print(f"  {label:9} decay {stats['decay']:.3f}  alignment {stats['alignment']:.3f}  aggregate rank at {ranks}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
