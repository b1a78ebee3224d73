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
    Combined,
    GradientMagnitude,
    LearnedMask,
    Magnitude,
    OutputContribution,
    Taylor,
)

_BY_NAME = {
    "magnitude": Magnitude,
    "gradient": GradientMagnitude,
    "gradient_magnitude": GradientMagnitude,
    "taylor": Taylor,
    "activation": ActivationFrequency,
    "activation_frequency": ActivationFrequency,
    "learned_mask": LearnedMask,
}


def get(identifier):
    """A criterion from a name, an instance or a callable.

    Names: "magnitude", "gradient", "taylor", "activation", "learned_mask"
    (OutputContribution needs calibration data, so it has no name).
    """
    if isinstance(identifier, Criterion):
        return identifier
    if isinstance(identifier, str):
        key = identifier.lower()
        if key not in _BY_NAME:
            raise ValueError(
                f"Unknown importance criterion {identifier!r}; known names: "
                f"{sorted(_BY_NAME)}, or pass a Criterion or a callable "
                "fn(layer, granularity) -> scores."
            )
        return _BY_NAME[key]()
    if isinstance(identifier, type) and issubclass(identifier, Criterion):
        return identifier()
    if callable(identifier):
        return FunctionCriterion(identifier)
    raise TypeError(
        "An importance criterion must be a name, a "
        "dkdp_keras.importance.Criterion or a callable, got "
        f"{identifier!r}."
    )


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
    "collect_gradients",
    "get",
]
