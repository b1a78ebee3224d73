"""Models with `None` dimensions (variable images or sequences) train and
are counted, never crash in MAC counting (issue 22, item 6)."""
import warnings

import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
from dkdp_keras import counting, thresholds


def sequence_model(length=None):
    inp = keras.Input((length, 4))
    x = keras.layers.Conv1D(8, 3, activation="relu")(inp)
    x = keras.layers.Conv1D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalMaxPooling1D()(x)
    return keras.Model(inp, keras.layers.Dense(3)(x))


def data(n=48, length=20):
    rng = np.random.default_rng(0)
    return rng.random((n, length, 4)).astype("float32"), rng.integers(0, 3, n)


def test_macs_at_a_reference_shape_equal_those_of_the_fixed_shape_model():
    variable, fixed = dkdp.prunable(sequence_model()), dkdp.prunable(sequence_model(20))
    with pytest.warns(UserWarning, match="unknown size"):
        per_position = dkdp.count_macs(variable)
    assert per_position < dkdp.count_macs(fixed)
    counting.set_reference(variable, (20, 4))
    assert dkdp.count_macs(variable) == dkdp.count_macs(fixed)
    from dkdp_keras.budget import deployed_counts
    assert deployed_counts(variable)[1] == deployed_counts(fixed)[1]


def test_a_mac_budget_on_a_variable_length_model_needs_an_input_shape():
    model = dkdp.prunable(sequence_model())
    x, y = data()
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = dkdp.DKDPCallback(granularity="unit", verbose=0,
                                 threshold=thresholds.Adaptive(dkdp.Budget(max_macs=1000),
                                                               monitor="loss"))
    with pytest.raises(ValueError, match=r"input_shape=\(height, width, channels\)"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    fixed = dkdp.prunable(sequence_model(20))
    budget = dkdp.Budget(max_macs=int(0.5 * dkdp.count_macs(fixed)), input_shape=(20, 4))
    callback = dkdp.DKDPCallback(granularity="unit", verbose=0,
                                 threshold=thresholds.Adaptive(budget, monitor="loss"))
    history = model.fit(x, y, epochs=3, verbose=0, callbacks=[callback])
    assert history.history["kept_macs"][-1] <= budget.max_macs
    from dkdp_keras.budget import deployed_counts
    assert deployed_counts(model)[1] == history.history["kept_macs"][-1]


def test_a_dkdp_model_counts_at_the_shape_of_its_data():
    x, y = data()
    model = dkdp.DKDPModel(sequence_model(), student=sequence_model())
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*unknown size.*")
        history = model.fit(x, y, epochs=1, verbose=0, callbacks=[
            dkdp.DKDPCallback(granularity="unit", verbose=0,
                              threshold=thresholds.ConstantSparsity(0.3))])
    fixed = dkdp.prunable(sequence_model(20))
    assert 0 < history.history["kept_macs"][-1] <= dkdp.count_macs(fixed)


def test_einsum_dense_with_an_unknown_output_dimension_trains():
    inp = keras.Input((None, 8))
    x = keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 16))(inp)
    x = keras.layers.Dense(8)(x)  # outputs (None, None, 8): positions unknown
    x = keras.layers.GlobalAveragePooling1D()(x)
    model = dkdp.prunable(keras.Model(inp, keras.layers.Dense(3)(x)))
    rng = np.random.default_rng(0)
    xs, ys = rng.random((32, 10, 8)).astype("float32"), rng.integers(0, 3, 32)
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.warns(UserWarning, match="unknown size"):
        history = model.fit(xs, ys, epochs=1, verbose=0, callbacks=[
            dkdp.DKDPCallback(threshold=thresholds.ConstantSparsity(0.5), verbose=0)])
    assert history.history["kept_params"][-1] < dkdp.count_params(model, nonzero=False)
    # counted per position of the unknown length: the kernels' non-zeros
    kernels = [l for l in dkdp.masked_layers(model)]
    assert history.history["kept_macs"][-1] == sum(
        int(np.count_nonzero(l.effective_kernel())) for l in kernels)
