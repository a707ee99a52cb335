"""Flower integration (``pip install "florist-hf[flower]"``): a ServerApp and a ClientApp.

- ``florist_hf.flower.server_app:app`` — the ServerApp: ``florist-hf run``'s round loop, with
  ``FloristStrategy`` sending each client its plan and the global state and aggregating the
  replies with florist-hf's own ``aggregate_adapters`` (any method, τ, heterogeneous ranks).
- ``florist_hf.flower.client_app:app`` — the ClientApp: the same Trainer + FederatedCallback client.

Adapters travel as ArrayRecords under their PEFT key names; rank, alpha, scale and sample count
in the message's ConfigRecord/MetricRecord. The recipe drives both sides. See README.md here.
"""

from florist_hf.flower.client_app import make_client_app
from florist_hf.flower.server_app import make_server_app, run_flower_federation
from florist_hf.flower.strategy import FloristStrategy
from florist_hf.flower.simulation import run_simulation

__all__ = ["FloristStrategy", "make_client_app", "make_server_app", "run_flower_federation", "run_simulation"]
