"""The adaptive threshold: τ = g(M_t, C), from the measured performance of
the teacher and a resource budget, decided at each epoch end.

`Adaptive` is the policy (its settings) and the controller's state (the
reference metric, the step, the last good masks), which it saves into and
loads from a model's `PruningState` itself. `sparsity_for_budget` is its
budget search, a pure function of a measure over masks. `DKDPCallback`
asks both at each epoch end and lets a `Pruner` write the masks.
"""

import math

import numpy as np
from keras import ops

from dkdp_keras import _validation, importance
from dkdp_keras.budget import Budget, deployed
from dkdp_keras.compaction import Counts
from dkdp_keras.counting import count_macs, count_params, has_unknown_positions, set_reference
from dkdp_keras.prunable import is_kernel_layer, iter_layers
from dkdp_keras.thresholds.mechanism import MaskPool
from dkdp_keras.thresholds.schedules import SparsityPolicy

#: The highest sparsity the budget search tries.
MAX_SPARSITY = 0.999


def sparsity_for_budget(excess, current, high=MAX_SPARSITY):
    """The smallest sparsity s in [current, high] with excess(s) <= 0, where
    excess(s) is the largest budget usage of the masks at s, minus 1.

    A bracketing secant search (regula falsi, Illinois variant): usage falls
    almost linearly with sparsity at weight granularity, so a handful of
    measurements land within 0.1% of the budget. The Illinois rule (halve
    the value kept at an end that stays twice) keeps both ends moving where
    usage is step-shaped, at unit granularity; the search stops at 1/1024 of
    the first bracket or after twenty measurements, always at a sparsity
    that meets the budget, or returns `high` when even that does not.
    """
    lo, hi = current, high
    g_lo = excess(lo)
    if g_lo <= 0:
        return lo
    g_hi = excess(hi)
    if g_hi > 0:
        return hi  # even the highest does not fit: the closest there is
    resolution = (hi - lo) / 1024
    side = 0
    for _ in range(20):
        width = hi - lo
        if width <= resolution or g_hi >= -1e-3:
            break
        mid = hi - g_hi * width / (g_hi - g_lo)
        if not lo < mid < hi:
            mid = (lo + hi) / 2
        g = excess(mid)
        if g <= 0:
            hi, g_hi = mid, g
            if side == 1:
                g_lo /= 2
            side = 1
        else:
            lo, g_lo = mid, g
            if side == -1:
                g_hi /= 2
            side = -1
    return hi


class Adaptive(SparsityPolicy):
    """τ = g(M_t, C): sparsity driven by the resource budget C and the
    teacher's measured performance M_t, decided at each epoch end by
    `DKDPCallback`.

    With s_k the sparsity after pruning event k, s_req(C) the smallest
    sparsity whose masks meet the budget (`sparsity_for_budget`, a search
    over the masks the criterion's scores give), M* the best monitored value before pruning
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
    10% (benchmarks/RESULTS.md has what this gave).

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
            be large (8 conv channels before a Flatten can carry thousands
            of weights of the next layer). Weight granularity is
            unaffected.

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
        mask, or None); `save`/`load` keep it in a model's checkpointed
        `PruningState`."""
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

    def save(self, state, layers):
        """Write the controller's state into `state` (a `PruningState`),
        masks keyed by the position of their layer in `layers` (layer
        names are numbered per process)."""
        values = self.get_state()
        for key in self.STATE:
            value = values[key]
            state.set(f"adaptive:{key}", np.float64(np.nan if value is None else value))
        masks = values["last_good_masks"]
        state.set("adaptive:has_good", np.int64(masks is not None))
        position = {layer.name: i for i, layer in enumerate(layers)}
        for name, mask in (masks or {}).items():
            state.set(f"adaptive:good:{position[name]}", mask)

    def load(self, state, layers):
        """Read back what `save` wrote (after `start`)."""
        if "adaptive:step" not in state:
            raise ValueError(
                "The checkpoint holds no Adaptive controller state: it "
                "was written by a run with another threshold policy."
            )
        values = {}
        for key in self.STATE:
            value = float(state.get(f"adaptive:{key}"))
            values[key] = None if math.isnan(value) else value
        values["last_good_masks"] = (
            {l.name: state.get(f"adaptive:good:{i}") for i, l in enumerate(layers)}
            if int(state.get("adaptive:has_good", 0)) else None
        )
        self.set_state(values)

    def drop(self, state):
        """Forget the last good masks (dead once training ended)."""
        self.last_good_masks = None
        for key in state.keys():
            if key.startswith("adaptive:good:"):
                state.remove(key)
        if "adaptive:has_good" in state:
            state.set("adaptive:has_good", np.int64(0))

    def monitored(self, logs, teacher_alias=False):
        """`(name, value)` of the monitored metric in an epoch's `logs`;
        with `teacher_alias` (a DKDPModel), "val_accuracy" reads
        "val_teacher_accuracy" when the logs have no "val_accuracy"."""
        name = self.monitor
        if name not in logs and teacher_alias and name.startswith("val_"):
            alias = "val_teacher_" + name[len("val_"):]
            if alias in logs:
                name = alias
        if name not in logs:
            raise ValueError(
                f"Adaptive watches {self.monitor!r}, which the epoch logs do "
                f"not have (they have {sorted(logs)}): pass validation_data "
                "(or validation_split) to fit, or set Adaptive(monitor=...)."
            )
        return name, float(np.asarray(logs[name]))

    def check_monitor(self, metric_names, validated):
        """Raise before training if the logs a model will write (its
        `metric_names`, with `val_` ones when `validated`) lack the monitor."""
        monitor = self.monitor
        base = monitor[len("val_"):] if monitor.startswith("val_") else None
        if base is not None:
            found = validated and (
                base in metric_names or "teacher_" + base in metric_names)
        else:
            found = monitor in metric_names
        if found:
            return
        logged = sorted(metric_names) + (
            sorted("val_" + n for n in metric_names) if validated else [])
        why = (
            "fit has no validation data: pass validation_data= or "
            "validation_split= to fit, or " if base is not None and not validated
            else ""
        )
        raise ValueError(
            f"Adaptive watches {monitor!r}, which the epoch logs will not have "
            f"(they will have {logged}): {why}set Adaptive(monitor=...) to one "
            "of them."
        )

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


def check_reachable(budget, pruner):
    """Raise, before training, if the strongest pruning `pruner` can do
    (`MAX_SPARSITY`, with its floors, protected units and unit multiple)
    leaves more than `budget` allows, naming what it leaves.

    Counted on the compacted model with every parameter it keeps but the
    zeros of its kernels: before training, biases and normalisation
    offsets are zeros that training makes non-zero."""
    if budget.input_shape is not None:
        set_reference(pruner.teacher, budget.input_shape)
    if ("macs" in budget.limits() or "latency_ms" in budget.limits()) and (
            has_unknown_positions(pruner.teacher)):
        raise ValueError(
            f"The budget {budget} limits multiply-accumulates, and model "
            f"'{pruner.teacher.name}' has layers whose outputs have unknown size "
            f"(its input shape is {tuple(pruner.teacher.inputs[0].shape)}), so they "
            "cannot be counted. Give the input shape it will run at: "
            "Budget(..., input_shape=(height, width, channels)), or fit a "
            "DKDPModel on data of that fixed shape.")
    scores = [ops.convert_to_numpy(importance.Magnitude().score(l, pruner.granularity))
              for l in pruner.layers]
    pool = pruner.build_pool(scores)

    def usage(teacher):
        small = deployed(teacher)
        params = 0
        for layer in iter_layers(small):
            kernel = getattr(layer, "kernel", None) if is_kernel_layer(layer) else None
            for variable in layer.weights:
                values = ops.convert_to_numpy(variable)
                params += (int(np.count_nonzero(values)) if variable is kernel
                           else values.size)
        shapes = (count_params(small, nonzero=False), count_macs(small, nonzero=False))
        return budget.usage(teacher, counts=Counts(params, count_macs(small), shapes))

    used = pruner.measure_with(pruner.expand(pool.masks(MAX_SPARSITY)).masks, usage)
    over = {k: v for k, v in used.items() if v > 1.0}
    if not over:
        return
    limits = budget.limits()
    fixes = ", ".join(
        f"max_{k}={limits[k]:g} (the strongest pruning leaves {limits[k] * used[k]:.4g})"
        for k in over
    )
    raise ValueError(
        f"The budget {budget} cannot be met by pruning model "
        f"'{pruner.teacher.name}' at granularity '{pruner.granularity}': "
        f"{fixes}; what pruning can never remove (the output layer's units "
        "and biases, normalisation layers, the units and weights every layer "
        "keeps by its floors) is more. Allow at least that much, or lower "
        "the floors (thresholds.Floors)."
    )


def epoch_end(policy, run, epoch, logs):
    """`policy`'s decision at the end of `epoch`, carried out through `run`
    (a `DKDPCallback`: its Pruner, best epoch, budget search and guard):
    remember the best epoch within the budget, back off if the monitored
    metric fell by more than the tolerance, else prune toward the budget."""
    name, value = policy.monitored(logs, teacher_alias=run._is_dkdp())
    if not math.isfinite(value):
        run._guard.fail(f"Adaptive's metric {name} is {value} at this epoch's end.")
    met = run._budget_met()  # once: the masks do not change before the checks
    if policy.restore_best and met:
        run._best.remember(run._teacher(), value, policy.higher_is_better)
    action = policy.observe(epoch, value)
    if action == "backoff":
        run._pruner.restore(policy.last_good_masks)
        if run.verbose:
            print(f"\nDKDP epoch {epoch + 1}: {policy.monitor} fell to {value:.4f} "
                  f"(best before pruning {policy.reference:.4f}, tolerance "
                  f"{policy.tolerance}); restored the previous masks, next "
                  f"step {policy.step:.3f}.", flush=True)
        return
    if action != "keep_good":
        return
    policy.last_good_masks = run._pruner.current_masks()
    if met:
        return
    scores = run._scores()
    if scores is None:
        return
    required = run._sparsity_for_budget(scores)
    target = policy.next_sparsity(epoch, run._pruner.sparsity(), required)
    run._prune(target, scores, fill=policy.fill_budget and target >= required)
