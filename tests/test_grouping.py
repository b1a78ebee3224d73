"""Unit pruning by channel group (issue 22, item 2): a residual Add group
or a squeeze-and-excite group loses a channel in every member or in none,
so what the budget counts is what compact() removes."""
import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
from dkdp_keras import depgraph, thresholds
from dkdp_keras.budget import deployed_counts
from dkdp_keras.grouping import UnitEntries, UnitGroup


def residual_model():
    inp = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(8, 3, padding="same")(inp)
    a = keras.layers.BatchNormalization()(a)
    x = keras.layers.ReLU()(a)
    b = keras.layers.Conv2D(8, 3, padding="same")(x)
    b = keras.layers.BatchNormalization()(b)
    x = keras.layers.Add()([a, b])  # a and b: one group
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)  # carries it
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(6, 1)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(3)(x))


def fit(model, granularity, threshold, epochs=2, **extra):
    rng = np.random.default_rng(0)
    x = rng.random((64, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, 64)
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = dkdp.DKDPCallback(granularity=granularity, threshold=threshold,
                                 verbose=0, **extra)
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0, callbacks=[callback])
    return callback, x


def test_the_members_of_a_residual_group_form_one_entry():
    model = dkdp.prunable(residual_model())
    layers = dkdp.masked_layers(model)
    units = UnitEntries(model, layers)
    groups = [e for e in units.entries if isinstance(e, UnitGroup)]
    assert len(groups) == 1
    names = {m.name for m in groups[0].members}
    conv_a, conv_b, depthwise = layers[0].name, layers[1].name, layers[2].name
    assert names == {conv_a, conv_b, depthwise}
    assert layers[-1].name in units.fixed  # the classifier: a model output


def test_unit_pruning_removes_a_residual_channel_everywhere_or_nowhere():
    model = dkdp.prunable(residual_model())
    keras.utils.set_random_seed(1)
    schedule = thresholds.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=4)
    fit(model, "unit", schedule)
    layers = dkdp.masked_layers(model)
    alive = [l.unit_mask().numpy() > 0 for l in layers[:3]]
    assert not alive[0].all()  # something was pruned
    np.testing.assert_array_equal(alive[0], alive[1])
    np.testing.assert_array_equal(alive[0], alive[2])
    small = dkdp.compact(model)
    convs = [l for l in small.layers if isinstance(l, keras.layers.Conv2D)]
    assert convs[0].filters == convs[1].filters == int(alive[0].sum())
    x = np.random.default_rng(3).random((4, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(small(x), model(x, training=False), atol=1e-5)
    assert deployed_counts(model)[0] == dkdp.count_params(small, nonzero=True)


@pytest.mark.slow
def test_mobilenet_under_a_budget_ships_what_it_logs():
    model = dkdp.prunable(keras.applications.MobileNetV2(
        alpha=0.35, weights=None, input_shape=(32, 32, 3), classes=10,
        classifier_activation=None))
    dense = dkdp.count_params(model, nonzero=False)
    budget = dkdp.Budget(max_params=int(0.4 * dense))
    rng = np.random.default_rng(0)
    x = rng.random((64, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, 64)
    model.compile(optimizer="adam", metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, epochs=6, batch_size=32, verbose=0,
                        validation_data=(x[:32], y[:32]), callbacks=[
        dkdp.DKDPCallback(granularity="unit", threshold=thresholds.Adaptive(budget),
                          verbose=0)])
    logged = history.history["kept_params"][-1]
    with pytest.warns() as record:
        small = dkdp.compact(model)
    assert not [w for w in record if "compact" in str(w.message)]
    shipped = small.count_params()
    assert shipped <= budget.max_params * 1.01
    assert abs(shipped - logged) <= 0.01 * logged
