"""Flower integration (``pip install "florist-hf[flower]"``): a ServerApp and a ClientApp.

- ``florist_hf.flower.server_app:app`` — the ServerApp: ``florist-hf run``'s round loop, with
  ``FloristStrategy`` sending each client its plan and the global state and aggregating the
  replies with florist-hf's own ``aggregate_adapters`` (any method, τ, heterogeneous ranks).
- ``florist_hf.flower.client_app:app`` — the ClientApp: the same Trainer + FederatedCallback client.

Adapters travel as ArrayRecords under their PEFT key names; rank, alpha, scale and sample count
in the message's ConfigRecord/MetricRecord. The recipe drives both sides. See README.md here.
"""

import importlib

#: Each export and the module it lives in, imported on first use: a ClientApp process (a fresh one per
#: message) then loads only what its message needs (a secure sum's key, share and unmask stages: no torch).
_EXPORTS = {
    "FloristStrategy": "florist_hf.flower.strategy",
    "make_client_app": "florist_hf.flower.client_app",
    "make_server_app": "florist_hf.flower.server_app",
    "run_flower_federation": "florist_hf.flower.server_app",
    "run_simulation": "florist_hf.flower.simulation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
