"""Latency fitted on the runtime (`dkdp_keras.latency`) and the latency
budget that uses it. No test here asserts a time: times are the benchmark's;
these assert the fit, the counts and what the budget does with them."""

import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
from dkdp_keras import thresholds
from dkdp_keras.latency import LatencyFit, fit_latency
from tests.conftest import sign_data, two_hidden_mlp

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def small_cnn():
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(16, 3, activation="relu")(inputs)
    x = keras.layers.Conv2D(16, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4)(x))


def test_a_line_through_timings_is_recovered_and_held_at_zero_or_above():
    macs = [4_000_000, 1_000_000, 250_000]
    fit = LatencyFit.from_timings(macs, [0.005 + 2e-8 * m for m in macs], runtime="phone")
    assert fit.fixed_ms == pytest.approx(0.005) and fit.ms_per_mac == pytest.approx(2e-8)
    assert fit.predict(500_000) == pytest.approx(0.015)
    assert fit.ms_per_param == 0 and fit.points == [
        (4_000_000, None, pytest.approx(0.085)), (1_000_000, None, pytest.approx(0.025)),
        (250_000, None, pytest.approx(0.01))]
    # With parameters: the plane MobileNetV2's files followed (a weight read
    # once an inference costs as a MAC does), recovered from widths that
    # keep MACs and parameters apart.
    macs, params = [6e6, 3e6, 3e6, 1e6, 2e6], [2.2e6, 6e5, 1.5e6, 1.6e5, 1.2e6]
    plane = LatencyFit.from_timings(macs, [0.011 + 3e-8 * m + 2e-8 * p
                                           for m, p in zip(macs, params)], params=params)
    assert (plane.fixed_ms, plane.ms_per_mac, plane.ms_per_param) == (
        pytest.approx(0.011), pytest.approx(3e-8), pytest.approx(2e-8))
    assert plane.predict(1e6, 1e6) == pytest.approx(0.061)
    with pytest.raises(ValueError, match="time per parameter: give params too"):
        plane.predict(1e6)
    # Times that fall as MACs grow (noise on a model whose time its MACs do
    # not set): no slope, the mean time.
    flat = LatencyFit.from_timings([1e6, 2e6, 3e6], [5.4, 5.3, 5.2])
    assert flat.ms_per_mac == 0 and flat.fixed_ms == pytest.approx(5.3)
    # A line that would cross zero above zero MACs goes through the origin.
    steep = LatencyFit.from_timings([1e6, 2e6], [1.0, 3.0])
    assert steep.fixed_ms == 0 and steep.ms_per_mac == pytest.approx(7.0 / 5e6)
    again = LatencyFit.from_config(fit.get_config())
    assert (again.fixed_ms, again.ms_per_mac, again.runtime) == (
        fit.fixed_ms, fit.ms_per_mac, "phone")


@pytest.mark.parametrize("macs,ms,text", [
    ([1e6, 1e6], [1.0, 2.0], "at least two models of different MACs"),
    ([1e6, 2e6], [1.0, 0.0], "positive times"),
    ([1e6, 2e6], [1.0], "lists of equal length"),
])
def test_timings_that_cannot_fit_a_line_are_refused(macs, ms, text):
    with pytest.raises(ValueError, match=text):
        LatencyFit.from_timings(macs, ms)


@pytest.mark.parametrize("kwargs,text", [
    (dict(max_params=10, latency_fit="litert"), "set max_latency_ms too"),
    (dict(max_latency_ms=1.0, latency_fit="tpu"), r"one of \('litert', 'keras'\)"),
    (dict(max_latency_ms=1.0, latency_fit=0.5), "LatencyFit.from_timings"),
])
def test_a_budget_refuses_a_latency_fit_it_cannot_use(kwargs, text):
    with pytest.raises(ValueError, match=text):
        dkdp.Budget(**kwargs)


def test_a_budget_estimates_latency_with_the_fit_and_refuses_what_no_pruning_reaches():
    model = dkdp.prunable(small_cnn())
    fit = LatencyFit(0.004, 1e-7, 1e-6)
    budget = dkdp.Budget(max_latency_ms=0.03, latency_fit=fit)
    first = dkdp.masked_layers(model)[0]
    mask = np.ones(first.kernel.shape, "float32")
    mask[..., :8] = 0.0  # half the first convolution's filters: the next one's inputs too
    first.kernel_mask.assign(mask)
    small = dkdp.compact(model)
    # Time follows shapes: zero biases and weights are computed all the same.
    macs, params = dkdp.count_macs(small, nonzero=False), dkdp.count_params(small, nonzero=False)
    assert macs < dkdp.count_macs(model, nonzero=False)
    expected = 0.004 + 1e-7 * macs + 1e-6 * params
    assert budget.measure(model)["latency_ms"] == pytest.approx(expected)
    assert budget.usage(model)["latency_ms"] == pytest.approx(expected / 0.03)
    budget.check_feasible(model)
    # Under the fixed time every inference pays: refused before training,
    # with the fit named.
    with pytest.raises(ValueError, match=r"max_latency_ms=0.003 is below the 0.004\d* ms "
                                         r"that model .* at its narrowest"):
        dkdp.Budget(max_latency_ms=0.003, latency_fit=fit).check_feasible(model)
    # The config carries the fit; a budget made from it estimates alike.
    config = budget.get_config()
    assert config["latency_fit"]["fixed_ms"] == 0.004
    assert dkdp.Budget(**config).measure(model) == budget.measure(model)
    assert "LatencyFit(fixed_ms=0.004" in repr(budget)


def test_a_latency_estimate_counts_the_zero_channels_compaction_keeps_for_alignment():
    # reference_cnn cut to 20/40/100 units compacts to 20/48/112: XNNPACK's
    # multiples of 16 in layers of 64 units or more. The file computes those
    # zero channels; a latency estimate must count them, a MACs budget not.
    model = dkdp.prunable(dkdp.zoo.reference_cnn())
    for layer, keep in zip(dkdp.masked_layers(model), (20, 40, 100)):
        mask = np.ones(layer.kernel.shape, "float32")
        mask[..., keep:] = 0.0
        layer.kernel_mask.assign(mask)
    small = dkdp.compact(model)
    assert [layer.kernel.shape[-1] for layer in small.layers if hasattr(layer, "kernel")] == [
        20, 48, 112, 10]
    shapes = (dkdp.count_macs(small, nonzero=False), dkdp.count_params(small, nonzero=False))
    fit = LatencyFit(0.01, 1e-8, 2e-8)
    budget = dkdp.Budget(max_latency_ms=1.0, max_macs=1e9, latency_fit=fit)
    measured = budget.measure(model)
    assert measured["macs"] == dkdp.count_macs(small) < shapes[0]  # non-zeros only
    assert measured["latency_ms"] == pytest.approx(fit.predict(*shapes))
    counts = dkdp.budget.deployed_counts(model)
    assert counts.computed == shapes[::-1] and tuple(counts) == (dkdp.count_params(small),
                                                                 measured["macs"])
    assert budget.measure(model, counts=counts) == measured


def test_adaptive_prunes_to_a_latency_budget_of_a_fit_in_the_same_fit():
    x, y = sign_data(256, 0)
    model = dkdp.DKDPModel(two_hidden_mlp())
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=CE, metrics=["accuracy"])
    dense_macs = dkdp.count_macs(model.teacher, nonzero=False)
    fit = LatencyFit(0.001, 1e-6, runtime="device")  # MACs alone, as a device's timings give
    limit = fit.predict(0.3 * dense_macs)  # 0.3 of the MACs, plus the fixed time
    budget = dkdp.Budget(max_latency_ms=limit, latency_fit=fit)
    cb = dkdp.DKDPCallback(threshold=thresholds.Adaptive(budget, tolerance=0.2), verbose=0)
    model.fit(x, y, epochs=6, batch_size=32, verbose=0, callbacks=[cb],
              validation_data=(x[:64], y[:64]))
    small = dkdp.compact(model.teacher)
    kept = dkdp.count_macs(small, nonzero=False)  # the shapes: what the runtime computes
    assert kept <= 0.3 * dense_macs
    assert budget.measure(model.teacher)["latency_ms"] == pytest.approx(fit.predict(kept))
    assert budget.is_met(model.teacher)


def test_fit_latency_times_narrower_copies_on_litert():
    model = dkdp.prunable(small_cnn())
    fit = fit_latency(model, "litert", widths=(1.0, 0.5, 0.25), mixed=3, runs=20,
                      verbose=False)
    macs, params, ms = zip(*fit.points)
    assert len(fit.points) == 6 and macs[0] == dkdp.count_macs(model, nonzero=False)
    assert macs[0] > macs[1] > macs[2] > 0 and params[0] > params[1] > params[2]
    # Groups narrowed apart: MACs and parameters do not shrink together.
    assert len({round(m / p, 3) for m, p in zip(macs, params)}) >= 4
    assert all(t > 0 for t in ms)
    assert fit.runtime == "litert" and min(fit.fixed_ms, fit.ms_per_mac, fit.ms_per_param) >= 0
    # The fit is the least-squares plane of its points (terms held at zero or above).
    again = LatencyFit.from_timings(macs, ms, params=params)
    assert (again.fixed_ms, again.ms_per_mac, again.ms_per_param) == (
        fit.fixed_ms, fit.ms_per_mac, fit.ms_per_param)


def test_fit_latency_builds_keras_applications_copies_and_refuses_what_it_cannot_time():
    net = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                         classes=10, classifier_activation=None)
    fit = fit_latency(net, "keras", widths=(1.0, 0.5), mixed=1, verbose=False)
    (wide, _, _), (narrow, _, _), _ = fit.points
    assert wide == dkdp.count_macs(net, nonzero=False) and 0 < narrow < 0.5 * wide
    with pytest.raises(ValueError, match="runtime must be one of"):
        fit_latency(net, "gpu")
    with pytest.raises(ValueError, match="at least two factors"):
        fit_latency(net, widths=(1.0,))
    inputs = keras.Input((None, None, 3))
    free = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
    with pytest.raises(ValueError, match="unknown dimensions.*LatencyFit.from_timings"):
        fit_latency(free)


def test_a_budget_naming_a_runtime_fits_each_architecture_once(monkeypatch):
    # The budget search measures a model some twenty times a pruning event;
    # the fit (eight exports and a timing pass) must run once per model.
    from dkdp_keras import budget as budget_module

    calls = []
    monkeypatch.setattr(budget_module, "fit_latency",
                        lambda model, runtime: calls.append((model.name, runtime))
                        or LatencyFit(0.001, 1e-8, 1e-8, runtime=runtime))
    model = dkdp.prunable(small_cnn())
    budget = dkdp.Budget(max_latency_ms=1.0, latency_fit="litert")
    budget.check_feasible(model)
    first = budget.measure(model)["latency_ms"]
    assert budget.measure(model)["latency_ms"] == first > 0.001
    assert calls == [(model.name, "litert")]
    budget.measure(dkdp.prunable(keras.Sequential(
        [keras.Input((12, 12, 3)), keras.layers.Conv2D(4, 3)], name="other")))
    assert [name for name, _ in calls] == [model.name, "other"]
