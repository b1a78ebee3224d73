"""Threshold policies and the shared τ mechanism: θ_i = 0 if I(θ_i) < τ."""

from dkdp_keras.thresholds.mechanism import (
    Floors,
    PruningResult,
    apply_masks,
    compute_masks,
    threshold_for_sparsity,
)
from dkdp_keras.thresholds.adaptive import Adaptive, sparsity_for_budget
from dkdp_keras.thresholds.schedules import (
    ConstantSparsity,
    PolynomialDecay,
    SparsityPolicy,
)

__all__ = [
    "Adaptive",
    "ConstantSparsity",
    "Floors",
    "PolynomialDecay",
    "PruningResult",
    "SparsityPolicy",
    "apply_masks",
    "compute_masks",
    "sparsity_for_budget",
    "threshold_for_sparsity",
]
