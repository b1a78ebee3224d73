"""From importance scores and a target sparsity to τ and new masks.

θ_i = 0 where I(θ_i) < τ, with τ chosen so that the requested fraction of
the prunable weights falls below it:

- granularity "weight": entries are kernel entries (size 1 each);
  granularity "unit": entries are units, each as large as its fan-in, and τ
  is the smallest unit score for which the pruned units' weights reach the
  target fraction of all weights.
- scope "global": one τ over all layers. Each layer's scores are first
  divided by their mean over the layer's kept entries (``normalize="mean"``,
  so a score of 1 means "as important as the layer's average entry") or by
  their L2 norm over kept entries (``"l2"``, Molchanov et al. 2017), or used
  raw (``"none"``, global magnitude pruning), or turned into LAMP scores
  (``"lamp"``, Lee et al. 2021): s_u² / Σ_{v: s_v >= s_u} s_v² within the
  layer, which lets one global τ give each layer its own sparsity from the
  shape of its score distribution (large, redundant layers lose more; every
  layer's best entry scores 1 and is never below a global τ < 1).
  `layer_weights` (for instance layer-level importance) then multiply each
  layer's normalised scores, so that more important layers lose less.
- scope "layer": a τ per layer, each layer pruned to the target fraction.

Floors then restore the best entries of any layer that fell below them: at
least `min_units` units (and at least `min_fraction` of its units) keep
weights, and at least `min_fraction` of its weights stay. Layers named in
`protect_units` (the model's output layers) are never unit-pruned.

Ties are broken by position (a stable sort), so exactly the requested count
is pruned. Masks are computed eagerly with numpy between training steps;
nothing here runs inside the training graph.
"""

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from keras import ops

from dkdp_keras import _validation
from dkdp_keras.importance.base import check_granularity
from dkdp_keras.thresholds.ordering import merged_order, single_precision, stable_argsort


NORMALIZE = ("mean", "l2", "lamp", "none")


@dataclass
class Floors:
    """What every layer keeps whatever τ says.

    Args:
        min_units: units (neurons/filters) that keep weights in each layer.
        min_fraction: fraction of each layer's weights (and, at unit
            granularity, of its units) that stays.
    """

    min_units: int = 1
    min_fraction: float = 0.01

    def __post_init__(self):
        _validation.number("min_units", self.min_units, low=1, integer=True)
        _validation.number(
            "min_fraction", self.min_fraction, low=0.0, high=1.0
        )


@dataclass
class PruningResult:
    """What one pruning computation decided.

    Attributes:
        tau: the threshold (in normalised score units for scope "global");
            a dict layer name -> τ for scope "layer".
        masks: dict layer name -> new kernel mask (numpy float32).
        sparsity: fraction of prunable weights the new masks zero.
    """

    tau: object
    masks: dict = field(default_factory=dict)
    sparsity: float = 0.0


def threshold_for_sparsity(scores, sparsity, sizes=None):
    """τ and the pruned entries for one pool of scores.

    Args:
        scores: 1-D array of scores.
        sparsity: target fraction in [0, 1) of the total size to prune.
        sizes: optional 1-D array of entry sizes (weights per unit).

    Returns:
        `(tau, pruned)`: `pruned` is a boolean array, True for entries to
        prune; all of them score <= τ and all kept ones >= τ.
    """
    scores = np.asarray(scores, dtype="float64").ravel()
    _validation.sparsity("sparsity", sparsity)
    if scores.size == 0:
        raise ValueError("scores must hold at least one score, got none.")
    if not np.all(np.isfinite(scores)):
        raise ValueError(
            f"scores contain {int(np.sum(~np.isfinite(scores)))} NaN or Inf "
            "values; a threshold over them would mean nothing."
        )
    if sizes is None:
        sizes = np.ones_like(scores)
    else:
        sizes = np.asarray(sizes, "float64").ravel()
        if sizes.shape != scores.shape or not np.all(sizes > 0):
            raise ValueError(
                f"sizes must be {scores.size} positive numbers, one per score, "
                f"got shape {sizes.shape} with minimum "
                f"{sizes.min() if sizes.size else None}."
            )
    return _SortedPool(scores, sizes).cut(sparsity)


class _SortedPool:
    """Scores sorted once, cut at any number of sparsities (the Adaptive
    budget search asks for several with the same scores)."""

    def __init__(self, scores, sizes, order=None):
        self.scores = scores
        self.order = stable_argsort(scores) if order is None else order
        ordered = sizes[self.order]
        self.before = np.cumsum(ordered) - ordered
        self.total = sizes.sum()

    def cut(self, sparsity):
        scores, order = self.scores, self.order
        count = int(np.searchsorted(
            self.before, sparsity * self.total - 1e-9, side="left"
        ))
        pruned = np.zeros(scores.shape, dtype=bool)
        pruned[order[:count]] = True
        if count < scores.size:
            tau = float(scores[order[count]])
        else:
            tau = float(np.nextafter(scores.max(), np.inf))
        return tau, pruned


def _lamp(scores, with_order=False):
    """s_u² / Σ_{v: s_v >= s_u} s_v² (Lee et al. 2021, LAMP), and with
    `with_order` their stable order: they never decrease along that of s²,
    which is that of |s| when s are float32 values (squares are exact)."""
    squared = np.square(scores)
    magnitude = np.abs(scores)
    if single_precision(magnitude):
        order = stable_argsort(magnitude)
    else:
        order = np.argsort(squared, kind="stable")
    tail = np.cumsum(squared[order][::-1])[::-1]  # sum over this and larger
    out = np.zeros_like(squared)
    out[order] = np.divide(
        squared[order], tail, out=np.zeros_like(tail), where=tail > 0
    )
    return (out, order) if with_order else out


def _normalise(scores, kept, normalize):
    """`(normalised scores, their stable order)`: a positive scale keeps it."""
    if normalize == "lamp":
        return _lamp(scores, with_order=True)
    live = scores[kept] if kept.any() else scores
    scale = {"mean": lambda: float(np.mean(live)), "none": lambda: 1.0,
             "l2": lambda: float(np.sqrt(np.sum(np.square(live))))}[normalize]()
    return (scores / scale if scale > 0 else scores), stable_argsort(scores)


def compute_masks(
    layers,
    scores,
    sparsity,
    granularity="weight",
    scope="global",
    normalize="mean",
    floors=None,
    protect_units=(),
    layer_weights=None,
    unit_multiple=1,
):
    """New kernel masks that prune `sparsity` of the weights by score.

    Args:
        layers: the masked layers to prune.
        scores: a list (aligned with `layers`) of score tensors at
            `granularity` ("weight": kernel-shaped, "unit": per unit).
        sparsity: target fraction in [0, 1) of the layers' kernel weights.
        granularity: "weight" or "unit".
        scope: "global" (one τ) or "layer" (one τ per layer).
        normalize: "mean", "l2", "lamp" or "none" (scope "global" only).
        floors: a `Floors`; default `Floors()`.
        protect_units: names of layers whose units are never removed
            (at unit granularity they are left out of the pool).
        layer_weights: optional dict layer name -> multiplier of that
            layer's normalised scores (scope "global").
        unit_multiple: at unit granularity, a layer of at least
            4 × `unit_multiple` units keeps a multiple of `unit_multiple`
            units (the nearest one, at least one multiple): its best units
            by score, some pruned ones re-added or some kept ones dropped.
            Vector units run such widths faster (LiteRT on x86: see
            benchmarks/RESULTS.md). 1 turns it off.

    Returns:
        A `PruningResult`.
    """
    _validation.sparsity("sparsity", sparsity)
    return MaskPool(
        layers, scores, granularity=granularity, scope=scope,
        normalize=normalize, floors=floors, protect_units=protect_units,
        layer_weights=layer_weights, unit_multiple=unit_multiple,
    ).masks(sparsity)


class MaskPool:
    """`compute_masks` for one set of scores at many sparsities.

    Takes the arguments of `compute_masks` but the sparsity; normalising and
    sorting the scores happen once, here, and `masks(sparsity)` only cuts
    the sorted pool. The layers' current masks are read here too: build a
    new pool after they change.
    """

    def __init__(self, layers, scores, granularity="weight", scope="global",
                 normalize="mean", floors=None, protect_units=(),
                 layer_weights=None, unit_multiple=1):
        check_granularity(granularity)
        if granularity == "layer":
            raise ValueError(
                "granularity 'layer' scores share a budget between layers; it "
                "cannot itself zero weights. Prune at 'weight' or 'unit' "
                "granularity and pass layer scores as layer_weights."
            )
        _validation.choice("scope", scope, ("global", "layer"))
        _validation.choice("normalize", normalize, NORMALIZE)
        self.floors = Floors() if floors is None else floors
        self.unit_multiple = _validation.number(
            "unit_multiple", unit_multiple, low=1, integer=True
        )
        self.granularity, self.scope = granularity, scope
        if len(layers) != len(scores):
            raise ValueError(
                f"Got {len(layers)} layers and {len(scores)} score arrays."
            )
        for layer in layers:
            if not hasattr(layer, "kernel_mask"):
                raise TypeError(
                    f"layers must be masked layers (dkdp_keras.masked_layers("
                    f"model)), got {type(layer).__name__} "
                    f"'{getattr(layer, 'name', layer)}'."
                )
        layer_weights = layer_weights or {}

        # (layer, scores 1-D, sizes 1-D, current kept 1-D, poolable,
        #  function giving the indices best first)
        entries = []
        for layer, s in zip(layers, scores):
            s = np.asarray(ops.convert_to_numpy(s), dtype="float64")
            mask = ops.convert_to_numpy(layer.kernel_mask)
            flat = s.reshape(-1)
            if granularity == "weight":
                sizes = np.ones_like(flat)
                kept = mask.reshape(-1) > 0
            else:
                fan_in = mask.size // layer.num_units
                sizes = np.full(flat.shape, float(fan_in))
                kept = mask.reshape(-1, layer.num_units).max(axis=0) > 0
            if not np.all(np.isfinite(flat)):
                raise ValueError(
                    f"Scores of layer '{layer.name}' contain NaN or Inf; no "
                    "mask was changed."
                )
            poolable = not (granularity == "unit" and layer.name in protect_units)
            # Sorted on first use only: floors and aligned widths seldom
            # need it, and a 235k-weight layer takes ~20 ms to sort.
            order = functools.cache(
                lambda flat=flat: np.argsort(-flat, kind="stable")
            )
            entries.append((layer, flat, sizes, kept, poolable, order))
        self.entries = entries

        self.pool = None
        self.layer_pools = {}
        if scope == "global":
            pool = [e for e in entries if e[4]]
            if pool:
                norm, hints = [], []
                for layer, flat, _, kept, _, _ in pool:
                    values, hint = _normalise(flat, kept, normalize)
                    norm.append(values * float(layer_weights.get(layer.name, 1.0)))
                    hints.append(hint)
                # Protected layers' weights still count in the total: the
                # target is a fraction of all the layers' weights.
                self.protected = sum(e[2].sum() for e in entries if not e[4])
                self.pool_size = sum(e[2].sum() for e in pool)
                self.pool = _SortedPool(
                    np.concatenate(norm), np.concatenate([e[2] for e in pool]),
                    merged_order(norm, hints),
                )
                self.pooled = pool
                self.comparable = {
                    e[0].name: n for e, n in zip(pool, norm)
                }
        else:
            self.comparable = {}
            for layer, flat, sizes, kept, poolable, _ in entries:
                if poolable:
                    self.layer_pools[layer.name] = _SortedPool(flat, sizes)
                    self.comparable[layer.name] = _normalise(flat, kept, "mean")[0]

    def masks(self, sparsity):
        """The `PruningResult` of pruning `sparsity` of the weights."""
        _validation.sparsity("sparsity", sparsity)
        granularity = self.granularity
        pruned = {}
        if self.scope == "global":
            tau = None
            if self.pool is not None:
                target = min(
                    sparsity * (self.pool_size + self.protected) / self.pool_size,
                    1.0 - 1e-9,
                )
                tau, flags = self.pool.cut(target)
                start = 0
                for (layer, flat, *_) in self.pooled:
                    pruned[layer.name] = flags[start : start + flat.size]
                    start += flat.size
        else:
            tau = {}
            for name, pool in self.layer_pools.items():
                tau[name], pruned[name] = pool.cut(sparsity)

        result = PruningResult(tau=tau)
        for layer, flat, sizes, _, poolable, order in self.entries:
            flags = pruned.get(layer.name, np.zeros(flat.shape, dtype=bool))
            keep = _apply_floors(layer, flat, ~flags, granularity, self.floors, order)
            if granularity == "unit" and poolable:
                keep = _align_units(flat, keep, self.unit_multiple, order)
            shape = tuple(int(d) for d in layer.kernel.shape)
            if granularity == "weight":
                mask = keep.reshape(shape)
            else:
                fan_in = int(np.prod(shape)) // layer.num_units
                mask = np.broadcast_to(keep, (fan_in, layer.num_units)).reshape(shape)
            mask = mask.astype("float32")
            result.masks[layer.name] = mask
        result.sparsity = _mask_sparsity(result.masks)
        return result


    def fill(self, result, fits):
        """Re-add pruned units to `result` while `fits(masks)` holds.

        Unit steps are coarse: the smallest sparsity whose masks meet a
        budget can leave much of it unused (a conv channel that feeds a
        Flatten takes all its positions' weights in the next layer with
        it). This takes back pruned units, a block at a time (a block is
        `unit_multiple` units in the layers `unit_multiple` aligns, one
        unit elsewhere), the block with the best mean score first (scores
        made comparable across layers as for the global τ), as long as
        `fits` accepts the masks with it; a layer whose next block does not
        fit gets no more. Output layers are never touched. Weight
        granularity returns `result` unchanged.

        Args:
            result: a `PruningResult` of `masks` on this pool.
            fits: callable dict layer name -> mask -> bool, typically "the
                budget is met with these masks".

        Returns:
            A new `PruningResult` (same τ; masks and sparsity filled).
        """
        if self.granularity != "unit":
            return result
        masks = {name: mask.copy() for name, mask in result.masks.items()}
        queues = {}
        for layer, flat, _, _, poolable, order in self.entries:
            if not poolable:
                continue
            units = masks[layer.name].reshape(-1, layer.num_units)
            pruned = [int(i) for i in order() if units[:, i].max() == 0]
            block = self.unit_multiple if _aligns(flat.size, self.unit_multiple) else 1
            blocks = [pruned[i:i + block] for i in range(0, len(pruned), block)]
            # An aligned layer takes whole blocks only.
            blocks = [b for b in blocks if len(b) == block]
            if blocks:
                queues[layer] = blocks
        while queues:
            def value(layer):
                block = queues[layer][0]
                return float(np.mean(self.comparable[layer.name][block]))
            layer = max(queues, key=value)
            block = queues[layer].pop(0)
            trial = dict(masks)
            units = trial[layer.name].reshape(-1, layer.num_units).copy()
            units[:, block] = 1.0
            trial[layer.name] = units.reshape(masks[layer.name].shape)
            if fits(trial):
                masks = trial
            else:
                queues[layer] = []
            if not queues[layer]:
                del queues[layer]
        return PruningResult(
            tau=result.tau, masks=masks, sparsity=_mask_sparsity(masks)
        )


def _mask_sparsity(masks):
    """Fraction of zeros over all the masks (dict name -> array)."""
    zeros = sum(int(m.size - np.count_nonzero(m)) for m in masks.values())
    total = sum(m.size for m in masks.values())
    return zeros / total if total else 0.0


def _aligns(units, multiple):
    """Whether a layer of `units` units keeps multiples of `multiple`."""
    return multiple > 1 and units >= 4 * multiple


def _best_first(flat, order):
    """Indices of `flat` best first: `order()` when a pool sorted (or will
    sort) them once, else sorted here."""
    return np.argsort(-flat, kind="stable") if order is None else order()


def _best(flat, count):
    """The indices of the `count` best entries of `flat`: the set that
    `np.argsort(-flat, kind="stable")[:count]` gives (ties at the cut by
    position), found by a partition instead of a sort."""
    if count >= flat.size:
        return np.arange(flat.size)
    if count <= 0:
        return np.arange(0)
    cut = np.partition(flat, flat.size - count)[flat.size - count]
    above = np.flatnonzero(flat > cut)
    ties = np.flatnonzero(flat == cut)[: count - above.size]
    return np.concatenate([above, ties])


def _align_units(flat, keep, multiple, order=None):
    """Keep a multiple of `multiple` units: the best ones by score
    (`order`: a function giving the units best first, sorted once)."""
    n, k = flat.size, int(keep.sum())
    if not _aligns(n, multiple) or k == n:
        return keep
    target = min(n, max(multiple, int(round(k / multiple)) * multiple))
    if target == k:
        return keep
    # Drop the worst kept units, or re-add the best pruned ones.
    order = _best_first(flat, order)
    keep = keep.copy()
    if target < k:
        kept_order = [i for i in order if keep[i]]
        keep[kept_order[target:]] = False
    else:
        pruned_order = [i for i in order if not keep[i]]
        keep[pruned_order[: target - k]] = True
    return keep


def _apply_floors(layer, flat, keep, granularity, floors, order=None):
    """Keep the best entries of a layer that fell below its floors
    (`order`: a function giving the entries best first, sorted once)."""
    keep = keep.copy()
    if granularity == "unit":
        need = max(floors.min_units, math.ceil(floors.min_fraction * flat.size))
        need = min(need, flat.size)
        if keep.sum() < need:
            keep[_best(flat, need)] = True
        return keep
    need = min(max(1, math.ceil(floors.min_fraction * flat.size)), flat.size)
    if keep.sum() < need:
        keep[_best(flat, need)] = True
    # At least `min_units` units keep a weight: the best weight of the best
    # units that have none.
    units = keep.reshape(-1, layer.num_units)
    alive = units.any(axis=0)
    need_units = min(floors.min_units, layer.num_units)
    if alive.sum() < need_units:
        by_unit = flat.reshape(-1, layer.num_units)
        best = by_unit.max(axis=0)
        for u in np.argsort(-best, kind="stable"):
            if alive.sum() >= need_units:
                break
            if not alive[u]:
                units[np.argmax(by_unit[:, u]), u] = True
                alive[u] = True
        keep = units.reshape(-1)
    return keep


def apply_masks(model_layers, masks):
    """Write masks (dict layer name -> array) into the layers' kernel_mask."""
    by_name = {layer.name: layer for layer in model_layers}
    for name, mask in masks.items():
        by_name[name].kernel_mask.assign(mask)
