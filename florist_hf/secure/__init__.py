"""Secure aggregation: SecAgg+ over Flower's primitives, so the server learns only sums of client arrays.

Needs the ``flower`` extra (flwr brings its secure-aggregation primitives, ``cryptography`` and pycryptodome).
"""

from florist_hf.secure.errors import SecureAggregationError
from florist_hf.secure.local import SecureSum, secure_sum
from florist_hf.secure.protocol import SecAggClient, SecAggServer, SecAggSettings, default_threshold

__all__ = ["SecAggClient", "SecAggServer", "SecAggSettings", "SecureAggregationError", "SecureSum", "default_threshold",
           "secure_sum"]
