"""The pruning event's measurements: counted from masks and the graph,
without writing to the model."""

import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
from dkdp_keras import thresholds
from dkdp_keras.budget import deployed_counts
from dkdp_keras.prunable import sync_batchnorm
from tests.conftest import small_cnn

MODELS = {
    "small_cnn": small_cnn,
    "reference_cnn": lambda: dkdp.zoo.reference_cnn(),
    "lenet_300_100": lambda: dkdp.zoo.lenet_300_100(),
}


def random_masks(layers, rng, units):
    masks = {}
    for layer in layers:
        shape = tuple(layer.kernel_mask.shape)
        if units:
            keep = (rng.random(layer.num_units) > 0.5).astype("float32")
            fan_in = int(np.prod(shape)) // layer.num_units
            masks[layer.name] = np.broadcast_to(keep, (fan_in, layer.num_units)).reshape(shape)
        else:
            masks[layer.name] = (rng.random(shape) > 0.6).astype("float32")
    return masks


@pytest.mark.parametrize("name", sorted(MODELS))
def test_counts_from_masks_equal_counts_after_assigning_them(name):
    model = dkdp.prunable(MODELS[name]())
    layers = dkdp.masked_layers(model)
    rng = np.random.default_rng(0)
    dense = deployed_counts(model)
    for trial in range(4):
        masks = random_masks(layers, rng, units=trial % 2 == 1)
        counted = deployed_counts(model, masks)
        saved = {l.name: l.kernel_mask.numpy().copy() for l in layers}
        for layer in layers:
            layer.kernel_mask.assign(masks[layer.name])
        sync_batchnorm(model)
        assigned = deployed_counts(model)
        for layer in layers:
            layer.kernel_mask.assign(saved[layer.name])
        sync_batchnorm(model)
        assert counted == assigned, (trial, counted, assigned)
        assert counted[0] < dense[0]
    assert deployed_counts(model) == dense  # nothing was left behind


class AssignCounter:
    """Counts the assignments to every mask variable of a model."""

    def __init__(self, model):
        self.count = 0
        self.variables = [v for v in model.weights if "mask" in v.path]
        assert self.variables
        for variable in self.variables:
            original = variable.assign

            def counted(value, original=original):
                self.count += 1
                return original(value)

            variable.assign = counted


@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_the_budget_search_assigns_no_mask(granularity):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 8, 8, 2)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, 64)
    model = dkdp.prunable(small_cnn())
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, verbose=0)
    budget = dkdp.Budget(max_params=int(0.4 * dkdp.count_params(model, nonzero=False)))
    cb = dkdp.DKDPCallback(granularity=granularity, verbose=0,
                           threshold=thresholds.Adaptive(budget))
    cb.set_params({"epochs": 4, "steps": 2})
    cb.set_model(model)
    cb.on_train_begin()
    scores = cb._scores()
    before = [v.numpy().copy() for v in model.weights if "mask" in v.path]
    counter = AssignCounter(model)
    found = cb._sparsity_for_budget(scores)
    assert counter.count == 0
    for a, b in zip(before, counter.variables):
        np.testing.assert_array_equal(a, b.numpy())
    assert 0 < found < 1
    cb._prune(found, scores)  # the event itself writes the masks
    assert counter.count > 0
    assert budget.is_met(model)


def test_the_floors_best_entries_are_those_a_stable_sort_gives():
    """Floors take the best entries by a partition, not a sort of the whole
    layer; they must be the very entries the stable sort picked, ties
    included."""
    from dkdp_keras.thresholds.mechanism import _best

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 400))
        flat = rng.integers(0, 5, n).astype(float) if trial % 2 else rng.random(n)
        count = int(rng.integers(0, n + 2))
        want = set(np.argsort(-flat, kind="stable")[:count].tolist())
        assert set(_best(flat, count).tolist()) == want, (trial, n, count)
