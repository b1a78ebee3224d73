"""prunable / strip / sparsity on whole models."""

import warnings

import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
from tests.conftest import small_cnn


def _random_masks(model, rng, keep=0.5):
    for layer in dkdp.masked_layers(model):
        layer.kernel_mask.assign((rng.random(layer.kernel.shape) < keep).astype("float32"))


def test_prunable_swaps_layers_and_keeps_outputs(cnn, rng):
    x = rng.normal(size=(4, 8, 8, 2)).astype("float32")
    masked = dkdp.prunable(cnn)
    names = [type(layer).__name__ for layer in masked.layers]
    assert names == [
        "InputLayer", "MaskedConv2D", "MaskedBatchNormalization", "ReLU",
        "MaskedDepthwiseConv2D", "Flatten", "MaskedDense", "MaskedDense",
    ]
    np.testing.assert_array_equal(masked(x).numpy(), cnn(x).numpy())
    assert masked is not cnn and masked.name == cnn.name
    assert dkdp.sparsity(masked) == dkdp.sparsity(cnn) == 0.0


def test_prunable_sequential_and_layer_selection(rng):
    model = keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(4, name="a"), keras.layers.Dense(2, name="b")
    ])
    masked = dkdp.prunable(model, layers=["b"])
    assert isinstance(masked, keras.Sequential)
    assert [type(layer).__name__ for layer in masked.layers] == ["Dense", "MaskedDense"]
    only_a = dkdp.prunable(model, layers=lambda layer: layer.name == "a")
    assert [type(layer).__name__ for layer in only_a.layers] == ["MaskedDense", "Dense"]
    with pytest.raises(ValueError, match=r"names \['nope'\]"):
        dkdp.prunable(model, layers=["nope"])
    with pytest.raises(TypeError, match="layers must be None"):
        dkdp.prunable(model, layers=3)


def test_prunable_nested_model_and_already_masked(rng):
    inner = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="relu")], name="inner")
    inputs = keras.Input((5,))
    outer = keras.Model(inputs, keras.layers.Dense(2)(inner(inputs)))
    masked = dkdp.prunable(outer)
    assert len(dkdp.masked_layers(masked)) == 2
    x = rng.normal(size=(3, 5)).astype("float32")
    np.testing.assert_allclose(masked(x).numpy(), outer(x).numpy(), atol=1e-6)
    _random_masks(masked, rng)
    again = dkdp.prunable(masked)  # masks are kept, not reset
    np.testing.assert_allclose(again(x).numpy(), masked(x).numpy(), atol=1e-6)


def test_unsupported_layers_are_named_in_one_warning():
    inputs = keras.Input((7,), dtype="int32")
    x = keras.layers.Embedding(20, 4, name="emb")(inputs)
    x = keras.layers.LSTM(3, name="lstm")(x)
    outputs = keras.layers.Dense(2)(x)
    model = keras.Model(inputs, outputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masked = dkdp.prunable(model)
    messages = [str(w.message) for w in caught if "prunable" in str(w.message)]
    assert len(messages) == 1
    assert "emb (Embedding)" in messages[0] and "lstm (LSTM)" in messages[0]
    assert type(masked.layers[-1]).__name__ == "MaskedDense"


def test_prunable_refuses_what_it_cannot_rewire():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    sub = Sub()
    sub(np.zeros((1, 3), "float32"))
    with pytest.raises(TypeError, match="subclassed keras.Model.*Functional"):
        dkdp.prunable(sub)
    with pytest.raises(TypeError, match="must be a keras.Model"):
        dkdp.prunable("model.keras")
    with pytest.raises(ValueError, match="is not built"):
        dkdp.prunable(keras.Sequential([keras.layers.Dense(2)]))


def test_strip_bakes_masks_and_gates_in(rng):
    model = dkdp.prunable(small_cnn(), learnable_mask=True)
    _random_masks(model, rng)
    for layer in dkdp.masked_layers(model):
        layer.gate.assign(rng.random(layer.num_units).astype("float32") + 0.5)
    x = rng.normal(size=(4, 8, 8, 2)).astype("float32")
    stripped = dkdp.strip(model)
    assert not dkdp.masked_layers(stripped)
    assert {type(layer).__name__ for layer in stripped.layers} >= {"Conv2D", "DepthwiseConv2D", "Dense"}
    np.testing.assert_allclose(stripped(x).numpy(), model(x).numpy(), atol=1e-5)
    assert dkdp.sparsity(stripped) == pytest.approx(dkdp.sparsity(model))
    for old, new in zip(dkdp.masked_layers(model), [l for l in stripped.layers if hasattr(l, "kernel")]):
        assert np.all(new.kernel.numpy()[old.kernel_mask.numpy() == 0] == 0.0)


def test_sparsity_counts_zero_kernel_entries(rng):
    model = dkdp.prunable(keras.Sequential([
        keras.Input((10,)), keras.layers.Dense(10), keras.layers.Dense(5)
    ]))
    first, second = dkdp.masked_layers(model)
    mask = np.ones((10, 10), "float32")
    mask[:3] = 0.0  # 30 of 100
    first.kernel_mask.assign(mask)
    second.kernel_mask.assign(np.zeros((10, 5), "float32"))  # 50 of 50
    assert dkdp.sparsity(model) == pytest.approx(80 / 150)
    with pytest.raises(ValueError, match="no prunable kernel"):
        dkdp.sparsity(keras.Sequential([keras.Input((3,)), keras.layers.ReLU()]))
