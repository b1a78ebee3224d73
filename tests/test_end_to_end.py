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
    return (x[:6000], y[:6000]), (xt[:2000], yt[:2000])


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
    model.fit(x, y, batch_size=128, epochs=4, verbose=0)
    after = model.evaluate(xt, yt, verbose=0, return_dict=True)
    assert before["student_accuracy"] < 0.3
    assert after["teacher_accuracy"] > 0.75
    assert after["student_accuracy"] > 0.70
    assert after["student_accuracy"] - before["student_accuracy"] > 0.45
