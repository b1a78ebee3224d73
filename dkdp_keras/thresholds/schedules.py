"""Threshold policies: how much to prune at each step.

A policy answers `sparsity_at(step)` (the target fraction of zeroed kernel
weights), a pure function of the training step; the mechanism in
`dkdp_keras.thresholds.mechanism` turns a target and importance scores into
τ and masks. `thresholds.adaptive.Adaptive` decides from the model's
measured performance and the resource budget instead of the step alone.
"""

from dkdp_keras import _validation


class SparsityPolicy:
    """Base class: `sparsity_at(step)` returns the target sparsity."""

    def sparsity_at(self, step):
        raise NotImplementedError

    def get_config(self):
        return {}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class ConstantSparsity(SparsityPolicy):
    """Prune to one fixed sparsity at every pruning event.

    Args:
        target: fraction of kernel weights to zero, in [0, 1).

    Example:

    >>> ConstantSparsity(0.9).sparsity_at(123)
    0.9
    """

    def __init__(self, target):
        self.target = _validation.sparsity("target", target)

    def sparsity_at(self, step):
        return self.target

    def get_config(self):
        return {"target": self.target}


class PolynomialDecay(SparsityPolicy):
    """The gradual schedule of Zhu & Gupta (2017):

        s_t = s_f + (s_i − s_f) · (1 − (t − t_0) / (t_1 − t_0))^p

    for t_0 <= t <= t_1, s_i before t_0 and s_f after t_1. Sparsity rises
    fast at first, while the network has many redundant weights, and slowly
    near the end.

    Args:
        initial_sparsity: s_i in [0, 1).
        final_sparsity: s_f in [0, 1), at least s_i.
        begin_step: t_0 >= 0.
        end_step: t_1 > t_0.
        power: p >= 1 (3 in the paper).

    Example:

    >>> PolynomialDecay(0.0, 0.8, 0, 100).sparsity_at(100)
    0.8
    """

    def __init__(self, initial_sparsity, final_sparsity, begin_step, end_step,
                 power=3):
        self.initial_sparsity = _validation.sparsity(
            "initial_sparsity", initial_sparsity
        )
        self.final_sparsity = _validation.sparsity(
            "final_sparsity", final_sparsity
        )
        if self.final_sparsity < self.initial_sparsity:
            raise ValueError(
                f"final_sparsity ({final_sparsity!r}) must be at least "
                f"initial_sparsity ({initial_sparsity!r})."
            )
        self.begin_step = _validation.number(
            "begin_step", begin_step, low=0, integer=True
        )
        self.end_step = _validation.number("end_step", end_step, integer=True)
        if self.end_step <= self.begin_step:
            raise ValueError(
                f"end_step ({end_step!r}) must be after begin_step "
                f"({begin_step!r})."
            )
        self.power = _validation.number("power", power, low=1.0)

    def sparsity_at(self, step):
        t = min(max(step, self.begin_step), self.end_step)
        progress = (t - self.begin_step) / (self.end_step - self.begin_step)
        return self.final_sparsity + (
            self.initial_sparsity - self.final_sparsity
        ) * (1.0 - progress) ** self.power

    def get_config(self):
        return {
            "initial_sparsity": self.initial_sparsity,
            "final_sparsity": self.final_sparsity,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "power": self.power,
        }
