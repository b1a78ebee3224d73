"""Importance criteria: I(θ_i) = f(θ_i) for weights, units and layers.

Criteria are small objects with one scoring method,
`criterion.score(layer, granularity)`. A plain callable
`fn(layer, granularity) -> scores` is accepted wherever a criterion is.
"""

from dkdp_keras.importance.base import (
    GRANULARITIES,
    Criterion,
    FunctionCriterion,
    collect_gradients,
)
from dkdp_keras.importance.criteria import (
    ActivationFrequency,
    GradientMagnitude,
    LearnedMask,
    Magnitude,
    OutputContribution,
    Taylor,
    Wanda,
)
from dkdp_keras.importance.registry import Combined, get

__all__ = [
    "GRANULARITIES",
    "ActivationFrequency",
    "Combined",
    "Criterion",
    "FunctionCriterion",
    "GradientMagnitude",
    "LearnedMask",
    "Magnitude",
    "OutputContribution",
    "Taylor",
    "Wanda",
    "collect_gradients",
    "get",
]
