"""Threshold policies: how much to prune at each step.

A policy answers `sparsity_at(step)` (the target fraction of zeroed kernel
weights); the mechanism in `dkdp_keras.thresholds.mechanism` turns a target
and importance scores into τ and masks. `Adaptive` decides from the model's
measured performance and the resource budget instead of the step alone.
"""

from dkdp_keras import _validation
from dkdp_keras.budget import Budget


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


class Adaptive(SparsityPolicy):
    """τ = g(M_t, C): sparsity driven by the budget C and the model's
    measured performance M_t (behaviour: see DKDPCallback).

    Args:
        budget: a `Budget`, the resource constraint C.
        monitor: the metric watched for damage, from the epoch logs
            ("val_accuracy", "val_teacher_accuracy", "val_loss", ...).
        tolerance: how far (absolute) the monitored metric may fall below
            its best value before pruning started, in [0, 1).
        mode: "max", "min" or "auto" (from the metric's name).
        initial_step: first increase of sparsity per pruning event, (0, 1).
        min_step: smallest increase after back-offs, (0, initial_step].
        backoff: factor applied to the step after a back-off, (0, 1).
        recovery_events: pruning events to wait after a back-off, >= 0.

    Example:

    >>> policy = Adaptive(Budget(max_params=60_000), tolerance=0.005)
    """

    def __init__(self, budget, monitor="val_accuracy", tolerance=0.005,
                 mode="auto", initial_step=0.2, min_step=0.01, backoff=0.5,
                 recovery_events=1):
        if not isinstance(budget, Budget):
            raise TypeError(
                "budget must be a dkdp_keras.Budget (for example "
                f"Budget(max_params=60_000)), got {budget!r}."
            )
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(
                f"monitor must be a metric name such as 'val_accuracy', got "
                f"{monitor!r}."
            )
        self.budget = budget
        self.monitor = monitor
        self.tolerance = _validation.number(
            "tolerance", tolerance, low=0.0, high=1.0, high_open=True
        )
        self.mode = _validation.choice("mode", mode, ("auto", "max", "min"))
        self.initial_step = _validation.number(
            "initial_step", initial_step, low=0.0, high=1.0,
            low_open=True, high_open=True,
        )
        self.min_step = _validation.number(
            "min_step", min_step, low=0.0, high=self.initial_step,
            low_open=True,
        )
        self.backoff = _validation.number(
            "backoff", backoff, low=0.0, high=1.0, low_open=True,
            high_open=True,
        )
        self.recovery_events = _validation.number(
            "recovery_events", recovery_events, low=0, integer=True
        )

    @property
    def higher_is_better(self):
        if self.mode != "auto":
            return self.mode == "max"
        name = self.monitor.lower()
        return not ("loss" in name or "error" in name)

    def get_config(self):
        return {
            "budget": self.budget,
            "monitor": self.monitor,
            "tolerance": self.tolerance,
            "mode": self.mode,
            "initial_step": self.initial_step,
            "min_step": self.min_step,
            "backoff": self.backoff,
            "recovery_events": self.recovery_events,
        }
