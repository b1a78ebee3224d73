"""Property-based tests (hypothesis): the threshold computation and
`compact` on random small architectures."""

import math
import warnings

import keras
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dkdp_keras as dkdp
from dkdp_keras.compaction import compact
from dkdp_keras.prunable import sync_batchnorm
from dkdp_keras.thresholds import Floors, compute_masks, threshold_for_sparsity

SETTINGS = dict(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
# Few distinct values, so that ties are common.
tied = st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0])
score_lists = st.one_of(st.lists(finite, min_size=1, max_size=200),
                        st.lists(tied, min_size=1, max_size=200))
sparsities = st.floats(0.0, 0.999, allow_nan=False)


@settings(max_examples=300, **SETTINGS)
@given(scores=score_lists, target=sparsities)
def test_tau_prunes_the_smallest_fraction_reaching_the_target(scores, target):
    scores = np.array(scores, "float64")
    n = scores.size
    tau, pruned = threshold_for_sparsity(scores, target)
    count = int(pruned.sum())
    # Exactly the smallest count whose fraction reaches the target.
    assert count >= target * n - 1e-9 and count - 1 < target * n - 1e-9
    # Everything pruned scores at most τ, everything kept at least τ.
    if count:
        assert scores[pruned].max() <= tau
    if count < n:
        assert scores[~pruned].min() >= tau == scores[~pruned].min()
    # Without ties, the fraction below τ is exactly the pruned fraction.
    if np.unique(scores).size == n:
        assert int(np.sum(scores < tau)) == count


@settings(max_examples=200, **SETTINGS)
@given(scores=score_lists, low=sparsities, high=sparsities)
def test_a_higher_target_prunes_a_superset(scores, low, high):
    low, high = sorted((low, high))
    _, a = threshold_for_sparsity(scores, low)
    _, b = threshold_for_sparsity(scores, high)
    assert np.all(b[a])


@settings(max_examples=200, **SETTINGS)
@given(data=st.data(), target=sparsities)
def test_unit_sizes_count_weights_not_units(data, target):
    n = data.draw(st.integers(1, 60))
    scores = np.array(data.draw(st.lists(finite, min_size=n, max_size=n)), "float64")
    sizes = np.array(data.draw(st.lists(st.integers(1, 50), min_size=n, max_size=n)), "float64")
    tau, pruned = threshold_for_sparsity(scores, target, sizes)
    goal = target * sizes.sum()
    removed = sizes[pruned].sum()
    if pruned.all():
        assert removed - sizes[pruned].max() < goal
    else:
        # The first units (by score) whose sizes reach the goal, no more.
        assert goal - 1e-9 <= removed < goal + sizes.max()
        assert scores[~pruned].min() >= tau


def masked_dense_model(widths, inputs, seed):
    keras.utils.set_random_seed(seed)
    x = first = keras.Input((inputs,))
    for w in widths:
        x = keras.layers.Dense(w, activation="relu")(x)
    return dkdp.prunable(keras.Model(first, keras.layers.Dense(2)(x)))


@settings(max_examples=40, **SETTINGS)
@given(widths=st.lists(st.integers(1, 12), min_size=1, max_size=3),
       inputs=st.integers(1, 6), seed=st.integers(0, 2**16), target=sparsities)
def test_global_weight_masks_zero_exactly_the_target_fraction(widths, inputs, seed, target):
    model = masked_dense_model(widths, inputs, seed)
    rng = np.random.default_rng(seed)
    layers = dkdp.masked_layers(model)
    scores = [rng.random(tuple(l.kernel.shape)) for l in layers]
    result = compute_masks(layers, scores, target, normalize="none",
                           floors=Floors(min_units=1, min_fraction=0.0))
    total = sum(m.size for m in result.masks.values())
    zeros = sum(int((m == 0).sum()) for m in result.masks.values())
    floor_units = sum(1 for l in layers)  # each layer keeps one weight
    assert set(np.unique(np.concatenate([m.ravel() for m in result.masks.values()]))) <= {0.0, 1.0}
    want = math.ceil(target * total - 1e-9)
    assert want - floor_units <= zeros <= want
    if zeros == want:  # no floor had to restore a weight
        pruned = np.concatenate([s[m == 0] for s, m in zip(scores, result.masks.values())])
        kept = np.concatenate([s[m == 1] for s, m in zip(scores, result.masks.values())])
        assert pruned.size == 0 or kept.size == 0 or pruned.max() <= kept.min()


# ------------------------------------------------------------------ compact
ACTIVATIONS = [None, "relu", "tanh", "elu", "sigmoid"]


@st.composite
def architectures(draw):
    conv = draw(st.booleans())
    spec = {"conv": conv, "blocks": [], "dense": [], "seed": draw(st.integers(0, 2**16)),
            "removed": draw(st.floats(0.0, 0.8))}
    if conv:
        spec["head"] = draw(st.sampled_from(["flatten", "gap"]))
        for _ in range(draw(st.integers(1, 3))):
            spec["blocks"].append(dict(
                filters=draw(st.integers(1, 6)), kernel=draw(st.sampled_from([1, 3])),
                bias=draw(st.booleans()), activation=draw(st.sampled_from(ACTIVATIONS)),
                bn=draw(st.booleans()), residual=draw(st.booleans()),
                depthwise=draw(st.booleans()), concat=draw(st.booleans()),
                pool=draw(st.booleans())))
    for _ in range(draw(st.integers(1, 2))):
        spec["dense"].append(dict(units=draw(st.integers(1, 10)),
                                  activation=draw(st.sampled_from(ACTIVATIONS)),
                                  dropout=draw(st.booleans())))
    return spec


def build(spec):
    L = keras.layers
    inputs = keras.Input((6, 6, 2) if spec["conv"] else (5,))
    x = inputs
    for b in spec["blocks"]:
        x = L.Conv2D(b["filters"], b["kernel"], padding="same", use_bias=b["bias"],
                     activation=b["activation"])(x)
        if b["bn"]:
            x = L.ReLU()(L.BatchNormalization()(x))
        if b["residual"]:
            x = L.Add()([x, L.Conv2D(x.shape[-1], 3, padding="same", activation="relu")(x)])
        if b["depthwise"]:
            x = L.DepthwiseConv2D(3, padding="same")(x)
        if b["concat"]:
            x = L.Concatenate()([x, L.Conv2D(2, 1, activation="relu")(x)])
        if b["pool"] and x.shape[1] >= 2:
            x = L.MaxPooling2D(2)(x)
    if spec["conv"]:
        x = L.Flatten()(x) if spec["head"] == "flatten" else L.GlobalAveragePooling2D()(x)
    for d in spec["dense"]:
        x = L.Dense(d["units"], activation=d["activation"])(x)
        if d["dropout"]:
            x = L.Dropout(0.3)(x)
    return keras.Model(inputs, L.Dense(3)(x))


@settings(max_examples=25, **SETTINGS)
@given(spec=architectures())
def test_compact_keeps_the_outputs_of_random_architectures(spec):
    rng = np.random.default_rng(spec["seed"])
    keras.utils.set_random_seed(spec["seed"])
    model = dkdp.prunable(build(spec))
    for layer in model.layers:  # non-trivial statistics and biases
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.beta.assign(rng.normal(size=n).astype("float32"))
            layer.moving_mean.assign(rng.normal(size=n).astype("float32"))
            layer.moving_variance.assign(rng.random(n).astype("float32") + 0.5)
    protected = dkdp.graph.output_unit_layers(model)
    for layer in dkdp.masked_layers(model):
        if layer.bias is not None:
            layer.bias.assign(rng.normal(size=layer.num_units).astype("float32"))
        if layer.name in protected:
            continue
        units = layer.kernel_mask.numpy().reshape(-1, layer.num_units)
        units[:, rng.random(layer.num_units) < spec["removed"]] = 0.0
        layer.kernel_mask.assign(units.reshape(layer.kernel_mask.shape))
    sync_batchnorm(model)
    with warnings.catch_warnings():
        # Layers compaction cannot see through are named in a warning;
        # expected here, and not what is tested.
        warnings.simplefilter("ignore")
        small = compact(model)
    x = rng.normal(size=(4,) + tuple(model.inputs[0].shape[1:])).astype("float32")
    np.testing.assert_allclose(small(x, training=False).numpy(),
                               model(x, training=False).numpy(), rtol=0, atol=1e-5)
    assert not dkdp.masked_layers(small)
    assert small.count_params() <= dkdp.count_params(model, nonzero=False)
    # What budgets read, counted without building the small model.
    assert dkdp.budget.deployed_counts(model) == (
        dkdp.count_params(small), dkdp.count_macs(small))
    removed_any = any(
        (l.unit_mask().numpy() == 0).any() for l in dkdp.masked_layers(model))
    if not spec["conv"] and removed_any:
        # A Dense chain has nothing that pins units: every removed one goes
        # (a layer with none left keeps one, so that the graph stays valid).
        kept = [max(1, int(l.unit_mask().numpy().sum())) for l in dkdp.masked_layers(model)]
        assert [l.units for l in small.layers if isinstance(l, keras.layers.Dense)] == kept

