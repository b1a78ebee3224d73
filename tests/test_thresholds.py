"""τ, masks, floors and the sparsity schedules."""

import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
from dkdp_keras import importance, thresholds
from dkdp_keras.thresholds import Floors, compute_masks, threshold_for_sparsity


@pytest.mark.parametrize("target", [0.0, 0.1, 0.5, 0.9, 0.95, 0.999])
def test_tau_puts_exactly_the_requested_fraction_below_it(rng, target):
    scores = rng.random(10_000)
    tau, pruned = threshold_for_sparsity(scores, target)
    assert np.mean(scores < tau) == pytest.approx(target)
    assert pruned.sum() == round(target * scores.size)
    assert np.all(scores[pruned] < tau) and np.all(scores[~pruned] >= tau)


def test_tau_with_unit_sizes_counts_weights_not_units():
    scores = np.array([0.1, 0.2, 0.3, 0.4])
    sizes = np.array([10, 30, 30, 30])
    tau, pruned = threshold_for_sparsity(scores, 0.4, sizes)
    # 10 + 30 = 40 of 100 weights: the two least important units.
    assert pruned.tolist() == [True, True, False, False] and tau == 0.3


def _model():
    model = keras.Sequential([
        keras.Input((20,)),
        keras.layers.Dense(30, activation="relu", name="a"),
        keras.layers.Dense(20, activation="relu", name="b"),
        keras.layers.Dense(5, name="out"),
    ])
    return dkdp.prunable(model)


def test_global_weight_pruning_reaches_the_target():
    model = _model()
    layers = dkdp.masked_layers(model)
    scores = [importance.Magnitude().score(layer, "weight") for layer in layers]
    result = compute_masks(layers, scores, 0.8, granularity="weight")
    total = sum(m.size for m in result.masks.values())
    zeros = sum((m == 0).sum() for m in result.masks.values())
    assert zeros == round(0.8 * total) and result.sparsity == pytest.approx(0.8, abs=1e-3)
    thresholds.apply_masks(layers, result.masks)
    assert dkdp.sparsity(model) == pytest.approx(0.8, abs=1e-3)


def test_per_layer_scope_prunes_each_layer_to_the_target():
    model = _model()
    layers = dkdp.masked_layers(model)
    scores = [importance.Magnitude().score(layer, "weight") for layer in layers]
    result = compute_masks(layers, scores, 0.5, scope="layer")
    for layer in layers:
        mask = result.masks[layer.name]
        assert (mask == 0).mean() == pytest.approx(0.5, abs=1.0 / mask.size)
        kernel = np.abs(layer.kernel.numpy())
        assert kernel[mask == 0].max() <= kernel[mask == 1].min()
    assert set(result.tau) == {"a", "b", "out"}


def test_unit_pruning_removes_whole_units_and_spares_protected_layers():
    model = _model()
    layers = dkdp.masked_layers(model)
    scores = [importance.Magnitude().score(layer, "unit") for layer in layers]
    result = compute_masks(layers, scores, 0.5, granularity="unit", protect_units={"out"})
    for name in ("a", "b"):
        per_unit = result.masks[name].reshape(-1, result.masks[name].shape[-1])
        # every column is all ones or all zeros
        assert set(per_unit.min(0) == per_unit.max(0)) == {True}
    assert np.all(result.masks["out"] == 1)
    assert result.sparsity == pytest.approx(0.5, abs=0.05)


def test_floors_keep_every_layer_alive():
    model = _model()
    layers = dkdp.masked_layers(model)
    # Layer "a" looks worthless: global pruning would empty it.
    scores = [importance.Magnitude().score(layer, "weight") for layer in layers]
    scores[0] = scores[0] * 0 + 1e-9
    result = compute_masks(layers, scores, 0.6, normalize="none",
                           floors=Floors(min_units=3, min_fraction=0.05))
    mask_a = result.masks["a"]
    assert mask_a.sum() >= np.ceil(0.05 * mask_a.size)
    assert (mask_a.max(axis=0) > 0).sum() >= 3
    unit_scores = [importance.Magnitude().score(layer, "unit") for layer in layers]
    unit_scores[1] = unit_scores[1] * 0
    result = compute_masks(layers, unit_scores, 0.9, granularity="unit",
                           normalize="none", floors=Floors(min_units=2, min_fraction=0.0))
    assert (result.masks["b"].max(axis=0) > 0).sum() >= 2


def test_layer_weights_shift_pruning_between_layers():
    model = _model()
    layers = dkdp.masked_layers(model)
    scores = [importance.Magnitude().score(layer, "weight") for layer in layers]
    even = compute_masks(layers, scores, 0.5)
    favoured = compute_masks(layers, scores, 0.5, layer_weights={"a": 10.0})
    assert (favoured.masks["a"] == 0).mean() < (even.masks["a"] == 0).mean()


def test_nan_scores_change_nothing():
    model = _model()
    layers = dkdp.masked_layers(model)
    scores = [importance.Magnitude().score(layer, "weight").numpy() for layer in layers]
    scores[1][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        compute_masks(layers, scores, 0.5)


@pytest.mark.parametrize(
    "call,error,text",
    [
        (lambda l, s: compute_masks(l, s, 1.0), ValueError, r"sparsity must be in \[0.0, 1.0\), got 1.0"),
        (lambda l, s: compute_masks(l, s, -0.1), ValueError, "sparsity must be in"),
        (lambda l, s: compute_masks(l, s, 0.5, granularity="layer"), ValueError, "cannot itself zero weights"),
        (lambda l, s: compute_masks(l, s, 0.5, granularity="filter"), ValueError, "granularity must be one of"),
        (lambda l, s: compute_masks(l, s, 0.5, scope="local"), ValueError, "scope must be one of"),
        (lambda l, s: compute_masks(l, s[:1], 0.5), ValueError, "3 layers and 1 score"),
        (lambda l, s: Floors(min_units=0), ValueError, r"min_units must be in \[1, inf\]"),
        (lambda l, s: Floors(min_fraction=1.5), ValueError, "min_fraction must be in"),
    ],
)
def test_mechanism_bad_input(call, error, text):
    layers = dkdp.masked_layers(_model())
    scores = [importance.Magnitude().score(layer, "weight") for layer in layers]
    with pytest.raises(error, match=text):
        call(layers, scores)


def test_constant_and_polynomial_schedules():
    assert thresholds.ConstantSparsity(0.9).sparsity_at(0) == 0.9
    sched = thresholds.PolynomialDecay(0.1, 0.9, begin_step=100, end_step=200, power=3)
    assert sched.sparsity_at(0) == pytest.approx(0.1)
    assert sched.sparsity_at(100) == pytest.approx(0.1)
    assert sched.sparsity_at(150) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5 ** 3)
    assert sched.sparsity_at(200) == pytest.approx(0.9)
    assert sched.sparsity_at(10_000) == pytest.approx(0.9)
    values = [sched.sparsity_at(t) for t in range(100, 201)]
    assert all(b >= a for a, b in zip(values, values[1:]))


@pytest.mark.parametrize(
    "make,error,text",
    [
        (lambda: thresholds.ConstantSparsity(1.0), ValueError, r"target must be in \[0.0, 1.0\), got 1.0"),
        (lambda: thresholds.ConstantSparsity("0.5"), TypeError, "target must be a number"),
        (lambda: thresholds.ConstantSparsity(float("nan")), ValueError, "target must be a finite number"),
        (lambda: thresholds.PolynomialDecay(0.0, 0.5, 10, 5), ValueError, r"end_step \(5\) must be after begin_step \(10\)"),
        (lambda: thresholds.PolynomialDecay(0.6, 0.5, 0, 5), ValueError, "final_sparsity .* must be at least initial_sparsity"),
        (lambda: thresholds.PolynomialDecay(0.0, 0.5, -1, 5), ValueError, "begin_step must be in"),
        (lambda: thresholds.PolynomialDecay(0.0, 0.5, 0, 5, power=0.5), ValueError, "power must be in"),
        (lambda: thresholds.Adaptive(60_000), TypeError, "budget must be a dkdp_keras.Budget"),
        (lambda: thresholds.Adaptive(dkdp.Budget(max_params=10), tolerance=1.5), ValueError, "tolerance must be in"),
        (lambda: thresholds.Adaptive(dkdp.Budget(max_params=10), monitor=None), TypeError, "monitor must be a metric name"),
        (lambda: thresholds.Adaptive(dkdp.Budget(max_params=10), mode="up"), ValueError, "mode must be one of"),
        (lambda: thresholds.Adaptive(dkdp.Budget(max_params=10), min_step=0.5), ValueError, "min_step must be in"),
    ],
)
def test_policy_bad_input(make, error, text):
    with pytest.raises(error, match=text):
        make()


def test_adaptive_reads_direction_from_the_metric_name():
    budget = dkdp.Budget(max_params=1000)
    assert thresholds.Adaptive(budget).higher_is_better
    assert not thresholds.Adaptive(budget, monitor="val_loss").higher_is_better
    assert thresholds.Adaptive(budget, monitor="val_loss", mode="max").higher_is_better


def test_adaptive_removes_a_fraction_of_the_kept_weights_per_event():
    policy = thresholds.Adaptive(dkdp.Budget(max_params=1000), initial_step=0.2,
                                 min_step=0.01, finish_by=0.75)
    policy.start(None, 15)  # deadline: the end of epoch index 11
    assert policy.next_sparsity(0, 0.0, 0.9) == pytest.approx(0.2)
    assert policy.next_sparsity(1, 0.2, 0.9) == pytest.approx(0.2 + 0.2 * 0.8)
    # Steps shrink with the model: at 80% sparsity, 20% of the 20% kept.
    assert policy.next_sparsity(5, 0.8, 0.9) == pytest.approx(0.84)
    # 0.84 + 0.2 * 0.16 leaves 0.0003 to go, less than 1% of the kept
    # weights: one event more would restart the fine-tuning for it, so this
    # event goes to the budget's sparsity.
    assert policy.next_sparsity(6, 0.84, 0.8723) == 0.8723
    # A larger remainder is left for the next event.
    assert policy.next_sparsity(6, 0.84, 0.88) == pytest.approx(0.872)
    # Behind schedule, the step grows to meet the deadline; at it, the budget.
    assert policy.next_sparsity(9, 0.2, 0.9) == pytest.approx(0.2 + 0.7 / 2)
    assert policy.next_sparsity(11, 0.2, 0.9) == 0.9
    # The default reaches 90% in nine events.
    default = thresholds.Adaptive(dkdp.Budget(max_params=1000))
    default.start(None, 15)
    s = 0.0
    for epoch in range(9):
        s = default.next_sparsity(epoch, s, 0.9003)
    assert s == 0.9003


def test_lamp_scores_follow_the_paper():
    from dkdp_keras.thresholds.mechanism import _lamp

    s = np.array([3.0, 1.0, 2.0, 4.0])
    # sorted ascending 1,2,3,4 -> squares 1,4,9,16; tails 30,29,25,16
    np.testing.assert_allclose(_lamp(s), [9 / 25, 1 / 30, 4 / 29, 1.0])


def test_lamp_gives_layers_different_sparsities():
    model = _model()
    layers = dkdp.masked_layers(model)
    scores = [importance.Magnitude().score(layer, "weight") for layer in layers]
    result = compute_masks(layers, scores, 0.8, normalize="lamp")
    per_layer = [(result.masks[l.name] == 0).mean() for l in layers]
    assert result.sparsity == pytest.approx(0.8, abs=1e-3)
    assert max(per_layer) - min(per_layer) > 0.01
    assert all(result.masks[l.name].max() == 1.0 for l in layers)


@pytest.mark.parametrize("sparsity", [0.3, 0.55, 0.8])
def test_unit_multiple_keeps_aligned_widths_of_the_best_units(sparsity):
    model = dkdp.prunable(keras.Sequential([
        keras.Input((12,)),
        keras.layers.Dense(64, activation="relu", name="wide"),
        keras.layers.Dense(20, activation="relu", name="narrow"),  # < 4 × 8: left as is
        keras.layers.Dense(5, name="out"),
    ]))
    layers = dkdp.masked_layers(model)
    scores = [importance.Magnitude().score(layer, "unit") for layer in layers]
    plain = compute_masks(layers, scores, sparsity, granularity="unit", protect_units={"out"})
    aligned = compute_masks(layers, scores, sparsity, granularity="unit",
                            protect_units={"out"}, unit_multiple=8)
    units = {name: m.reshape(-1, m.shape[-1]).max(0) for name, m in aligned.masks.items()}
    before = int(plain.masks["wide"].reshape(-1, 64).max(0).sum())
    assert units["wide"].sum() % 8 == 0
    assert abs(units["wide"].sum() - before) <= 4
    # The kept ones are the best by score.
    wide = np.asarray(scores[0])
    assert wide[units["wide"] == 1].min() >= wide[units["wide"] == 0].max()
    np.testing.assert_array_equal(aligned.masks["narrow"], plain.masks["narrow"])
    assert np.all(units["out"] == 1)


def _flatten_cnn():
    """Conv channels before a Flatten: each one carries 16 weights of the
    next layer per Dense unit, so unit steps are coarse."""
    return dkdp.prunable(keras.Sequential([
        keras.Input((4, 4, 1)),
        keras.layers.Conv2D(32, 3, padding="same", name="conv"),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu", name="hidden"),
        keras.layers.Dense(3, name="out"),
    ]))


def _kept_units(masks):
    return {n: int(m.reshape(-1, m.shape[-1]).max(0).sum()) for n, m in masks.items()}


def test_fill_takes_pruned_blocks_back_while_they_fit():
    from dkdp_keras.budget import deployed_counts
    from dkdp_keras.thresholds.mechanism import MaskPool, apply_masks

    model = _flatten_cnn()
    layers = dkdp.masked_layers(model)
    scores = [importance.Magnitude().score(layer, "unit") for layer in layers]
    limit = 4_000  # of 17,411 parameters
    calls = []

    def params_with(masks):
        saved = {l.name: l.kernel_mask.numpy() for l in layers}
        apply_masks(layers, masks)
        try:
            return deployed_counts(model)[0]
        finally:
            apply_masks(layers, saved)

    def fits(masks):
        calls.append(1)
        return params_with(masks) <= limit

    pool = MaskPool(layers, scores, granularity="unit", protect_units={"out"},
                    unit_multiple=8)
    # The bisection's answer: the smallest sparsity that meets the limit.
    lo, hi = 0.0, 0.999
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(pool.masks(mid).masks) else (mid, hi)
    cut = pool.masks(hi)
    filled = pool.fill(cut, fits)
    before, after = params_with(cut.masks), params_with(filled.masks)
    units = _kept_units(filled.masks)
    assert before <= after <= limit
    assert after > before  # the cut left room for at least one block
    assert units["conv"] % 8 == 0 and units["hidden"] % 8 == 0 and units["out"] == 3
    assert filled.sparsity < cut.sparsity
    # Nothing more fits: one more block of any layer breaks the limit.
    for name in ("conv", "hidden"):
        mask = filled.masks[name].reshape(-1, 32).copy()
        pruned = np.flatnonzero(mask.max(0) == 0)[:8]
        if len(pruned) == 8:
            mask[:, pruned] = 1.0
            trial = dict(filled.masks, **{name: mask.reshape(filled.masks[name].shape)})
            assert params_with(trial) > limit
    # Kept units are the best of their layer by score.
    for layer, s in zip(layers[:2], scores[:2]):
        s, kept = np.asarray(s), filled.masks[layer.name].reshape(-1, 32).max(0) == 1
        assert s[kept].min() >= s[~kept].max()
    # Weight granularity has no coarse steps: fill leaves it alone.
    weights = MaskPool(layers, [importance.Magnitude().score(l, "weight") for l in layers])
    result = weights.masks(0.8)
    assert weights.fill(result, fits) is result
