"""The channel dependency graph on models nobody here wrote: keras.ops
calls in the graph, squeeze-and-excite, ZeroPadding, residual groups,
nested transfer-learning models (issue 22, items 1 and 2)."""
import warnings

import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
from dkdp_keras import depgraph
from dkdp_keras.budget import deployed_counts
from dkdp_keras.graph import iter_layers
from dkdp_keras.prunable import sync_batchnorm

A = keras.applications


def settle_batchnorm(model, rng, shape):
    """Moving statistics from one batch, so that the output depends on the
    input (an untrained keras.applications model's activations vanish)."""
    bns = [l for l in iter_layers(model) if isinstance(l, keras.layers.BatchNormalization)]
    for bn in bns:
        bn.momentum = 0.0
    model(rng.random((16,) + shape).astype("float32"), training=True)
    for bn in bns:
        bn.momentum = 0.99


def prune_groups(model, fraction, rng):
    """Mask `fraction` of every free group's channels in all its members."""
    graph = depgraph.of(model)
    removed = 0
    for group in graph.roots():
        if graph.pinned[group]:
            continue
        drop = rng.random(graph.size[group]) < fraction
        removed += int(drop.sum())
        for node in graph.members(group):
            layer = node.op
            mask = layer.kernel_mask.numpy().reshape(-1, layer.num_units)
            mask[:, drop] = 0
            layer.kernel_mask.assign(mask.reshape(layer.kernel_mask.shape))
    sync_batchnorm(model)
    return removed


def check_compacts_exactly(model, shape, rng):
    """compact() removes the masked groups without a warning, its outputs
    equal the masked model's, and deployed_counts counts what it ships."""
    x = rng.random((4,) + shape).astype("float32")
    expected = model(x, training=False).numpy()
    assert expected.std(axis=0).mean() > 1e-3 * np.abs(expected).max(), "output ignores input"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(__array__|softmax|structure).*")
        small = dkdp.compact(model)
    got = small(x, training=False).numpy()
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    params, macs = deployed_counts(model)
    assert params == dkdp.count_params(small, nonzero=True)
    assert macs == dkdp.count_macs(small)
    return small


def test_a_graph_with_keras_ops_calls_becomes_prunable_and_compacts():
    # Item 1: `x * sigmoid(x)` and `x + 3.0` in a functional graph crashed
    # prunable ("'Sigmoid' object has no attribute 'set_weights'").
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3)(inp)
    x = keras.layers.BatchNormalization()(x)
    x = x * keras.ops.sigmoid(x)
    x = keras.ops.relu(x + 3.0) * (1.0 / 6.0) * x  # hard-swish, as MobileNetV3
    x = keras.layers.Conv2D(6, 1)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = dkdp.prunable(keras.Model(inp, keras.layers.Dense(4)(x)))
    rng = np.random.default_rng(0)
    settle_batchnorm(model, rng, (8, 8, 3))
    graph = depgraph.of(model)
    conv = [n for n in graph.nodes if n.kind == "kernel"][0]
    group = graph.groups(conv.outputs[0])[0]
    assert not graph.pinned[group]  # the ops carry the channels through
    assert prune_groups(model, 0.4, rng) > 0
    small = check_compacts_exactly(model, (8, 8, 3), rng)
    assert small.count_params() < model.count_params() - 100


def test_a_constant_offset_keeps_a_channel_that_is_not_zero():
    # `x + 3.0` alone turns a removed unit into 3.0: it must stay.
    inp = keras.Input((6,))
    x = keras.layers.Dense(5)(inp)
    x = x + 3.0
    model = dkdp.prunable(keras.Model(inp, keras.layers.Dense(2)(x)))
    first = dkdp.masked_layers(model)[0]
    mask = first.kernel_mask.numpy()
    mask[:, 0] = 0
    first.kernel_mask.assign(mask)
    small = dkdp.compact(model)
    assert small.layers[1].units == 5
    x = np.random.default_rng(1).random((3, 6)).astype("float32")
    np.testing.assert_allclose(small(x), model(x), atol=1e-5)


def test_a_gate_of_one_half_does_not_keep_a_removed_channel():
    # Squeeze-and-excite: feature * sigmoid(expand(...)). A removed channel
    # of the expand conv gates with sigmoid(0) = 0.5; the product is zero
    # where the feature is, so the whole group goes.
    inp = keras.Input((8, 8, 3))
    f = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    s = keras.layers.GlobalAveragePooling2D(keepdims=True)(f)
    s = keras.layers.Conv2D(4, 1, activation="relu")(s)
    s = keras.layers.Conv2D(8, 1, activation="sigmoid")(s)
    x = keras.layers.Multiply()([f, s])
    x = keras.layers.ZeroPadding2D(1)(x)
    x = keras.layers.Conv2D(5, 3)(x)
    out = keras.layers.Dense(3)(keras.layers.Flatten()(x))
    model = dkdp.prunable(keras.Model(inp, out))
    graph = depgraph.of(model)
    convs = [n for n in graph.nodes if n.kind == "kernel"]
    assert graph.groups(convs[0].outputs[0]) == graph.groups(convs[2].outputs[0])
    rng = np.random.default_rng(2)
    assert prune_groups(model, 0.5, rng) > 0
    small = check_compacts_exactly(model, (8, 8, 3), rng)
    first, _, expand = [l for l in small.layers if isinstance(l, keras.layers.Conv2D)][:3]
    assert first.filters == expand.filters < 8


def test_a_layer_it_cannot_see_through_is_named():
    inp = keras.Input((6,))
    x = keras.layers.Dense(5)(inp)
    x = keras.layers.LayerNormalization()(x)
    model = dkdp.prunable(keras.Model(inp, keras.layers.Dense(2)(x)))
    first = dkdp.masked_layers(model)[0]
    mask = first.kernel_mask.numpy()
    mask[:, 0] = 0
    first.kernel_mask.assign(mask)
    with pytest.warns(UserWarning, match="layer_normalization"):
        dkdp.compact(model)


def nested_mobilenet():
    base = A.MobileNetV2(alpha=0.35, weights=None, input_shape=(32, 32, 3), include_top=False)
    return keras.Sequential([keras.Input((32, 32, 3)), base,
                             keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)])


APPLICATIONS = {
    "MobileNetV2": lambda: A.MobileNetV2(alpha=0.35, weights=None, input_shape=(32, 32, 3),
                                         classes=10, classifier_activation=None),
    "MobileNetV3Small": lambda: A.MobileNetV3Small(weights=None, input_shape=(32, 32, 3),
                                                   classes=10, classifier_activation=None),
    "EfficientNetB0": lambda: A.EfficientNetB0(weights=None, input_shape=(32, 32, 3),
                                               classes=10, classifier_activation=None),
    "ResNet50": lambda: A.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10,
                                   classifier_activation=None),
    "DenseNet121": lambda: A.DenseNet121(weights=None, input_shape=(32, 32, 3), classes=10,
                                         classifier_activation=None),
    "nested MobileNetV2": nested_mobilenet,
}


@pytest.mark.parametrize("name", [
    "MobileNetV2", "nested MobileNetV2",
    pytest.param("MobileNetV3Small", marks=pytest.mark.slow),
    pytest.param("EfficientNetB0", marks=pytest.mark.slow),
    pytest.param("ResNet50", marks=pytest.mark.slow),
    pytest.param("DenseNet121", marks=pytest.mark.slow),
])
def test_keras_applications_compact_their_pruned_groups_exactly(name):
    # Item 2: ZeroPadding2D, squeeze-and-excite Multiply and residual Add
    # blocked or miscounted channels; a nested base was one opaque layer.
    rng = np.random.default_rng(0)
    model = dkdp.prunable(APPLICATIONS[name]())
    settle_batchnorm(model, rng, (32, 32, 3))
    graph = depgraph.of(model)
    roots = graph.roots()
    pinned = [g for g in roots if graph.pinned[g]]
    assert len(pinned) == 1  # the classifier's units only
    prune_groups(model, 0.3, rng)
    small = check_compacts_exactly(model, (32, 32, 3), rng)
    assert small.count_params() < 0.6 * model.count_params()
