"""Regrowth (`dkdp_keras.regrowth`, `next_task(regrow=...)`): pruned
channels come back with fresh weights, within the budget, and the model
computes exactly what it did."""

import warnings

import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
from dkdp_keras import depgraph, regrowth
from dkdp_keras.graph import iter_layers, is_masked
from dkdp_keras.prunable import sync_batchnorm

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def trained(net, shape, seed=0):
    """`prunable(net)` after a few steps on random data, so that its
    BatchNormalization statistics have moved and its outputs depend on
    its input."""
    rng = np.random.default_rng(seed)
    model = dkdp.prunable(net)
    for layer in iter_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.5  # MobileNetV2's 0.999 would not move in 12 steps
    x = rng.random((64,) + shape).astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=LOSS)
    model.fit(x, np.arange(64) % 10, epochs=3, batch_size=16, verbose=0)
    return model, x


def prune_channels(model, share, seed=0):
    """Remove `share` of each channel group's channels, in every masked
    layer whose units they are (as a structured prune does)."""
    rng = np.random.default_rng(seed)
    graph = depgraph.of(model)
    for group in graph.roots():
        if not regrowth.regrowable(graph, group):
            continue
        gone = rng.choice(graph.size[group], int(share * graph.size[group]), replace=False)
        for layer in regrowth._channel_layers(graph, group):
            mask = keras.ops.convert_to_numpy(layer.kernel_mask).copy()
            mask[regrowth._units(mask, layer, gone)] = 0.0
            layer.kernel_mask.assign(mask)
    sync_batchnorm(model)


def compacted_params(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dkdp.count_params(dkdp.compact(model))


@pytest.mark.parametrize("name", ["reference_cnn", "mobilenet_v2"])
def test_regrowth_fills_the_budget_and_changes_no_output(name):
    if name == "reference_cnn":
        net, shape = dkdp.zoo.reference_cnn(width=0.5), (28, 28, 1)
    else:
        keras.utils.set_random_seed(0)
        net = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                             weights=None, classes=10,
                                             classifier_activation=None)
        shape = (32, 32, 3)
    model, x = trained(net, shape)
    prune_channels(model, 0.5)
    before = np.asarray(model(x, training=False))
    # Not a trivial parity: the outputs depend on the input, by far more
    # than the tolerance below.
    assert before.std(axis=0).mean() > 100 * 1e-6
    pruned = compacted_params(model)
    budget = dkdp.Budget(max_params=int(pruned * 1.2))
    revived = regrowth.regrow(model, budget, seed=1)
    assert sum(revived.values()) > 0
    np.testing.assert_allclose(np.asarray(model(x, training=False)), before, atol=1e-6)
    grown = compacted_params(model)
    # The revived channels' outgoing rows start at zero, so the count is
    # below what they may grow to; that (counted as before they were
    # pruned) fits the budget.
    assert pruned < grown <= budget.max_params
    full = {layer.name: keras.ops.convert_to_numpy(layer.kernel_mask)
            for layer in iter_layers(model) if is_masked(layer)}
    assert budget.usage(model, counts=dkdp.budget.deployed_counts(model, full))["params"] <= 1.0
    # The compacted model computes the same.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = dkdp.compact(model)
    np.testing.assert_allclose(np.asarray(small(x, training=False)), before, atol=1e-5)
    # A budget already spent revives nothing and changes nothing.
    weights = [keras.ops.convert_to_numpy(w) for w in model.weights]
    assert regrowth.regrow(model, dkdp.Budget(max_params=pruned // 2)) == {}
    for w, old in zip(model.weights, weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(w), old)


def test_revived_units_learn():
    model, x = trained(dkdp.zoo.reference_cnn(width=0.5), (28, 28, 1))
    prune_channels(model, 0.5)
    *_, dense, out = [layer for layer in iter_layers(model) if is_masked(layer)]
    before = np.asarray(dense.unit_mask()).sum()
    regrowth.regrow(model, dkdp.Budget(max_params=int(compacted_params(model) * 1.5)))
    assert np.asarray(dense.unit_mask()).sum() > before
    rows = np.abs(np.asarray(out.kernel)).sum(axis=1)
    zero_rows = np.flatnonzero(rows == 0)
    assert len(zero_rows) > 0
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=LOSS)
    model.fit(x, (np.arange(64) + 3) % 10, epochs=1, batch_size=16, verbose=0)
    rows = np.abs(np.asarray(out.kernel)).sum(axis=1)
    # A revived ReLU unit whose fresh weights give negative sums on every
    # one of these images gets no gradient yet; the others learn.
    assert np.mean(rows[zero_rows] > 0) >= 0.5


def test_next_task_regrows_the_teacher_within_the_budget():
    rng = np.random.default_rng(0)
    x = rng.random((64, 8, 8, 1)).astype("float32")
    sizes = []
    for regrow in (None, "budget"):
        keras.utils.set_random_seed(0)
        teacher = dkdp.zoo.lenet_300_100(input_shape=(8, 8, 1), width=0.2)
        model = dkdp.DKDPModel(teacher)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS)
        budget = dkdp.Budget(max_params=3000)
        model.fit(x, np.arange(64) % 5, epochs=2, batch_size=16, verbose=0, callbacks=[
            dkdp.DKDPCallback(granularity="unit", threshold=dkdp.thresholds.Adaptive(
                budget, monitor="teacher_loss", mode="min"), verbose=0)])
        model.next_task(x, np.arange(64) % 5, buffer_size=10, ewc=0.0,
                        regrow=dkdp.Budget(max_params=4000) if regrow else None)
        np.testing.assert_allclose(np.asarray(model.teacher(x, training=False)),
                                   np.asarray(model.previous(x, training=False)), atol=1e-5)
        sizes.append(compacted_params(model.teacher))
    assert sizes[0] <= 3000 < sizes[1] <= 4000
    with pytest.raises(TypeError, match="regrow"):
        model.next_task(x, 5 + np.arange(64) % 2, buffer_size=10, regrow=3000)
