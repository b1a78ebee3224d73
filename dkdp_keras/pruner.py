"""The pruning event, and the only writer of masks during training.

A `Pruner` holds a teacher's masked layers and turns importance scores and
a target sparsity into masks (`thresholds.MaskPool`: τ, floors, protected
units), writes them, keeps the BatchNormalization after each layer in step
with its units, and records what each event decided (the history of τ and
sparsity, the scores of the last decision). It decides nothing about when
or how much: that is the threshold policy's, asked by `DKDPCallback`.
"""

import warnings

import keras
import numpy as np
from keras import ops

from dkdp_keras import importance as importance_lib
from dkdp_keras.budget import deployed_counts
from dkdp_keras.counting import Snapshot, count_params, count_params_of_layer
from dkdp_keras.graph import batchnorm_after
from dkdp_keras.prunable import is_masked, iter_layers, sync_batchnorm
from dkdp_keras.grouping import UnitEntries, UnitGroup
from dkdp_keras.thresholds.mechanism import MaskPool

#: What each record of `Pruner.history` holds.
HISTORY = ("step", "tau", "sparsity", "kept_params", "before")
#: An event falls far short of its target below target - max(ABSOLUTE,
#: RELATIVE * target): 0.5 asked, less than 0.375 reached. Rounding to
#: whole units and the floors cost a few hundredths, not that much.
SHORTFALL_ABSOLUTE, SHORTFALL_RELATIVE = 0.1, 0.25
#: Layers that follow the units of the layer before them: not pruned
#: themselves, so not "unprunable" either.
_FOLLOWERS = (keras.layers.BatchNormalization, keras.layers.LayerNormalization,
              keras.layers.GroupNormalization, keras.layers.Normalization)


def is_subclassed(model):
    """True for a subclassed keras.Model, whose graph (which layer feeds
    which) cannot be read: weight pruning of its masked layers works, what
    needs the graph (units, BatchNormalization after a layer, compaction,
    MACs) does not. (`graph.check_graph_model` refuses it where the graph
    is needed.)"""
    names = {cls.__name__ for cls in type(model).__mro__}
    return "Sequential" not in names and "Functional" not in names


def kept_counts(model):
    """`(non-zero parameters, MACs per example)` of `model` as compacted
    (`budget.deployed_counts`); for a subclassed model, whose units cannot
    be removed and whose MACs cannot be counted without its graph, its
    non-zero parameters and None."""
    if is_subclassed(model):
        return count_params(model, nonzero=True), None
    return deployed_counts(model)


def count_logs(counts):
    """The epoch logs of `kept_counts`: kept_params, and kept_macs when known."""
    logs = {"kept_params": counts[0]}
    if counts[1] is not None:
        logs["kept_macs"] = counts[1]
    return logs


def falls_short(target, reached):
    """True when sparsity `reached` is far below `target` (`SHORTFALL_*`)."""
    return reached < target - max(SHORTFALL_ABSOLUTE, SHORTFALL_RELATIVE * target)


class Pruner:
    """Scores -> τ -> masks for the masked layers of one teacher.

    Args:
        teacher: the masked model whose layers are pruned.
        layers: its masked layers, in the model's order.
        importance: a criterion (`dkdp_keras.importance`).
        granularity, scope, normalize, floors, layer_importance,
            unit_multiple: as `DKDPCallback` takes them.
        protect_units: names of layers whose units are never removed.
        calibration: `(x, y, loss)` to collect gradients from before each
            scoring (a plain model has no training step that does), or None.
        warn_shortfall: warn (once) when an event without `fits` reaches a
            sparsity far below its target, and say why (`shortfall_message`):
            the target is the user's when it comes from a schedule.
        budget: at unit granularity, rank units per share of this `Budget`
            they take (`unit_prices`): each entry's normalised scores are
            divided by its price over the mean price. None: by scores alone.
    """

    def __init__(self, teacher, layers, importance, granularity="weight",
                 scope="global", normalize="lamp", floors=None, protect_units=(),
                 layer_importance=False, unit_multiple=1, calibration=None,
                 warn_shortfall=True, budget=None):
        self.teacher = teacher
        self.layers = layers
        self.importance = importance
        self.granularity = granularity
        self.scope = scope
        self.normalize = normalize
        self.floors = floors
        self.protect_units = protect_units
        self.layer_importance = layer_importance
        self.unit_multiple = unit_multiple
        self.calibration = calibration
        self.warn_shortfall = warn_shortfall
        self.budget = budget
        # A subclassed model's graph cannot be read: no BatchNormalization
        # is known to follow a layer, and weight pruning needs none.
        self.batchnorms = {} if is_subclassed(teacher) else batchnorm_after(teacher)
        # At unit granularity the pool's entries are channel groups, and
        # groups that compact could not shrink are protected.
        self.units = None
        if granularity == "unit" and not is_subclassed(teacher):
            self.units = UnitEntries(teacher, layers)
            self.protect_units = set(protect_units) | self.units.fixed
        self._pool = None
        self._snapshot = None  # the teacher's weights while none is written
        self.reset()

    def reset(self):
        """Forget every event (a new run)."""
        self.tau = 0.0
        self.events = 0
        self.history = []  # one dict per event, keys HISTORY
        self.last_decision = None
        self.bn_saved = {}  # layer name -> {"mean", "var"} of removed units
        # The running statistics predate the current masks: reset when
        # training goes on (`reset_stale_statistics`), not at the event, so
        # that a prune after the last epoch still scores from them.
        self.stale = False

    # ----------------------------------------------------------- reading
    def current_masks(self):
        return {l.name: ops.convert_to_numpy(l.kernel_mask).copy() for l in self.layers}

    def sparsity(self):
        """Fraction of the layers' kernel entries the masks zero."""
        zeros = total = 0
        for layer in self.layers:
            mask = ops.convert_to_numpy(layer.kernel_mask)
            zeros += mask.size - int(np.count_nonzero(mask))
            total += mask.size
        return zeros / total

    def nonfinite_layer(self):
        """The name of the first layer whose kernel holds NaN/Inf, or None."""
        for layer in self.layers:
            if not np.all(np.isfinite(ops.convert_to_numpy(layer.kernel))):
                return layer.name
        return None

    # ----------------------------------------------------------- scoring
    def scores(self):
        """The criterion's scores of every layer (numpy), or None (with a
        warning) when some are not finite: then no event should act."""
        if self.calibration is not None and "gradient" in (
            getattr(self.importance, "requires", None) or ("gradient",)
        ):
            for layer in self.layers:
                layer.reset_statistics()
            x, y, loss = self.calibration
            importance_lib.collect_gradients(self.teacher, x, y, loss)
        self.importance.prepare(self.teacher)
        arrays = [
            np.asarray(ops.convert_to_numpy(self.importance.score(l, self.granularity)))
            for l in self.layers
        ]
        bad = [l.name for l, a in zip(self.layers, arrays) if not np.all(np.isfinite(a))]
        if bad:
            warnings.warn(
                f"DKDPCallback: importance scores of {', '.join(bad)} contain "
                "NaN or Inf; this pruning event is skipped and the masks are "
                "unchanged.",
                stacklevel=3,
            )
            return None
        return arrays

    def _layer_weights(self):
        weights = {}
        if self.layer_importance:
            values = np.array([
                float(ops.convert_to_numpy(self.importance.score(l, "layer")))
                for l in self.layers
            ])
            mean = values.mean()
            if np.all(np.isfinite(values)) and mean > 0:
                weights = {l.name: v / mean for l, v in zip(self.layers, values)}
        if self.budget is not None and self.units is not None:
            prices = self.unit_prices()
            mean = float(np.mean(list(prices.values()))) if prices else 0.0
            if mean > 0:
                for name, price in prices.items():
                    # A unit that frees nothing of the budget is not worth
                    # removing: its scores rise out of the threshold's reach.
                    weights[name] = weights.get(name, 1.0) * mean / max(price, mean * 1e-6)
        return weights or None

    def unit_prices(self):
        """What one more unit of each pool entry takes of `budget`, as the
        sum over its limits of the share of the limit (so that a unit's
        MACs and parameters add up under a budget of both): the deployed
        model with the current masks against the same with the entry's
        last kept unit removed, counted on the graph. Entries with at most
        one unit kept (which floors keep anyway) are left out."""
        masks = self.current_masks()
        base = self.usage_with(masks, self.budget)
        prices = {}
        for entry in self.units.entries:
            if entry.name in self.protect_units:
                continue
            units = np.asarray(ops.convert_to_numpy(entry.kernel_mask)).reshape(
                -1, entry.num_units)
            alive = np.flatnonzero(units.max(axis=0) > 0)
            if alive.size <= 1:
                continue
            trial = units.copy()
            trial[:, alive[-1]] = 0.0
            trial = trial.reshape(tuple(entry.kernel.shape))
            one = (entry.expand(trial) if isinstance(entry, UnitGroup)
                   else {entry.name: trial})
            usage = self.usage_with({**masks, **one}, self.budget)
            prices[entry.name] = float(sum(base[k] - usage[k] for k in base))
        return prices

    def pool(self, scores):
        """The `MaskPool` of `scores`: normalised and sorted once per
        scoring, cut at every sparsity an event tries. Its masks are the
        entries' (see `expand`)."""
        if self._pool is None or self._pool[0] is not scores:
            self._snapshot = None  # new scores: the weights have moved
            self._pool = (scores, self.build_pool(scores, self._layer_weights()))
        return self._pool[1]

    def build_pool(self, scores, layer_weights=None):
        """A `MaskPool` of the layers (or, at unit granularity, of their
        channel groups) with `scores`, aligned with `layers`."""
        entries = self.layers
        if self.units is not None:
            entries, scores = self.units.entries, self.units.scores(self.layers, scores)
        return MaskPool(
            entries, scores, granularity=self.granularity,
            scope=self.scope, normalize=self.normalize, floors=self.floors,
            protect_units=self.protect_units, layer_weights=layer_weights,
            unit_multiple=self.unit_multiple,
        )

    def expand(self, result):
        """A pool's `PruningResult` with a mask for every layer."""
        return result if self.units is None else self.units.expand_result(result)

    def expand_masks(self, masks):
        return masks if self.units is None else self.units.expand(masks)

    def masks_for(self, sparsity, scores):
        return self.expand(self.pool(scores).masks(sparsity))

    # ----------------------------------------------------------- writing
    def assign(self, masks, batchnorm=True):
        """Write `masks`; with `batchnorm`, the BatchNormalization after
        each layer follows its units (see `_sync_batchnorm`)."""
        self._snapshot = None
        for layer in self.layers:
            if batchnorm:  # read before the mask changes
                was_dead = ops.convert_to_numpy(layer.unit_mask()) == 0
            layer.kernel_mask.assign(masks[layer.name])
            if batchnorm:
                self._sync_batchnorm(layer, masks[layer.name], was_dead)

    def usage_with(self, masks, budget):
        """`budget.usage` of the teacher as compacted with `masks`, counted
        from the masks and the graph: nothing is assigned to the model."""
        if self._snapshot is None:
            self._snapshot = Snapshot()
        counts = deployed_counts(self.teacher, masks, self._snapshot)
        return budget.usage(self.teacher, counts=counts)

    def measure_with(self, masks, measure):
        """`measure(teacher)` with `masks` assigned for the time of the call
        (restored after), for measures that need the masked model itself."""
        saved = self.current_masks()
        self.assign(masks, batchnorm=False)
        sync_batchnorm(self.teacher)  # channel masks follow, so compaction sees it
        try:
            return measure(self.teacher)
        finally:
            self.assign(saved, batchnorm=False)
            sync_batchnorm(self.teacher)

    def _sync_batchnorm(self, layer, mask, was_dead):
        """Keep the BatchNormalization after a layer in step with its units.

        A removed unit feeds exact zeros to it: a MaskedBatchNormalization's
        channel mask then zeroes its output as well. For a plain one, in
        training the batch mean and variance are 0 and it outputs beta;
        setting its moving mean and variance to 0 makes inference output
        the same beta, instead of a constant from before pruning. A unit
        that comes back (a back-off) gets its saved statistics."""
        bn = self.batchnorms.get(layer.name)
        if bn is None:
            return
        dead = mask.reshape(-1, layer.num_units).max(axis=0) == 0
        saved = self.bn_saved.setdefault(layer.name, {})
        for key, var in (("mean", bn.moving_mean), ("var", bn.moving_variance)):
            values = ops.convert_to_numpy(var).copy()
            store = saved.setdefault(key, np.zeros_like(values))
            newly_dead, revived = dead & ~was_dead, ~dead & was_dead
            store[newly_dead] = values[newly_dead]
            values[revived] = store[revived]
            values[dead] = 0.0
            var.assign(values)
        if hasattr(bn, "channel_mask"):
            bn.channel_mask.assign((~dead).astype("float32"))

    def restore(self, masks):
        """Go back to earlier masks (a back-off): not an event."""
        self.assign(masks)
        self.stale = True

    def prune(self, sparsity, scores, step, fits=None):
        """One pruning event to `sparsity` from `scores`; with `fits` (masks
        -> bool), pruned units then come back while it holds
        (`MaskPool.fill`). Returns `(result, record)`."""
        before = self.sparsity()
        result = self.pool(scores).masks(sparsity)
        if fits is not None:
            result = self.pool(scores).fill(
                result, lambda masks: fits(self.expand_masks(masks)))
        result = self.expand(result)
        self.assign(result.masks)
        self.last_decision = {
            "step": step,
            "criterion": type(self.importance).__name__,
            "granularity": self.granularity,
            "scores": {l.name: np.asarray(a) for l, a in zip(self.layers, scores)},
            "masks": {name: np.asarray(m) for name, m in result.masks.items()},
        }
        self.stale = True
        self.tau = (
            float(np.mean(list(result.tau.values())))
            if isinstance(result.tau, dict) else float(result.tau or 0.0)
        )
        self.events += 1
        record = {
            "step": step,
            "tau": self.tau,
            "sparsity": result.sparsity,
            "kept_params": kept_counts(self.teacher)[0],
            "before": before,
        }
        self.history.append(record)
        if self.warn_shortfall and fits is None and falls_short(sparsity, result.sparsity):
            self.warn_shortfall = False  # once per fit: a Pruner is made per fit
            warnings.warn(shortfall_message(self, sparsity, result, record, scores),
                          stacklevel=3)
        return result, record

    def reset_stale_statistics(self):
        """Start new running statistics if the masks changed since they
        were collected (call when training goes on)."""
        if self.stale:
            for layer in self.layers:
                layer.reset_statistics()
            self.stale = False

    # ------------------------------------------------------------- state
    # Layers are keyed by position: their names are numbered per process
    # ("dense_12"), their order is the model's.
    def save(self, state):
        state.set("events", np.int64(self.events))
        state.set("tau", np.float64(self.tau))
        state.set("stale_statistics", np.int64(self.stale))
        state.set("history", np.array(
            [[h[k] for k in HISTORY] for h in self.history], "float64"
        ).reshape(-1, len(HISTORY)))
        position = {layer.name: i for i, layer in enumerate(self.layers)}
        for name, saved in self.bn_saved.items():
            for kind, values in saved.items():
                state.set(f"bn_{kind}:{position[name]}", values)
        decision = self.last_decision
        if decision is not None:
            for i, layer in enumerate(self.layers):
                state.set(f"decision:scores:{i}",
                          np.asarray(decision["scores"][layer.name], "float32"))
            state.set("decision:step", np.int64(decision["step"]))

    def load(self, state):
        self.events = int(state.get("events", 0))
        self.tau = float(state.get("tau", 0.0))
        self.stale = bool(state.get("stale_statistics", 0))
        self.history = [
            dict(zip(HISTORY, (int(r[0]), float(r[1]), float(r[2]), int(r[3]),
                               float(r[4]) if len(r) > 4 else float("nan"))))
            for r in state.get("history", np.zeros((0, len(HISTORY))))
        ]
        self.bn_saved = {}
        for i, layer in enumerate(self.layers):
            for kind in ("mean", "var"):
                values = state.get(f"bn_{kind}:{i}")
                if values is not None:
                    self.bn_saved.setdefault(layer.name, {})[kind] = values
        self.last_decision = None
        if "decision:step" in state:
            scores = {l.name: state.get(f"decision:scores:{i}")
                      for i, l in enumerate(self.layers)}
            if all(v is not None for v in scores.values()):
                # The masks it gave are not kept: a report reads the
                # layers' own.
                self.last_decision = {
                    "step": int(state.get("decision:step")),
                    "criterion": type(self.importance).__name__,
                    "granularity": self.granularity, "scores": scores,
                    "masks": None,
                }

    @staticmethod
    def drop(state):
        """Forget the last decision's scores (dead once training ended)."""
        for key in state.keys():
            if key.startswith("decision:"):
                state.remove(key)


def _named(names, shown=4):
    said = ", ".join(f"'{n}'" for n in names[:shown])
    return said + (f" and {len(names) - shown} more" if len(names) > shown else "")


def shortfall_message(pruner, target, result, record, scores):
    """Why pruning event `record` reached `result.sparsity`, far below
    `target`: what the masked layers can reach at most, which of them keep
    their units (protected), and which layers with weights are not
    prunable at all, with their share of the model's parameters."""
    teacher, layers = pruner.teacher, pruner.layers
    ceiling = pruner.masks_for(0.999, scores).sparsity
    entries = sum(int(np.prod(l.kernel_mask.shape)) for l in layers)
    total = count_params(teacher, nonzero=False)
    line = (f"DKDPCallback: the pruning event at step {record['step']} asked for "
            f"sparsity {target:.2f} and reached {result.sparsity:.2f} (of the masked "
            f"layers' kernels; the model's parameters fell by "
            f"{1 - record['kept_params'] / max(total, 1):.2f}), and no event of "
            f"this fit can reach more than {ceiling:.2f} at granularity "
            f"'{pruner.granularity}'. Prunable (masked): {len(layers)} layer"
            f"{'s' if len(layers) > 1 else ''}, {_named([l.name for l in layers])}.")
    protected = [l for l in layers if l.name in pruner.protect_units]
    if protected and pruner.granularity == "unit":
        share = sum(int(np.prod(l.kernel_mask.shape)) for l in protected) / entries
        line += (f" Protected: {_named([l.name for l in protected])}, whose units are "
                 "the model's outputs or are read by a layer compact cannot see "
                 "through (removing them would not shrink the model), hold "
                 f"{share:.0%} of the masked kernels.")
    kinds = {}
    for layer in iter_layers(teacher):
        if layer.weights and not is_masked(layer) and not isinstance(
                layer, _FOLLOWERS):
            count, params = kinds.get(type(layer).__name__, (0, 0))
            kinds[type(layer).__name__] = (count + 1, params + count_params_of_layer(layer))
    if kinds:
        share = sum(p for _, p in kinds.values()) / max(total, 1)
        line += (" Not prunable: " + ", ".join(
            f"{kind} ({count} layer{'s' if count > 1 else ''}, {params:,} parameters)"
            for kind, (count, params) in sorted(kinds.items())) +
            f", {share:.0%} of the model's parameters: only Dense, Conv1D/2D/3D "
            "and DepthwiseConv1D/2D layers are masked (dkdp_keras.prunable "
            "names what it left out).")
    ways = []
    if protected and pruner.granularity == "unit":
        ways.append("prune weights (granularity='weight')")
    if kinds:
        ways.append("build the model from prunable layers")
    if not ways:
        return line + (f" Ask for at most {ceiling:.2f}, or lower the floors "
                       "(DKDPCallback(floors=thresholds.Floors(...))).")
    return line + f" To prune more, {' or '.join(ways)}; else ask for at most {ceiling:.2f}."
