"""Each criterion against values computed by hand on a tiny layer."""

import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
from dkdp_keras import importance

W = np.array([[1.0, -2.0], [-3.0, 0.5], [0.25, 4.0]], "float32")  # fan_in 3, 2 units
MASK = np.array([[1, 1], [1, 0], [0, 1]], "float32")


def _layer(**kwargs):
    layer = dkdp.MaskedDense(2, use_bias=False, **kwargs)
    layer(np.zeros((1, 3), "float32"))
    layer.kernel.assign(W)
    layer.kernel_mask.assign(MASK)
    return layer


def test_magnitude_weight_unit_layer():
    layer = _layer()
    c = importance.Magnitude()
    np.testing.assert_allclose(c.score(layer, "weight"), np.abs(W * MASK))
    np.testing.assert_allclose(c.score(layer, "unit"), [4.0, 6.0])  # L1 per unit
    assert float(c.score(layer, "layer")) == pytest.approx(5.0)


def test_layer_score_averages_kept_units_only():
    layer = _layer()
    mask = MASK.copy()
    mask[:, 1] = 0.0
    layer.kernel_mask.assign(mask)
    assert float(importance.Magnitude().score(layer, "layer")) == pytest.approx(4.0)


def test_gradient_magnitude_and_taylor():
    layer = _layer(track_statistics=True)
    g1 = np.array([[1.0, 1.0], [2.0, 0.0], [0.0, -1.0]], "float32")
    g2 = -3.0 * g1
    for g in (g1, g2):
        layer.update_gradient_statistics(g * MASK)
    mean_abs_g = (np.abs(g1) + np.abs(g2)) / 2 * MASK
    np.testing.assert_allclose(
        importance.GradientMagnitude().score(layer, "weight"), mean_abs_g, rtol=1e-6
    )
    np.testing.assert_allclose(
        importance.GradientMagnitude().score(layer, "unit"), mean_abs_g.sum(0), rtol=1e-6
    )
    wm = W * MASK
    taylor_w = (np.abs(wm * g1) + np.abs(wm * g2)) / 2
    np.testing.assert_allclose(importance.Taylor().score(layer, "weight"), taylor_w, rtol=1e-6)
    taylor_u = (np.square((wm * g1).sum(0)) + np.square((wm * g2).sum(0))) / 2
    np.testing.assert_allclose(importance.Taylor().score(layer, "unit"), taylor_u, rtol=1e-6)


def test_gradient_criteria_explain_missing_statistics():
    with pytest.raises(ValueError, match="track_statistics=True"):
        importance.Taylor().score(_layer(), "weight")
    with pytest.raises(ValueError, match="collected none yet.*collect_gradients"):
        importance.GradientMagnitude().score(_layer(track_statistics=True), "unit")


def test_collect_gradients_matches_a_gradient_tape(rng):
    model = dkdp.prunable(
        keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), track_statistics=True
    )
    x = rng.normal(size=(8, 3)).astype("float32")
    y = rng.normal(size=(8, 2)).astype("float32")
    loss = keras.losses.MeanSquaredError()
    importance.collect_gradients(model, x, y, loss, batch_size=8)
    layer = dkdp.masked_layers(model)[0]
    # d/dW mean((xW + b - y)^2) = 2/(n*2) x^T (xW + b - y)
    residual = x @ layer.kernel.numpy() + layer.bias.numpy() - y
    grad = 2.0 / residual.size * x.T @ residual
    np.testing.assert_allclose(layer.gradient_abs.numpy(), np.abs(grad), rtol=1e-4, atol=1e-6)


def test_activation_frequency(rng):
    layer = dkdp.MaskedDense(2, activation="relu", track_statistics=True)
    x = rng.normal(size=(16, 3)).astype("float32")
    layer(x)
    out = layer(x, training=True).numpy()
    np.testing.assert_allclose(
        importance.ActivationFrequency().score(layer, "unit"), np.mean(out != 0, 0), atol=1e-6
    )
    np.testing.assert_allclose(
        importance.ActivationFrequency("mean_abs").score(layer, "unit"),
        np.mean(np.abs(out), 0), atol=1e-6,
    )
    weight = importance.ActivationFrequency().score(layer, "weight").numpy()
    assert weight.shape == (3, 2)
    np.testing.assert_allclose(weight[0], np.mean(out != 0, 0), atol=1e-6)
    with pytest.raises(ValueError, match="'nonzero' or 'mean_abs'"):
        importance.ActivationFrequency("often")


def test_activation_frequency_of_linear_layer_counts_positive_outputs(rng):
    layer = dkdp.MaskedConv2D(3, 3, track_statistics=True)
    x = rng.normal(size=(4, 6, 6, 2)).astype("float32")
    layer(x)
    out = layer(x, training=True).numpy()
    np.testing.assert_allclose(
        importance.ActivationFrequency().score(layer, "unit"),
        np.mean(out > 0, axis=(0, 1, 2)), atol=1e-6,
    )


def test_learned_mask_reads_gates():
    layer = _layer(learnable_mask=True)
    layer.gate.assign([-0.5, 2.0])
    np.testing.assert_allclose(importance.LearnedMask().score(layer, "unit"), [0.5, 2.0])
    np.testing.assert_allclose(
        importance.LearnedMask().score(layer, "weight"), np.array([[0.5, 2.0]] * 3) * MASK
    )
    with pytest.raises(ValueError, match="learnable_mask=True"):
        importance.LearnedMask().score(_layer(), "unit")


def test_output_contribution_ablates_units(rng):
    model = dkdp.prunable(keras.Sequential([
        keras.Input((3,)), keras.layers.Dense(2, activation="relu", name="h"), keras.layers.Dense(1, name="o")
    ]))
    hidden, out = dkdp.masked_layers(model)
    hidden.kernel.assign(np.eye(3, 2, dtype="float32"))
    hidden.bias.assign([0.0, 0.0])
    out.kernel.assign([[1.0], [10.0]])
    out.bias.assign([0.0])
    x = np.abs(rng.normal(size=(5, 3))).astype("float32")
    c = importance.OutputContribution(x)
    with pytest.raises(ValueError, match="prepare"):
        c.score(hidden, "unit")
    c.prepare(model)
    # Removing hidden unit 0 changes the output by x0, unit 1 by 10*x1.
    np.testing.assert_allclose(
        c.score(hidden, "unit"), [x[:, 0].mean(), 10 * x[:, 1].mean()], rtol=1e-5
    )
    np.testing.assert_array_equal(hidden.kernel_mask.numpy(), 1.0)  # restored
    y = np.zeros((5, 1), "float32")
    by_loss = importance.OutputContribution(x, y, target="loss", loss=keras.losses.MeanSquaredError())
    by_loss.prepare(model)
    full = np.mean((x[:, 0] + 10 * x[:, 1]) ** 2)
    expected = [full - np.mean((10 * x[:, 1]) ** 2), full - np.mean(x[:, 0] ** 2)]
    np.testing.assert_allclose(by_loss.score(hidden, "unit"), expected, rtol=1e-4)
    with pytest.raises(ValueError, match="needs both y and loss"):
        importance.OutputContribution(x, target="loss")


def test_combined_normalises_then_weights():
    layer = _layer(learnable_mask=True)
    layer.gate.assign([1.0, 3.0])
    c = importance.Combined([(importance.Magnitude(), 1.0), ("learned_mask", 2.0)])
    mag = np.array([4.0, 6.0])
    gate = np.array([1.0, 3.0])
    expected = mag / mag.mean() + 2.0 * gate / gate.mean()
    np.testing.assert_allclose(c.score(layer, "unit"), expected, rtol=1e-6)
    with pytest.raises(TypeError, match=r"\(criterion, weight\)"):
        importance.Combined([importance.Magnitude()])
    with pytest.raises(ValueError, match="weight must be > 0"):
        importance.Combined([(importance.Magnitude(), 0.0)])


def test_callables_and_names():
    layer = _layer()
    c = importance.get(lambda layer, granularity: keras.ops.ones(layer.kernel.shape))
    np.testing.assert_array_equal(c.score(layer, "weight"), np.ones((3, 2)))

    def wrong(layer, granularity):
        return keras.ops.ones((5,))

    with pytest.raises(ValueError, match=r"criterion wrong returned scores of shape \(5,\).*expected \(3, 2\)"):
        importance.get(wrong).score(layer, "weight")
    assert isinstance(importance.get("taylor"), importance.Taylor)
    assert isinstance(importance.get(importance.Magnitude), importance.Magnitude)
    with pytest.raises(ValueError, match="Unknown importance criterion 'fisher'"):
        importance.get("fisher")
    with pytest.raises(TypeError, match="must be a name"):
        importance.get(3)
    with pytest.raises(ValueError, match="granularity must be one of"):
        importance.Magnitude().score(layer, "neuron")


def test_wanda_weighs_each_kernel_row_by_the_rms_of_its_input():
    # Three input features: one at +-2, one at 1 and 3 (rms sqrt(5)), one dead.
    x = np.array([[2.0, 1.0, 0.0], [-2.0, 3.0, 0.0]], "float32")
    layer = _layer()
    model = keras.Sequential([keras.Input((3,)), layer])
    c = importance.Wanda(x, batch_size=1)  # two batches, averaged
    c.prepare(model)
    assert layer.input_probe is None  # the probe is gone after prepare
    rms = np.array([2.0, np.sqrt(5.0), 0.0], "float32")
    np.testing.assert_allclose(c.score(layer, "weight"), np.abs(W * MASK) * rms[:, None],
                               rtol=1e-6)
    np.testing.assert_allclose(c.score(layer, "unit"), (np.abs(W * MASK) * rms[:, None]).sum(0),
                               rtol=1e-6)


def test_wanda_reads_a_convolution_input_channel_and_depthwise_channels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6, 6, 3)).astype("float32") * np.array([1.0, 0.5, 0.0], "float32")
    model = dkdp.prunable(keras.Sequential([
        keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3, name="conv"),
        keras.layers.DepthwiseConv2D(3, name="depthwise")]))
    c = importance.Wanda(x)
    c.prepare(model)
    conv, depthwise = dkdp.masked_layers(model)
    rms = np.sqrt(np.mean(x ** 2, axis=(0, 1, 2)))
    np.testing.assert_allclose(c.score(conv, "weight"),
                               np.abs(conv.kernel.numpy()) * rms[None, None, :, None], rtol=1e-5)
    hidden = conv(x).numpy()
    rms = np.sqrt(np.mean(hidden ** 2, axis=(0, 1, 2)))
    np.testing.assert_allclose(c.score(depthwise, "weight"),
                               np.abs(depthwise.kernel.numpy()) * rms[None, None, :, None],
                               rtol=1e-5)
    assert np.all(c.score(conv, "weight").numpy()[:, :, 2] == 0)  # the dead channel


def test_wanda_prunes_the_weights_of_dead_inputs_first_where_magnitude_does_not():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    x[:, 4:] = 0.0  # four inputs never lit
    y = (x[:, 0] > 0).astype("int32")

    def kept_on_dead_inputs(criterion):
        keras.utils.set_random_seed(0)
        model = dkdp.prunable(keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
                                                keras.layers.Dense(2, name="head")]))
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, epochs=2, batch_size=64, verbose=0, callbacks=[dkdp.DKDPCallback(
            importance=criterion, scope="layer", verbose=0,
            threshold=dkdp.thresholds.ConstantSparsity(0.5))])
        first = dkdp.masked_layers(model)[0]
        return int(first.kernel_mask.numpy()[4:].sum())

    assert kept_on_dead_inputs(importance.Wanda(x)) == 0
    assert kept_on_dead_inputs("magnitude") > 16  # about half of the 64


def test_wanda_says_what_is_missing():
    layer = _layer()
    with pytest.raises(ValueError, match=r"Wanda has no input norms for layer .*prepare"):
        importance.Wanda(np.zeros((2, 3), "float32")).score(layer)
    model = keras.Sequential([keras.Input((3,)), layer])
    with pytest.raises(ValueError, match=r"Wanda x has examples of shape \(2,\)"):
        importance.Wanda(np.zeros((4, 2), "float32")).prepare(model)
