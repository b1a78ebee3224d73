"""What the teacher ends training with: the mean of its weights over the
epochs under its final masks, or the weights of its best epoch within the
budget, or its last epoch's, whichever validates best; and the momentum of
BatchNormalization during epochs too short for its moving statistics.

`WeightAverage` and `BestEpoch` each keep their values in a model's
`PruningState`, so a resumed run ends as the uninterrupted one would;
`choose` picks among the candidates and `describe` says what was kept and
why. `DKDPCallback` runs them.
"""

import keras
import numpy as np

from dkdp_keras.prunable import iter_layers
from dkdp_keras.thresholds.adaptive import Adaptive

#: Epoch ends after a pruning event that the average leaves out: the teacher
#: is still recovering from the event.
AVERAGE_BURN_IN = 1
#: Epoch ends the average needs, after the burn-in, to replace the teacher.
MIN_AVERAGED_EPOCHS = 2
#: `settle_batchnorm`: the weight an epoch's BatchNormalization moving
#: statistics may keep of what they were before it.
BN_SETTLE = 0.05


def _set_weights(model, state, prefix):
    model.set_weights([state.get(f"{prefix}:{i}") for i in range(len(model.weights))])


class WeightAverage:
    """The running mean of a model's weights over the epoch ends under one
    set of masks (stochastic weight averaging, Izmailov et al. 2018), the
    first `AVERAGE_BURN_IN` of them left out. At a constant learning rate
    the weights wander about a minimum, and their mean generalises better
    than any one of them; BatchNormalization statistics are averaged too.

    Keys in the state: `avg:seen` (epoch ends under the masks), `avg:mask:i`
    (the masks, by layer position), `avg:w:i` (the mean).
    """

    def __init__(self, state, layers):
        self.state = state
        self.layers = layers

    def _under(self, masks):
        return all(
            np.array_equal(self.state.get(f"avg:mask:{i}"), masks[layer.name])
            for i, layer in enumerate(self.layers)
        )

    def accumulate(self, model, masks):
        """Fold this epoch end's weights of `model` into the mean if `masks`
        are those the mean is taken under and the burn-in has passed; else
        start a new mean under these masks (weights of an epoch end that
        changed the masks have not trained with them)."""
        state = self.state
        if not ("avg:seen" in state and self._under(masks)):
            for i, layer in enumerate(self.layers):  # in place: no new variables
                state.set(f"avg:mask:{i}", masks[layer.name])
            state.set("avg:seen", np.int64(0))
            return
        seen = int(state.get("avg:seen")) + 1
        state.set("avg:seen", np.int64(seen))
        count = seen - AVERAGE_BURN_IN  # epoch ends in the mean
        if count < 1:
            return
        for i, w in enumerate(model.get_weights()):
            if count == 1 or not np.issubdtype(w.dtype, np.floating):
                mean = w
            else:
                mean = state.get(f"avg:w:{i}")
                mean += (w - mean) / count
            state.set(f"avg:w:{i}", mean)

    def count(self, masks):
        """Epoch ends in the mean if it may replace the model now (enough of
        them, under `masks`), else 0."""
        count = int(self.state.get("avg:seen", 0)) - AVERAGE_BURN_IN
        if count < MIN_AVERAGED_EPOCHS or not self._under(masks):
            return 0
        return count

    def apply(self, model):
        _set_weights(model, self.state, "avg:w")

    def drop(self):
        for key in self.state.keys():
            if key.startswith("avg:"):
                self.state.remove(key)


class BestEpoch:
    """The weights (masks included) of the epoch with the best monitored
    value among those that ended within the budget. Keys: `best:value`,
    `best:w:i`."""

    def __init__(self, state):
        self.state = state

    @property
    def value(self):
        value = self.state.get("best:value")
        return None if value is None else float(value)

    def remember(self, model, value, higher_is_better):
        best = self.value
        if best is None or (value > best if higher_is_better else value < best):
            self.state.set("best:value", np.float64(value))
            for i, w in enumerate(model.get_weights()):
                self.state.set(f"best:w:{i}", w)

    def apply(self, model):
        _set_weights(model, self.state, "best:w")

    def drop(self):
        for key in self.state.keys():
            if key.startswith("best:"):
                self.state.remove(key)


def choose(values, higher_is_better):
    """The key of `values` ("average", "last", "best": validated value or
    None) to keep: an unchecked mean (value None) if there is one, else the
    best value; ties go to the mean, then to the last epoch (no change)."""
    if "average" in values and values["average"] is None:
        return "average"
    order = [k for k in ("average", "last", "best")
             if k in values and values[k] is not None]
    if not order:
        return "last" if "last" in values else None
    sign = 1.0 if higher_is_better else -1.0
    return max(order, key=lambda k: (sign * values[k], -order.index(k)))


def describe(kept, count, monitor, values, notes=()):
    """One line: what the teacher ends with, and what else was considered."""
    def show(key):
        value = values.get(key)
        return "" if value is None else f" ({monitor} {value:.4f})"

    what = {
        "average": f"the mean of its weights over the last {count} epochs "
                   "(trained with its final masks)",
        "best": "the weights of the best epoch within the budget",
        "last": "the weights of the last epoch",
    }
    others = [f"{what[k].split(' (')[0]}{show(k)}" for k in values if k != kept]
    line = f"DKDP: the teacher ends with {what[kept]}{show(kept)}"
    if others:
        line += " (also considered: " + "; ".join(others) + ")"
    if notes:
        line += "; " + "; ".join(notes)
    return line + "."


def has_batchnorm(model):
    return any(isinstance(layer, keras.layers.BatchNormalization)
               for layer in iter_layers(model))


def settle_batchnorm(model, steps_per_epoch, verbose=0):
    """Lower the momentum of every BatchNormalization layer of `model` when
    an epoch of `steps_per_epoch` steps is too short for its moving
    statistics to follow the weights (momentum ** steps > BN_SETTLE), so
    that the statistics inference uses are mostly this epoch's (with Keras'
    0.99 and 41 steps an epoch, 66% of them were still the initial 0 and 1
    after one epoch). Returns `[(layer, its own momentum)]` for
    `restore_batchnorm`; the train function is rebuilt when any changed."""
    if not steps_per_epoch:
        return []
    target = BN_SETTLE ** (1.0 / int(steps_per_epoch))
    changed = []
    for layer in iter_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.momentum > target:
            changed.append((layer, layer.momentum))
            layer.momentum = target
    if changed:
        model.make_train_function(force=True)
        if verbose:
            print(f"DKDP: {int(steps_per_epoch)} steps an epoch are too few for "
                  "BatchNormalization's moving statistics at momentum "
                  f"{max(m for _, m in changed):g}; this fit trains with momentum "
                  f"{target:.3f}.", flush=True)
    return changed


def restore_batchnorm(changed):
    for layer, momentum in changed:
        layer.momentum = momentum


# ------------------------------------------------------------- the finish
def finish(callback):
    """What `DKDPCallback`'s training ends with: the last epoch, the weight
    average or `Adaptive`'s best epoch within the budget, whichever
    validates best; then, with `Adaptive`, a prune to the budget if it is
    still not met. Sets `callback.final` and says what was kept and why.

    With validation data (a DKDPModel's `fit` hands its own over, a plain
    model's comes from `DKDPCallback(validation_data=)`), the last epoch and
    the mean are evaluated on it, so a mean that validates worse than what
    it would replace does not replace it (a mean over epochs whose
    BatchNormalization statistics were still settling can be far worse).
    Without, a model without BatchNormalization takes the mean unchecked,
    one with it keeps its last epoch."""
    adaptive = isinstance(callback.threshold, Adaptive)
    policy = callback.threshold if adaptive else None
    teacher = callback._teacher()
    within = callback._budget_met() if adaptive else True
    monitor = policy.monitor if adaptive else None
    higher = policy.higher_is_better if adaptive else True
    data = _validation_data(callback)
    last = None
    if data is not None:
        monitor, higher, last = _validate(callback, data, monitor)
        if last is None:
            data = None  # nothing to compare the mean with
    if data is None:
        last = policy.last_value if adaptive else None
    values, notes = {}, []
    if within:
        values["last"] = last
    if adaptive and policy.restore_best and callback._best.value is not None:
        values["best"] = callback._best.value
    masks = callback._pruner.current_masks()
    count = callback._average.count(masks) if within and callback.average else 0
    if count:
        if data is not None:
            saved = teacher.get_weights()
            callback._average.apply(teacher)
            values["average"] = _validate(callback, data, monitor)[2]
            teacher.set_weights(saved)
        elif has_batchnorm(teacher):
            notes.append("the mean of its weights was not taken: without validation "
                         "data it cannot be checked, and averaged BatchNormalization "
                         "statistics can be far off")
        else:
            values["average"] = None  # unchecked
    kept = choose(values, higher)
    callback.final = {"kept": kept, "monitor": monitor, "values": values,
                      "averaged_epochs": count if kept == "average" else 0}
    if kept == "average":
        callback._average.apply(teacher)
        callback.averaged_epochs = count
    elif kept == "best":
        callback._best.apply(teacher)
        policy.last_value = values["best"]
    elif kept == "last" and adaptive and values.get("last") is not None:
        policy.last_value = values["last"]
    if callback.verbose and kept is not None:
        print(describe(kept, count, monitor, values, notes), flush=True)
    if adaptive:
        _meet_budget(callback)


def _validation_data(callback):
    if callback.validation_data is not None:
        x, y = callback.validation_data
        return {"x": x, "y": y, "batch_size": None, "steps": None}
    return getattr(callback.model, "_fit_validation", None)


def _validate(callback, data, monitor):
    """(monitor, higher is better, value) of the teacher as it is now,
    evaluated on `data`; `monitor` None: accuracy if the model tracks it,
    else the loss. Names are read as the epoch logs have them (a
    DKDPModel's "val_accuracy" is its teacher's)."""
    results = callback.model.evaluate(
        data["x"], data["y"], batch_size=data.get("batch_size"),
        steps=data.get("steps"), verbose=0, return_dict=True)

    def lookup(name):
        key = name[len("val_"):] if name.startswith("val_") else name
        for candidate in (key, "teacher_" + key):
            if candidate in results:
                return float(np.asarray(results[candidate]))
        return None

    if monitor is None:
        for name, higher in (("val_accuracy", True), ("val_loss", False)):
            value = lookup(name)
            if value is not None:
                return name, higher, value
        return None, True, None
    policy = callback.threshold
    higher = policy.higher_is_better if isinstance(policy, Adaptive) else "loss" not in monitor
    return monitor, higher, lookup(monitor)


def _meet_budget(callback):
    """Prune to `Adaptive`'s budget if the teacher training ended with is
    not within it, and say honestly where that left it."""
    import warnings

    policy = callback.threshold
    if not callback._budget_met():
        scores = callback._scores()
        if scores is not None:
            callback._prune(callback._sparsity_for_budget(scores), scores,
                            fill=policy.fill_budget)
        usage = policy.budget.usage(callback._teacher())
        if max(usage.values()) > 1.0:
            warnings.warn(
                "Adaptive: the budget is NOT met: the teacher uses "
                + ", ".join(f"{k} {v:.3g}x" for k, v in usage.items())
                + " of its limits after the strongest pruning the floors allow. "
                "Loosen the budget or lower the floors.",
                stacklevel=4,
            )
            return
        warnings.warn(
            "Adaptive: the budget was not met during training, so the teacher "
            "was pruned to it after the last epoch with no training to recover: "
            "evaluate it, or train longer (Adaptive(finish_by=...)).",
            stacklevel=4,
        )
    fall = policy.final_fall()
    if fall is not None and fall > policy.tolerance:
        warnings.warn(
            f"Adaptive: the budget is met, but {policy.monitor} ended {fall:.4f} "
            f"below its best before pruning ({policy.reference:.4f}), more than "
            f"the tolerance {policy.tolerance}. Train longer, loosen the budget or "
            "raise the tolerance.",
            stacklevel=4,
        )
