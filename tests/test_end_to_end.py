"""Slow end-to-end checks on real Fashion-MNIST (they run in CI)."""

import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
from dkdp_keras import datasets
from tests.test_datasets import needs_fashion

pytestmark = [pytest.mark.slow, needs_fashion]


@pytest.fixture(scope="module")
def fashion():
    (x, y), (xt, yt) = datasets.load("fashion_mnist", as_numpy=True)
    return (x[:12000], y[:12000]), (xt[:2000], yt[:2000])


def test_student_learns_from_the_teacher_alone(fashion):
    """With no label loss of its own, the student learns the task only
    through the teacher's soft targets."""
    (x, y), (xt, yt) = fashion
    model = dkdp.DKDPModel(dkdp.zoo.lenet_300_100(), lambda_kd=1.0,
                           student_hard_loss_weight=0.0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    before = model.evaluate(xt, yt, verbose=0, return_dict=True)
    model.fit(x[:6000], y[:6000], batch_size=128, epochs=4, verbose=0)
    after = model.evaluate(xt, yt, verbose=0, return_dict=True)
    assert before["student_accuracy"] < 0.3
    assert after["teacher_accuracy"] > 0.75
    assert after["student_accuracy"] > 0.70
    assert after["student_accuracy"] - before["student_accuracy"] > 0.45


def _fit_pruned(fashion, build, threshold, epochs, criterion="magnitude",
                granularity="weight"):
    (x, y), (xt, yt) = fashion
    # Enough steps (about 160 an epoch) for BatchNormalization's moving
    # statistics (momentum 0.99) to settle: validation runs in inference mode.
    # Batches of 32 give them on half the images, at about half the time.
    (x, y), (xv, yv) = (x[:5000], y[:5000]), (x[10000:12000], y[10000:12000])
    model = dkdp.DKDPModel(build())
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    cb = dkdp.DKDPCallback(importance=criterion, granularity=granularity,
                           threshold=threshold, verbose=0)
    history = model.fit(x, y, batch_size=32, epochs=epochs, verbose=0,
                        validation_data=(xv, yv), callbacks=[cb])
    test = model.evaluate(xt, yt, verbose=0, return_dict=True)
    return model, history, test


@pytest.mark.parametrize("build", [dkdp.zoo.lenet_300_100, dkdp.zoo.reference_cnn])
def test_constant_sparsity_reaches_ninety_percent(fashion, build):
    model, history, test = _fit_pruned(
        fashion, build, dkdp.thresholds.ConstantSparsity(0.9), epochs=3)
    assert dkdp.sparsity(model.teacher) == pytest.approx(0.9, abs=0.01)
    assert history.history["sparsity"][-1] == pytest.approx(0.9, abs=0.01)
    assert test["teacher_accuracy"] > 0.75


@pytest.mark.parametrize("build", [dkdp.zoo.lenet_300_100, dkdp.zoo.reference_cnn])
def test_adaptive_budget_of_a_tenth_is_met_in_the_same_fit(fashion, build):
    dense = build().count_params()
    budget = dkdp.Budget(max_params=dense // 10)
    model, history, test = _fit_pruned(
        fashion, build, dkdp.thresholds.Adaptive(budget, tolerance=0.02), epochs=4,
        criterion="taylor")
    assert dkdp.count_params(dkdp.compact(model.teacher)) <= dense // 10
    assert history.history["budget_usage"][-1] <= 1.0
    assert test["teacher_accuracy"] > 0.75


def test_unit_pruning_on_the_reference_cnn_removes_whole_filters(fashion):
    model, _, test = _fit_pruned(
        fashion, dkdp.zoo.reference_cnn, dkdp.thresholds.ConstantSparsity(0.7),
        epochs=3, criterion="taylor", granularity="unit")
    layers = dkdp.masked_layers(model.teacher)
    for layer in layers:
        units = layer.kernel_mask.numpy().reshape(-1, layer.num_units)
        assert np.all(units.min(axis=0) == units.max(axis=0))
    removed = [(l.kernel_mask.numpy().reshape(-1, l.num_units).max(0) == 0).sum() for l in layers]
    assert removed[-1] == 0 and sum(removed[:-1]) > 0
    assert dkdp.sparsity(model.teacher) == pytest.approx(0.7, abs=0.05)
    assert test["teacher_accuracy"] > 0.7
