"""compact(): removed units go for real, outputs stay."""

import warnings

import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
from dkdp_keras import importance
from dkdp_keras.compaction import ALIGN, compact, deployed_counts
from dkdp_keras.prunable import sync_batchnorm
from dkdp_keras.thresholds import compute_masks, apply_masks


def unit_prune(model, sparsity, rng=None):
    """Remove units at random (rng) or by magnitude, as the callback would."""
    layers = dkdp.masked_layers(model)
    if rng is None:
        scores = [importance.Magnitude().score(l, "unit") for l in layers]
    else:
        scores = [rng.random(l.num_units) for l in layers]
    protect = dkdp.graph.output_unit_layers(model)
    result = compute_masks(layers, scores, sparsity, granularity="unit",
                           normalize="mean", protect_units=protect)
    apply_masks(layers, result.masks)
    sync_batchnorm(model)
    return model


def aligned(kept, width):
    """The width compact gives a group that keeps `kept` of `width` channels
    (compaction.ALIGN: a multiple of 16 from 64 channels on, or all)."""
    if width < 4 * ALIGN:
        return kept
    up = -(-kept // ALIGN) * ALIGN
    return width if up >= width else up


def assert_same(a, b, x, atol=1e-5):
    np.testing.assert_allclose(a(x, training=False).numpy(), b(x, training=False).numpy(),
                               rtol=0, atol=atol)


def test_reference_cnn_shrinks_and_keeps_its_outputs(rng):
    model = unit_prune(dkdp.prunable(dkdp.zoo.reference_cnn()), 0.7)
    # Non-trivial BatchNorm statistics and biases.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.moving_mean.assign(rng.normal(size=n).astype("float32"))
            layer.moving_variance.assign(rng.random(n).astype("float32") + 0.5)
            layer.beta.assign(rng.normal(size=n).astype("float32"))
    small = compact(model)
    x = rng.random((8, 28, 28, 1)).astype("float32")
    assert_same(small, model, x)
    assert not dkdp.masked_layers(small)
    kept = {l.name: aligned(int(l.unit_mask().numpy().sum()), l.num_units)
            for l in dkdp.masked_layers(model)}
    sizes = {l.name: (l.units if hasattr(l, "units") else l.filters)
             for l in small.layers if hasattr(l, "kernel")}
    assert sizes == kept
    # Channels kept for alignment are zeros: the budget's count is what ships.
    assert deployed_counts(model) == (dkdp.count_params(small, nonzero=True),
                                      dkdp.count_macs(small, nonzero=True))
    assert small.count_params() < 0.4 * dkdp.zoo.reference_cnn().count_params()
    assert small.output.shape[-1] == 10


def test_dense_chain_and_plain_models(rng):
    model = unit_prune(dkdp.prunable(dkdp.zoo.lenet_300_100()), 0.8)
    x = rng.random((4, 28, 28, 1)).astype("float32")
    small = compact(model)
    assert_same(small, model, x)
    assert [l.units for l in small.layers if hasattr(l, "units")][:2] == [
        aligned(int(l.unit_mask().numpy().sum()), l.num_units)
        for l in dkdp.masked_layers(model)[:2]]
    # A stripped (plain) model with zero columns compacts the same way.
    again = compact(dkdp.strip(model))
    assert again.count_params() == small.count_params()
    assert_same(again, model, x)


def _random_model(rng, seed):
    kind = seed % 3
    inputs = keras.Input((12, 12, 3) if kind else (20,))
    x = inputs
    if kind:
        for _ in range(rng.integers(1, 4)):
            x = keras.layers.Conv2D(int(rng.integers(3, 9)), 3, padding=rng.choice(["same", "valid"]) if x.shape[1] >= 5 else "same",
                                    use_bias=bool(rng.integers(0, 2)),
                                    activation=rng.choice([None, "relu", "tanh"]))(x)
            if rng.random() < 0.6:
                x = keras.layers.BatchNormalization()(x)
                x = keras.layers.ReLU()(x)
            if rng.random() < 0.4:  # a residual block: coupled channels
                y = keras.layers.Conv2D(x.shape[-1], 3, padding="same", activation="relu")(x)
                x = keras.layers.Add()([x, y])
            if rng.random() < 0.3:
                x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
            if rng.random() < 0.3:  # a branch concatenated back
                y = keras.layers.Conv2D(int(rng.integers(2, 6)), 1, activation="relu")(x)
                x = keras.layers.Concatenate()([x, y])
            if rng.random() < 0.4 and x.shape[1] >= 4:
                x = keras.layers.MaxPooling2D(2)(x)
        x = keras.layers.Flatten()(x) if kind == 1 else keras.layers.GlobalAveragePooling2D()(x)
    for _ in range(rng.integers(1, 3)):
        x = keras.layers.Dense(int(rng.integers(4, 17)), activation=rng.choice(["relu", None, "elu"]))(x)
        if rng.random() < 0.3:
            x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(5)(x)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("seed", range(16))
def test_random_architectures_keep_their_outputs(seed):
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    model = dkdp.prunable(_random_model(rng, seed))
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.beta.assign(rng.normal(size=n).astype("float32"))
            layer.moving_mean.assign(rng.normal(size=n).astype("float32"))
    for layer in dkdp.masked_layers(model):
        layer.bias.assign(rng.normal(size=layer.num_units).astype("float32")) if layer.bias is not None else None
    unit_prune(model, float(rng.uniform(0.2, 0.7)), rng)
    small = compact(model)
    x = rng.normal(size=(6,) + tuple(model.inputs[0].shape[1:])).astype("float32")
    assert_same(small, model, x)
    assert small.count_params() < dkdp.count_params(model, nonzero=False)
    assert small.output.shape == model.output.shape


def _residual(merge):
    inputs = keras.Input((8, 8, 4))
    a = keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = keras.layers.Conv2D(4, 3, padding="same", name="b")(a)
    x = merge(name="join")([a, b])
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3)(x)
    return dkdp.prunable(keras.Model(inputs, outputs))


def _remove_unit(layer, unit):
    mask = layer.kernel_mask.numpy()
    units = mask.reshape(-1, layer.num_units)
    units[:, unit] = 0.0
    layer.kernel_mask.assign(units.reshape(mask.shape))


def test_residual_channels_go_only_when_removed_in_every_member(rng):
    x = rng.normal(size=(2, 8, 8, 4)).astype("float32")
    model = _residual(keras.layers.Add)
    _remove_unit(model.get_layer("a"), 0)
    small = compact(model)
    assert (small.get_layer("a").filters, small.get_layer("b").filters) == (4, 4)
    assert_same(small, model, x)
    _remove_unit(model.get_layer("b"), 0)
    _remove_unit(model.get_layer("b"), 2)
    small = compact(model)
    assert (small.get_layer("a").filters, small.get_layer("b").filters) == (3, 3)
    assert_same(small, model, x)


def test_concatenate_lays_channels_side_by_side(rng):
    model = _residual(keras.layers.Concatenate)
    _remove_unit(model.get_layer("a"), 0)
    _remove_unit(model.get_layer("b"), 3)
    small = compact(model)
    # a's unit 0 is a zero input of b and a zero part of the concatenation:
    # it goes from both; b's unit 3 goes too.
    assert (small.get_layer("a").filters, small.get_layer("b").filters) == (3, 3)
    assert small.get_layer("b").kernel.shape[-2] == 3
    assert small.layers[-1].kernel.shape[0] == 6
    assert_same(small, model, rng.normal(size=(2, 8, 8, 4)).astype("float32"))


def test_layers_it_cannot_see_through_are_named_and_left_whole(rng):
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    x = keras.layers.LayerNormalization(name="ln")(x)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    model = dkdp.prunable(keras.Model(inputs, outputs))
    _remove_unit(model.get_layer("a"), 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = compact(model)
    messages = [str(w.message) for w in caught if "compact" in str(w.message)]
    assert len(messages) == 1 and "ln" in messages[0]
    assert small.get_layer("a").filters == 4
    assert_same(small, model, rng.normal(size=(2, 8, 8, 4)).astype("float32"))


def test_depthwise_carries_channels_through(rng):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 1, name="expand")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.Conv2D(5, 1, name="project")(x)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
    model = dkdp.prunable(keras.Model(inputs, outputs))
    for unit in (1, 4):
        _remove_unit(model.get_layer("expand"), unit)
        _remove_unit(model.get_layer("dw"), unit)
    sync_batchnorm(model)
    small = compact(model)
    assert small.get_layer("expand").filters == 4
    assert small.get_layer("dw").kernel.shape[-2] == 4
    assert small.get_layer("project").kernel.shape[-2] == 4
    assert_same(small, model, rng.normal(size=(2, 8, 8, 3)).astype("float32"))


def test_a_sequential_loaded_from_a_keras_file_compacts(tmp_path, rng):
    """Keras rebuilds a loaded Sequential layer by layer, so its first
    layers' first calls belong to unfinished graphs; compaction and the
    graph readers work on a rewired copy."""
    model = dkdp.prunable(keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(12, activation="relu"),
        keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]))
    unit_prune(model, 0.5, rng)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert not dkdp.graph.is_wired(loaded) and dkdp.graph.is_wired(model)
    assert dkdp.graph.output_unit_layers(loaded) == dkdp.graph.output_unit_layers(model)
    small = compact(loaded)
    x = rng.normal(size=(4, 6)).astype("float32")
    assert_same(small, model, x)
    assert [l.units for l in small.layers] == [l.units for l in compact(model).layers]
    assert small.count_params() < dkdp.count_params(model, nonzero=False)


@pytest.mark.parametrize("dead, width", [(25, 288), (13, 288), (8, 300), (0, 300), (44, 256)])
def test_widths_are_aligned_for_xnnpack_with_zero_channels(rng, dead, width):
    # LeNet-300-100 with `dead` hidden units of its first layer removed: XNNPACK
    # runs a fully-connected layer of N outputs with N mod 16 in 1..8 about
    # 1.8x slower at batch 1 (280 units: 1.55x dense's latency), so compact
    # keeps a multiple of 16 (or all 300) by keeping a few removed units as
    # zeros. Outputs, non-zero parameters and the counts all stay as they were.
    model = dkdp.prunable(dkdp.zoo.lenet_300_100())
    first = dkdp.masked_layers(model)[0]
    mask = first.kernel_mask.numpy()
    gone = rng.choice(300, dead, replace=False)
    mask[:, gone] = 0.0
    mask[rng.random(mask.shape) < 0.5] = 0.0  # and unstructured zeros
    first.kernel_mask.assign(mask)
    first.bias.assign(rng.normal(size=300).astype("float32"))  # masked with its units
    second = dkdp.masked_layers(model)[1]
    second.kernel.assign(rng.normal(size=second.kernel.shape).astype("float32"))
    small = compact(model)
    assert small.layers[2].units == width
    x = rng.random((16, 28, 28, 1)).astype("float32")
    scale = float(np.abs(model(x)).max())
    assert_same(small, model, x, atol=1e-6 * scale)
    # The removed units' rows of the next layer go (or stay, as zeros; with
    # all 300 kept too): nothing else changes.
    nonzero = dkdp.count_params(dkdp.strip(model), nonzero=True) - 100 * dead
    assert dkdp.count_params(small, nonzero=True) == nonzero
    assert deployed_counts(model) == (nonzero, dkdp.count_macs(small, nonzero=True))
    if width % ALIGN == 0 and width < 300:
        # the rows of the next layer that read a kept zero unit are zero too
        kernel = small.layers[3].get_weights()[0]
        assert (np.abs(kernel).sum(axis=1) == 0).sum() == width - (300 - dead)


def test_align_one_keeps_no_zero_channels(rng):
    # For a size budget (a full-int8 file of tens of kB) the zero channels
    # kept for XNNPACK are bytes the budget did not count: align=1 keeps
    # exactly the live units, with the same outputs and non-zeros as align=16.
    model = dkdp.prunable(dkdp.zoo.lenet_300_100())
    first = dkdp.masked_layers(model)[0]
    mask = first.kernel_mask.numpy()
    mask[:, rng.choice(300, 281, replace=False)] = 0.0  # 19 live units: 32 aligned
    first.kernel_mask.assign(mask)
    first.bias.assign(rng.normal(size=300).astype("float32"))
    aligned, exact = compact(model), compact(model, align=1)
    assert aligned.layers[2].units == 32
    assert exact.layers[2].units == 19
    assert exact.count_params() < aligned.count_params()
    assert dkdp.count_params(exact, nonzero=True) == dkdp.count_params(aligned, nonzero=True)
    x = rng.random((16, 28, 28, 1)).astype("float32")
    scale = float(np.abs(model(x)).max())
    assert scale > 0 and float(np.ptp(model(x).numpy(), axis=0).max()) > 1e-3 * scale
    assert_same(exact, model, x, atol=1e-6 * scale)
    with pytest.raises(ValueError, match="align"):
        compact(model, align=0)
