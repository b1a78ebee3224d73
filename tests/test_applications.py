"""The models users ship, end to end (issue 22's matrix): keras.applications
at 32x32x3 with weights=None, and a MobileNetV2 base nested in a
transfer-learning Sequential. Each is made prunable, distilled into
student="auto", unit-pruned under Adaptive to a 40% parameter budget, then
compacted and exported to float32 and int8 TFLite with their checks."""
import warnings

import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
from dkdp_keras import thresholds
from tests.test_depgraph import APPLICATIONS

SHAPE = (32, 32, 3)


def images(n, seed):
    """Images whose class is in their colour, so a few steps learn it."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.random((n,) + SHAPE).astype("float32") * 0.5
    x[..., 0] += (y / 10.0)[:, None, None]
    return x, y


def run(name, tmp_path):
    keras.utils.set_random_seed(0)
    teacher = dkdp.prunable(APPLICATIONS[name]())
    dense = dkdp.count_params(teacher, nonzero=False)
    budget = dkdp.Budget(max_params=int(0.4 * dense))
    model = dkdp.DKDPModel(teacher, student="auto")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = images(64, 0)
    xv, yv = images(32, 1)
    callback = dkdp.DKDPCallback(
        granularity="unit", verbose=0,
        threshold=thresholds.Adaptive(budget, tolerance=0.99, finish_by=0.5))
    history = model.fit(x, y, validation_data=(xv, yv), epochs=2, batch_size=32,
                        verbose=0, callbacks=[callback])
    logged = history.history["kept_params"][-1], history.history["kept_macs"][-1]

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        small = model.compact_teacher()
    assert not [w for w in said if "compact" in str(w.message)], name
    shipped = small.count_params()
    assert shipped <= budget.max_params
    assert abs(shipped - logged[0]) <= 0.01 * logged[0]
    macs = dkdp.count_macs(small, nonzero=False)
    assert abs(macs - logged[1]) <= 0.01 * logged[1]

    # Called, not predict(): predict() traces a function for each model
    # (6.5 s and 5.2 s of DenseNet121's run), one eager call on 32 images none.
    expected = np.asarray(model.teacher(xv, training=False))
    assert expected.std(axis=0).mean() > 1e-3 * np.abs(expected).max()  # input matters
    got = np.asarray(small(xv, training=False))
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()

    # The int8 check bounds the accuracy drop at 5 points, which needs a few
    # hundred labelled inputs: on 32, two flips (6.2 points) failed DenseNet121.
    xc, yc = images(256, 2)
    for quantize in ("none", "int8"):
        path = tmp_path / f"{quantize}.tflite"
        report = dkdp.export_tflite(small, str(path), quantize=quantize,
                                    representative_data=x, check_data=(xc, yc),
                                    strict=True)
        assert path.exists() and report.check_passed, report.check
    return shipped, logged


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(APPLICATIONS))
def test_an_application_prunes_to_its_budget_and_ships_what_it_logs(name, tmp_path):
    run(name, tmp_path)
