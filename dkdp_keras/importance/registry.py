"""Criteria by name (`get`), and `Combined`, which takes criteria by name too."""

from keras import ops

from dkdp_keras.importance.base import Criterion, FunctionCriterion
from dkdp_keras.importance.criteria import (
    ActivationFrequency,
    GradientMagnitude,
    LearnedMask,
    Magnitude,
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

#: Criteria a name cannot make: they take calibration inputs.
_NEED_DATA = {"wanda": "Wanda", "output_contribution": "OutputContribution",
              "outputcontribution": "OutputContribution"}


def get(identifier):
    """A criterion from a name, an instance or a callable.

    Names: "magnitude", "gradient", "taylor", "activation", "learned_mask"
    (OutputContribution and Wanda need calibration data, so they have none).
    """
    if isinstance(identifier, Criterion):
        return identifier
    if isinstance(identifier, str):
        key = identifier.lower()
        if key in _NEED_DATA:
            raise ValueError(
                f"The {_NEED_DATA[key]} criterion measures the model on "
                "calibration inputs, so it has no name to pass: pass "
                f"importance=dkdp_keras.importance.{_NEED_DATA[key]}(x), with x "
                "examples from the training data (its docstring says how many)."
            )
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


class Combined(Criterion):
    """A weighted sum of criteria, each normalised by its mean over the
    layer's kept entries so that criteria of different scales mix:
    I = Σ_k w_k · I_k / mean(I_k).

    Args:
        criteria: a list of `(criterion, weight)` pairs, weights > 0.

    Example:

    >>> c = Combined([(Magnitude(), 1.0), (LearnedMask(), 0.5)])
    """

    def __init__(self, criteria):
        if not isinstance(criteria, (list, tuple)) or not criteria:
            raise TypeError(
                "criteria must be a non-empty list of (criterion, weight) "
                f"pairs, got {criteria!r}."
            )
        parsed = []
        for item in criteria:
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise TypeError(
                    f"each entry of criteria must be (criterion, weight), "
                    f"got {item!r}."
                )
            criterion, weight = item
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise TypeError(f"weight must be a number, got {weight!r}.")
            if not weight > 0:
                raise ValueError(f"weight must be > 0, got {weight!r}.")
            parsed.append((get(criterion), float(weight)))
        self.criteria = parsed

    @property
    def requires(self):
        kinds = []
        for criterion, _ in self.criteria:
            if criterion.requires is None:
                return None
            kinds += [k for k in criterion.requires if k not in kinds]
        return tuple(kinds)

    def gradient_statistics(self, granularity):
        names = []
        for criterion, _ in self.criteria:
            read = criterion.gradient_statistics(granularity)
            if read is None:
                return None
            names += [n for n in read if n not in names]
        return tuple(names)

    def prepare(self, model):
        for criterion, _ in self.criteria:
            criterion.prepare(model)

    def score(self, layer, granularity="weight"):
        total = None
        for criterion, weight in self.criteria:
            s = criterion.score(layer, granularity)
            if granularity != "layer":
                s = s / (ops.mean(s) + 1e-12)
            part = weight * s
            total = part if total is None else total + part
        return total

    def get_config(self):
        return {"criteria": self.criteria}
