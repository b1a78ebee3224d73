"""Threshold policies: how much to prune at each step.

A policy answers `sparsity_at(step)` (the target fraction of zeroed kernel
weights); the mechanism in `dkdp_keras.thresholds.mechanism` turns a target
and importance scores into τ and masks. `Adaptive` decides from the model's
measured performance and the resource budget instead of the step alone.
"""

import math

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
    """τ = g(M_t, C): sparsity driven by the resource budget C and the
    teacher's measured performance M_t, decided at each epoch end by
    `DKDPCallback`.

    With s_k the sparsity after pruning event k, s_req(C) the smallest
    sparsity whose masks meet the budget (found by bisection on the masks the
    criterion's scores give), M* the best monitored value before pruning
    started, ε the tolerance, δ_k the step and e_D the deadline epoch
    (`finish_by` of the epochs):

        if M_t >= M* − ε:   s_{k+1} = min(s_req,
                                      s_k + max(δ_k (1 − s_k), (s_req − s_k) / (e_D − e))),
                            or s_req if that leaves less than min_step (1 − s_k) to go
        if M_t <  M* − ε:   masks ← masks of the last good event,
                            δ_{k+1} = max(backoff · δ_k, min_step),
                            then `recovery_events` epochs without pruning
        at e_D:             s = s_req (the budget is a hard constraint)
        when s = s_req:     pruned units come back, best first, while the
                            budget holds (`fill_budget`)
        τ_{k+1}:            the score below which the fraction s_{k+1} of
                            weights falls (`thresholds.compute_masks`)

    ("M_t < M* − ε" reads "M_t > M* + ε" for metrics where lower is
    better.) Each event removes the fraction δ_k of the weights (or units)
    still kept, so that steps shrink as the model does, as in the cubic
    schedule of Zhu & Gupta 2017: 22.5% of the kept weights per event reaches
    90% in nine events, the last one taking 2.9% of the parameters rather than
    10%, half of those left (on LeNet-300-100, Fashion-MNIST: 89.00% test at
    10% of the parameters against 88.67% with steps of 0.1 sparsity; 88.39%
    against 87.95% at 5%).

    Restored weights regrow from their stored values: a mask hides a weight
    without erasing it, and a pruned weight receives no gradient (only the
    optimizer's decaying momentum can still move it).
    When training ends with the budget met but the metric more than ε below
    M*, a warning says how far it fell.

    Budget measures are the ones of `dkdp_keras.Budget`: parameters and MACs
    counted over the kept structure, bytes from parameters, latency
    estimated from MACs against the dense model's measured latency.

    Args:
        budget: a `Budget`, the resource constraint C.
        monitor: the metric watched for damage ("val_accuracy"; for a
            DKDPModel, "val_accuracy" reads "val_teacher_accuracy").
        tolerance: ε, how far (absolute) the metric may fall, in [0, 1).
        mode: "max", "min" or "auto" (from the metric's name).
        initial_step: δ_0, the fraction of the kept weights (units) an
            event removes at least, in (0, 1); 0.225 reaches 90% sparsity
            in nine events, 80% in seven.
        min_step: smallest δ after back-offs, in (0, initial_step]; an event
            that would leave less than this fraction of the kept weights
            to the budget goes to the budget at once.
        backoff: factor applied to the step after a back-off, in (0, 1).
        recovery_events: epochs without pruning after a back-off, >= 0.
        warmup_epochs: epochs of training before the first pruning, >= 1.
        finish_by: fraction of the epochs by whose end the budget is met,
            in (0, 1]; later epochs fine-tune the pruned model.
        restore_best: if True, training ends with the teacher's weights
            and masks of the epoch with the best monitored value among the
            epochs that ended within the budget (early stopping on the
            validation metric; the budget still holds).
        fill_budget: if True, the event that reaches the budget (and the
            pruning to it after training, if needed) then takes pruned
            units back, best first, while the budget holds
            (`MaskPool.fill`). At unit granularity one step of units can
            be large: on the benchmark's CNN a 58 kB int8 budget ended at
            39,490 parameters without it, since 8 conv channels before the
            Flatten carry 18,816 weights of the next layer. Weight
            granularity is unaffected.

    Example:

    >>> policy = Adaptive(Budget(max_params=60_000), tolerance=0.005)
    """

    def __init__(self, budget, monitor="val_accuracy", tolerance=0.005,
                 mode="auto", initial_step=0.225, min_step=0.01, backoff=0.5,
                 recovery_events=1, warmup_epochs=1, finish_by=0.75,
                 restore_best=True, fill_budget=True):
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
        self.warmup_epochs = _validation.number(
            "warmup_epochs", warmup_epochs, low=1, integer=True
        )
        self.finish_by = _validation.number(
            "finish_by", finish_by, low=0.0, high=1.0, low_open=True
        )
        if not isinstance(restore_best, bool):
            raise TypeError(
                f"restore_best must be True or False, got {restore_best!r}."
            )
        self.restore_best = restore_best
        if not isinstance(fill_budget, bool):
            raise TypeError(
                f"fill_budget must be True or False, got {fill_budget!r}."
            )
        self.fill_budget = fill_budget
        self.start(None, 1)

    @property
    def higher_is_better(self):
        if self.mode != "auto":
            return self.mode == "max"
        name = self.monitor.lower()
        return not ("loss" in name or "error" in name)

    def sparsity_at(self, step):
        raise TypeError(
            "Adaptive decides from the model's metrics and budget, not from "
            "the step alone: use it through DKDPCallback(threshold=...)."
        )

    # ----------------------------------------------------------- controller
    def start(self, model, epochs):
        """Reset the controller for a training run of `epochs` epochs."""
        self.epochs = int(epochs)
        self.deadline = max(
            self.warmup_epochs - 1, math.ceil(self.finish_by * self.epochs) - 1
        )
        self.reference = None
        self.last_value = None
        self.step = self.initial_step
        self.started = False
        self.recovering = 0
        self.backoffs = 0
        self.last_good_masks = None

    def _fall(self, value):
        """How far `value` is worse than the reference (positive = worse)."""
        if self.reference is None:
            return 0.0
        return (self.reference - value) if self.higher_is_better else (
            value - self.reference
        )

    def observe(self, epoch, value):
        """Take the epoch's monitored value; return what to do:
        "warmup", "recovering", "backoff" or "keep_good" (the current masks
        are good: prune further unless the budget is met)."""
        self.last_value = value
        if not self.started:
            if self.reference is None or self._fall(value) < 0:
                self.reference = value
            if epoch + 1 >= self.warmup_epochs:
                self.started = True
                return "keep_good"
            return "warmup"
        if self.recovering > 0:
            self.recovering -= 1
            return "recovering"
        damaged = self._fall(value) > self.tolerance
        if damaged and epoch < self.deadline and self.last_good_masks is not None:
            self.step = max(self.step * self.backoff, self.min_step)
            self.recovering = self.recovery_events
            self.backoffs += 1
            return "backoff"
        return "keep_good"

    def next_sparsity(self, epoch, current, required):
        """s_{k+1} from s_k = `current` and s_req = `required`."""
        if epoch >= self.deadline:
            return required
        remaining = max(1, self.deadline - epoch)
        kept = 1.0 - current
        step = max(self.step * kept, (required - current) / remaining)
        target = min(required, current + step)
        # A remainder below the smallest step would cost one more event,
        # whose mask change restarts the fine-tuning (and the averaging) for
        # a few weights: steps to 90% under a budget of 10% of the
        # parameters (biases counted) left 0.9 -> 0.9003 for the next epoch.
        if required - target < self.min_step * kept:
            return required
        return target

    #: The controller's state, as `get_state` returns it (masks aside).
    STATE = ("reference", "last_value", "step", "started", "recovering",
             "backoffs")

    def get_state(self):
        """The controller's state after `start`, as a dict: the numbers of
        `STATE` (None where unset) and `last_good_masks` (dict layer name ->
        mask, or None). `DKDPCallback` keeps it in the model's checkpointed
        state, so that a resumed run continues with it."""
        state = {name: getattr(self, name) for name in self.STATE}
        state["last_good_masks"] = self.last_good_masks
        return state

    def set_state(self, state):
        """Restore what `get_state` returned (after `start`)."""
        missing = [name for name in self.STATE if name not in state]
        if missing:
            raise ValueError(f"Adaptive state lacks {missing}.")
        self.reference = state["reference"]
        self.last_value = state["last_value"]
        self.step = float(state["step"])
        self.started = bool(state["started"])
        self.recovering = int(state["recovering"])
        self.backoffs = int(state["backoffs"])
        self.last_good_masks = state.get("last_good_masks")

    def final_fall(self):
        """How far the last monitored value is below the reference."""
        if self.reference is None or self.last_value is None:
            return None
        return self._fall(self.last_value)

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
            "warmup_epochs": self.warmup_epochs,
            "finish_by": self.finish_by,
            "restore_best": self.restore_best,
            "fill_budget": self.fill_budget,
        }
