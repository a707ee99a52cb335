"""Secure aggregation: SecAgg+ over Flower's primitives, so the server learns only sums of client arrays.

``settings`` and ``errors`` import nothing cryptographic (the recipe reads them); ``protocol``,
``local`` and ``server_step`` need the ``flower`` extra (flwr, with ``cryptography`` and pycryptodome).
"""

from florist_hf.secure.errors import SecureAggregationError
from florist_hf.secure.settings import SecAggSettings, default_threshold

__all__ = ["SecAggSettings", "SecureAggregationError", "default_threshold"]
