"""Pure tensor math for federated LoRA aggregation: one module per method, registered by name.

No Hugging Face imports here: methods take per-module client factors and return global factors.
"""

from florist_hf.aggregation import fedex, fedit, fedsvd, ffa, flexlora, flora, florist  # noqa: F401  (registers methods)
from florist_hf.aggregation.base import (
    FACTOR_SUMS,
    FACTORS,
    METHODS,
    NEEDS,
    SKETCH_SUMS,
    AggregationMethod,
    get_method,
    method_class,
    method_from_settings,
    register_method,
)
from florist_hf.aggregation.communication import CommunicationReport, round_communication
from florist_hf.aggregation.ffa import SharedAMismatch
from florist_hf.aggregation.linalg import energy, product_svd, select_rank, sum_of_updates
from florist_hf.aggregation.types import AggregationResult, ClientModule, ModuleAggregate

__all__ = [
    "FACTORS",
    "FACTOR_SUMS",
    "METHODS",
    "NEEDS",
    "SKETCH_SUMS",
    "AggregationMethod",
    "AggregationResult",
    "ClientModule",
    "CommunicationReport",
    "ModuleAggregate",
    "SharedAMismatch",
    "energy",
    "get_method",
    "method_class",
    "method_from_settings",
    "product_svd",
    "register_method",
    "round_communication",
    "select_rank",
    "sum_of_updates",
]
