"""Masked layers behave exactly like their Keras layers, with kernel × mask."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import dkdp_keras as dkdp

CASES = [
    (keras.layers.Dense, dkdp.MaskedDense, dict(units=5, activation="relu"), (3, 4)),
    (keras.layers.Conv1D, dkdp.MaskedConv1D, dict(filters=3, kernel_size=3), (2, 9, 2)),
    (keras.layers.Conv2D, dkdp.MaskedConv2D,
     dict(filters=3, kernel_size=3, padding="same", activation="tanh"), (2, 6, 6, 2)),
    (keras.layers.Conv3D, dkdp.MaskedConv3D, dict(filters=2, kernel_size=2), (1, 4, 4, 4, 2)),
    (keras.layers.DepthwiseConv1D, dkdp.MaskedDepthwiseConv1D,
     dict(kernel_size=3, depth_multiplier=2), (2, 9, 3)),
    (keras.layers.DepthwiseConv2D, dkdp.MaskedDepthwiseConv2D,
     dict(kernel_size=3, depth_multiplier=2, padding="same"), (2, 6, 6, 3)),
]
IDS = [case[1].__name__ for case in CASES]


def _pair(plain_cls, masked_cls, kwargs, shape, rng, **extra):
    x = rng.normal(size=shape).astype("float32")
    plain = plain_cls(**kwargs, bias_initializer="random_normal")
    masked = masked_cls(**kwargs, bias_initializer="random_normal", **extra)
    plain(x)
    masked(x)
    masked.kernel.assign(plain.kernel)
    masked.bias.assign(plain.bias)
    return plain, masked, x


@pytest.mark.parametrize("plain_cls,masked_cls,kwargs,shape", CASES, ids=IDS)
def test_all_ones_mask_is_identical_to_plain_layer(plain_cls, masked_cls, kwargs, shape, rng):
    plain, masked, x = _pair(plain_cls, masked_cls, kwargs, shape, rng)
    np.testing.assert_array_equal(masked.kernel_mask.numpy(), 1.0)
    np.testing.assert_allclose(masked(x).numpy(), plain(x).numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("plain_cls,masked_cls,kwargs,shape", CASES, ids=IDS)
def test_random_mask_computes_kernel_times_mask(plain_cls, masked_cls, kwargs, shape, rng):
    plain, masked, x = _pair(plain_cls, masked_cls, kwargs, shape, rng)
    mask = (rng.random(masked.kernel.shape) > 0.5).astype("float32")
    units = mask.reshape(-1, masked.num_units)
    units[:, 0] = 0.0  # unit 0 removed entirely: its bias goes too
    units[:, -1] = 1.0
    mask = units.reshape(mask.shape)
    masked.kernel_mask.assign(mask)
    plain.kernel.assign(plain.kernel.numpy() * mask)
    unit_alive = units.max(axis=0)
    plain.bias.assign(plain.bias.numpy() * unit_alive)
    np.testing.assert_allclose(masked(x).numpy(), plain(x).numpy(), rtol=0, atol=1e-5)
    # The removed unit outputs activation(0) everywhere.
    out = masked(x).numpy()
    dead = out[..., 0]
    np.testing.assert_allclose(dead, masked.activation(np.zeros_like(dead)), atol=0)


@pytest.mark.parametrize("plain_cls,masked_cls,kwargs,shape", CASES, ids=IDS)
def test_pruned_weights_get_zero_gradient(plain_cls, masked_cls, kwargs, shape, rng):
    _, masked, x = _pair(plain_cls, masked_cls, kwargs, shape, rng)
    mask = (rng.random(masked.kernel.shape) > 0.5).astype("float32")
    masked.kernel_mask.assign(mask)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(masked(x)))
    grad = tape.gradient(loss, masked.kernel).numpy()
    assert np.all(grad[mask == 0] == 0.0)
    assert np.any(grad[mask == 1] != 0.0)
    # The mask is not trainable: it is not among the trainable weights.
    assert all(w.name != "kernel_mask" for w in masked.trainable_weights)


def test_gate_scales_each_unit_and_l1_penalty_is_added(rng):
    x = rng.normal(size=(4, 3)).astype("float32")
    layer = dkdp.MaskedDense(2, learnable_mask=True, gate_l1=0.1)
    layer(x)
    layer.gate.assign([0.5, -2.0])
    expected = (x @ layer.kernel.numpy() + layer.bias.numpy()) * np.array([0.5, -2.0])
    np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-5)
    penalty = sum(float(v) for v in layer.losses)
    assert penalty == pytest.approx(0.1 * 2.5)
    assert "gate" in [w.name for w in layer.trainable_weights]


def test_config_round_trips_every_argument():
    layer = dkdp.MaskedConv2D(
        4, 3, strides=2, padding="same", activation="relu",
        learnable_mask=True, gate_l1=0.01, track_statistics=True,
    )
    config = layer.get_config()
    again = dkdp.MaskedConv2D.from_config(config)
    assert again.get_config() == config
    assert (again.learnable_mask, again.gate_l1, again.track_statistics) == (True, 0.01, True)
    assert again.strides == (2, 2) and again.padding == "same"


@pytest.mark.parametrize(
    "kwargs,error,text",
    [
        (dict(learnable_mask="yes"), TypeError, "learnable_mask must be True or False"),
        (dict(learnable_mask=True, gate_l1=-1.0), ValueError, "gate_l1 must be a finite number >= 0"),
        (dict(learnable_mask=True, gate_l1="big"), TypeError, "gate_l1 must be a number"),
        (dict(gate_l1=0.1), ValueError, "learnable_mask=True"),
        (dict(track_statistics=1), TypeError, "track_statistics must be True or False"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, text):
    with pytest.raises(error, match=text):
        dkdp.MaskedDense(3, **kwargs)


def test_keras_file_keeps_masks_gates_and_statistics(tmp_path, rng, cnn):
    model = dkdp.prunable(cnn, learnable_mask=True, track_statistics=True)
    x = rng.normal(size=(5, 8, 8, 2)).astype("float32")
    for layer in dkdp.masked_layers(model):
        layer.kernel_mask.assign((rng.random(layer.kernel.shape) > 0.3).astype("float32"))
        layer.gate.assign(rng.random(layer.num_units).astype("float32"))
    model(x, training=True)  # fills activation statistics
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for old, new in zip(dkdp.masked_layers(model), dkdp.masked_layers(loaded)):
        assert type(new) is type(old)
        for a, b in zip(old.weights, new.weights):
            assert a.name == b.name
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-6)


def test_activation_statistics_are_running_means(rng):
    layer = dkdp.MaskedDense(2, activation="relu", track_statistics=True)
    batches = [rng.normal(size=(8, 3)).astype("float32") for _ in range(3)]
    layer(batches[0])
    outs = [layer(b, training=True).numpy() for b in batches]
    nonzero = np.mean([np.mean(o != 0, axis=0) for o in outs], axis=0)
    mean_abs = np.mean([np.mean(np.abs(o), axis=0) for o in outs], axis=0)
    np.testing.assert_allclose(layer.activation_nonzero.numpy(), nonzero, atol=1e-6)
    np.testing.assert_allclose(layer.activation_abs.numpy(), mean_abs, atol=1e-6)
    assert float(layer.activation_steps.numpy()) == 3
    layer(batches[0], training=False)  # inference leaves them alone
    assert float(layer.activation_steps.numpy()) == 3


def test_gradient_statistics_are_running_means(rng):
    layer = dkdp.MaskedDense(2, track_statistics=True)
    layer(np.zeros((1, 3), "float32"))
    w = layer.kernel.numpy()
    grads = [rng.normal(size=(3, 2)).astype("float32") for _ in range(4)]
    for g in grads:
        layer.update_gradient_statistics(g)
    np.testing.assert_allclose(
        layer.gradient_abs.numpy(), np.mean([np.abs(g) for g in grads], 0), atol=1e-6
    )
    np.testing.assert_allclose(
        layer.taylor.numpy(), np.mean([np.abs(w * g) for g in grads], 0), atol=1e-6
    )
    np.testing.assert_allclose(
        layer.taylor_unit.numpy(),
        np.mean([np.square((w * g).sum(axis=0)) for g in grads], 0),
        rtol=1e-5,
    )
    layer.reset_statistics()
    assert float(layer.gradient_steps.numpy()) == 0
    assert not np.any(layer.taylor.numpy())


def test_gradient_statistics_need_tracking():
    layer = dkdp.MaskedDense(2)
    layer(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="track_statistics=True"):
        layer.update_gradient_statistics(np.zeros((3, 2), "float32"))


@pytest.mark.parametrize("options", [{}, {"renorm": True}], ids=["folded", "renorm"])
def test_masked_batchnorm_folds_its_mask_into_gamma_and_beta_bit_for_bit(rng, options):
    """The fast path (mask folded into gamma and beta) gives exactly what a
    BatchNormalization whose output is multiplied by the mask gives: outputs
    in training and inference, gradients and moving statistics. With renorm
    the layer must take the general path (the fast one has no renorm)."""
    import tensorflow as tf

    from dkdp_keras.layers import MaskedBatchNormalization

    x = tf.constant(rng.normal(size=(8, 5, 5, 6)).astype("float32") * 3 + 1)
    mask = np.array([1, 0, 1, 1, 0, 1], "float32")
    masked = MaskedBatchNormalization(momentum=0.9, **options)
    plain = keras.layers.BatchNormalization(momentum=0.9, **options)
    for layer in (masked, plain):
        layer.build(x.shape)
        layer.gamma.assign(np.linspace(0.5, 2.0, 6).astype("float32"))
        layer.beta.assign(np.linspace(-1.0, 1.0, 6).astype("float32"))
    masked.channel_mask.assign(mask)
    seen = []
    for layer, after in ((masked, lambda y: y), (plain, lambda y: y * mask)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = after(layer(x, training=True))
            loss = tf.reduce_sum(y * tf.sin(y))  # not linear: gradients depend on y
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        seen.append([y, after(layer(x, training=False)), *grads,
                     layer.moving_mean, layer.moving_variance])
    for name, got, want in zip(["training output", "inference output", "d/dx", "d/dgamma",
                                "d/dbeta", "moving mean", "moving variance"], *seen):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
    assert np.all(seen[0][1].numpy()[..., 1] == 0.0) and np.all(seen[0][3].numpy()[[1, 4]] == 0.0)
    assert np.abs(seen[0][2].numpy()).max() > 0.1  # the input's gradient is not trivial


def test_masked_batchnorm_zeroes_removed_channels_and_round_trips(tmp_path, rng):
    from dkdp_keras.layers import MaskedBatchNormalization

    inputs = keras.Input((4, 4, 3))
    outputs = MaskedBatchNormalization(name="bn")(inputs)
    model = keras.Model(inputs, outputs)
    bn = model.get_layer("bn")
    bn.beta.assign([1.0, 2.0, 3.0])
    bn.channel_mask.assign([1.0, 0.0, 1.0])
    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    for training in (False, True):
        out = model(x, training=training).numpy()
        assert np.all(out[..., 1] == 0.0) and np.all(out[..., 0] != 0.0)
    path = tmp_path / "bn.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.get_layer("bn").channel_mask.numpy(), [1.0, 0.0, 1.0])
    stripped = dkdp.strip(model)
    assert type(stripped.get_layer("bn")) is keras.layers.BatchNormalization
    np.testing.assert_allclose(stripped(x).numpy(), model(x).numpy(), atol=1e-6)
