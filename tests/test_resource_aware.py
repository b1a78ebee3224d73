"""Units ranked per share of the budget they take (`resource_aware`)."""

import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
from dkdp_keras import thresholds
from dkdp_keras.pruner import Pruner


def reference_cnn():
    return dkdp.prunable(dkdp.zoo.reference_cnn())


def unit_pruner(model, budget):
    layers = dkdp.masked_layers(model)
    return Pruner(model, layers, dkdp.importance.get("magnitude"), granularity="unit",
                  normalize="lamp", protect_units={layers[-1].name}, budget=budget)


def test_a_units_price_is_the_macs_it_takes_with_it_over_the_limit():
    # reference_cnn: 28x28x1 -> conv 3x3 32 -> pool -> conv 3x3 64 -> pool ->
    # flatten (7x7x64) -> dense 256 -> dense 10. A first-layer channel takes
    # its own 28*28*9 MACs and its 14*14*9*64 in the second convolution; a
    # second-layer one 14*14*9*32 and the 7*7*256 of its Flatten positions;
    # a Dense unit its 3,136 inputs and its 10 outputs.
    limit = 100_000
    prices = unit_pruner(reference_cnn(), dkdp.Budget(max_macs=limit)).unit_prices()
    conv1, conv2, dense = (n for n in prices)
    assert [round(prices[n] * limit) for n in (conv1, conv2, dense)] == [
        28 * 28 * 9 + 14 * 14 * 9 * 64, 14 * 14 * 9 * 32 + 7 * 7 * 256, 3136 + 10]


def test_under_a_budget_of_two_limits_a_units_price_is_its_two_shares_added():
    model = reference_cnn()
    macs = unit_pruner(model, dkdp.Budget(max_macs=300_000)).unit_prices()
    params = unit_pruner(model, dkdp.Budget(max_params=40_000)).unit_prices()
    both = unit_pruner(model, dkdp.Budget(max_params=40_000, max_macs=300_000)).unit_prices()
    for name in both:
        assert both[name] == pytest.approx(macs[name] + params[name])
    # Parameters price the second convolution (it feeds the Flatten) above a
    # Dense unit, and a first-layer channel lowest of all; MACs the reverse.
    conv1, conv2, dense = params
    assert params[conv2] > params[dense] > params[conv1]
    assert macs[conv1] > macs[conv2] > macs[dense]


def widths_after_the_budget_search(resource_aware):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(128, 28, 28, 1)).astype("float32")
    y = np.random.default_rng(1).integers(0, 10, 128)
    model = reference_cnn()
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, verbose=0)
    dense_macs = dkdp.count_macs(model, nonzero=False)
    budget = dkdp.Budget(max_macs=int(0.07 * dense_macs))
    cb = dkdp.DKDPCallback(importance="magnitude", granularity="unit", verbose=0,
                           unit_multiple=1, resource_aware=resource_aware,
                           threshold=thresholds.Adaptive(budget))
    cb.set_params({"epochs": 4, "steps": 2})
    cb.set_model(model)
    cb.on_train_begin()
    scores = cb._scores()
    cb._prune(cb._sparsity_for_budget(scores), scores)
    assert budget.is_met(model)
    return [int(np.asarray(l.unit_mask()).sum()) for l in dkdp.masked_layers(model)[:3]]


def test_under_a_macs_budget_it_keeps_cheap_dense_units_and_drops_costly_channels():
    plain = widths_after_the_budget_search(False)
    aware = widths_after_the_budget_search(True)
    assert aware[2] > 1.5 * plain[2], (plain, aware)  # Dense units: ~3k MACs each
    assert aware[0] <= plain[0], (plain, aware)  # first-layer channels: ~120k each


@pytest.mark.parametrize("kwargs, bad", [
    ({"granularity": "weight",
      "threshold": thresholds.Adaptive(dkdp.Budget(max_macs=1000))}, "granularity='weight'"),
    ({"granularity": "unit", "threshold": thresholds.PolynomialDecay(0.0, 0.5, 0, 10)},
     "threshold=PolynomialDecay"),
    ({"granularity": "unit"}, "threshold=None"),
])
def test_resource_aware_without_units_or_a_budget_is_refused_before_training(kwargs, bad):
    with pytest.raises(ValueError, match=f"needs granularity='unit' and .*{bad}"):
        dkdp.DKDPCallback(resource_aware=True, **kwargs)


def test_on_keras_mobilenet_v2_every_channel_group_is_priced_and_the_budget_is_met():
    # Residual groups (a UnitGroup of several layers) and depthwise
    # convolutions: a group's unit takes its MACs in every member with it.
    keras.utils.set_random_seed(0)
    model = dkdp.prunable(keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10,
        classifier_activation=None))
    x = np.random.default_rng(0).normal(size=(32, 32, 32, 3)).astype("float32")
    y = np.random.default_rng(1).integers(0, 10, 32)
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, verbose=0)
    budget = dkdp.Budget(max_macs=int(0.3 * dkdp.count_macs(model, nonzero=False)))
    cb = dkdp.DKDPCallback(granularity="unit", verbose=0, resource_aware=True,
                           threshold=thresholds.Adaptive(budget))
    cb.set_params({"epochs": 4, "steps": 2})
    cb.set_model(model)
    cb.on_train_begin()
    pruner = cb._pruner
    prices = pruner.unit_prices()
    groups = [e for e in pruner.units.entries if hasattr(e, "members")]
    assert groups and all(g.name in prices for g in groups)
    assert all(np.isfinite(p) and p > 0 for p in prices.values())
    scores = cb._scores()
    cb._prune(cb._sparsity_for_budget(scores), scores)
    assert budget.is_met(model)
