"""Behaviour kept through a redesign: two fixed-seed runs whose final masks,
weights and pruning events were recorded on main before the library was
taken apart into one concept per module (issue 21), and must come out the
same after it, up to float rounding.

Record again only when a change is meant to alter what training does
(`python -m tests.test_golden --record`), and say so in the commit.
"""

import pathlib
import sys

import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
from dkdp_keras import thresholds
from tests.conftest import small_cnn

GOLDEN = pathlib.Path(__file__).with_name("golden") / "runs.npz"
CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(n, shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n,) + shape).astype("float32")
    flat = x.reshape(n, -1)
    y = (flat[:, 0] > 0).astype("int64") + (flat[:, 1] > 0.5)
    return x, y


def adaptive_unit_run():
    """DKDPModel, Taylor unit pruning under Adaptive, weight averaging."""
    keras.utils.set_random_seed(0)
    x, y = _data(192, (8, 8, 2), 0)
    xv, yv = _data(64, (8, 8, 2), 1)
    model = dkdp.DKDPModel(small_cnn(), lambda_kd=0.5)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=CE, metrics=["accuracy"])
    cb = dkdp.DKDPCallback(
        importance="taylor", granularity="unit", verbose=0,
        threshold=thresholds.Adaptive(dkdp.Budget(max_params=600), tolerance=0.2,
                                      finish_by=0.5))
    model.fit(x, y, validation_data=(xv, yv), epochs=7, batch_size=32, shuffle=False,
              verbose=0, callbacks=[cb])
    return model.weights, cb


def schedule_weight_run():
    """A plain prunable model, magnitude weight pruning every 4 steps."""
    keras.utils.set_random_seed(0)
    x, y = _data(256, (8,), 2)
    model = dkdp.prunable(keras.Sequential([
        keras.Input((8,)), keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)]))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=CE)
    cb = dkdp.DKDPCallback(
        threshold=thresholds.PolynomialDecay(0.0, 0.75, 4, 28), frequency=4,
        begin=4, end=28, verbose=0)
    model.fit(x, y, epochs=4, batch_size=32, shuffle=False, verbose=0, callbacks=[cb])
    return model.weights, cb


RUNS = {"adaptive_unit": adaptive_unit_run, "schedule_weight": schedule_weight_run}


def _record(name, weights, cb):
    out = {f"{name}:w:{i}": np.asarray(v.numpy()) for i, v in enumerate(weights)}
    out[f"{name}:events"] = np.array(
        [[h["step"], h["sparsity"], h["kept_params"]] for h in cb.history], "float64")
    return out


@pytest.mark.parametrize("name", sorted(RUNS))
def test_the_run_ends_as_recorded(name):
    golden = np.load(GOLDEN)
    weights, cb = RUNS[name]()
    got = _record(name, weights, cb)
    keys = sorted(k for k in golden.files if k.startswith(name + ":"))
    assert sorted(got) == keys
    np.testing.assert_allclose(got[f"{name}:events"], golden[f"{name}:events"],
                               rtol=1e-6, atol=0)
    for key in keys:
        if key.endswith(":events"):
            continue
        want = golden[key]
        if "mask" in weights[int(key.rsplit(":", 1)[1])].path:
            np.testing.assert_array_equal(got[key], want, err_msg=key)
        else:
            np.testing.assert_allclose(got[key], want, rtol=1e-4, atol=1e-5, err_msg=key)


if __name__ == "__main__" and "--record" in sys.argv:
    GOLDEN.parent.mkdir(exist_ok=True)
    recorded = {}
    for run_name, run in RUNS.items():
        recorded.update(_record(run_name, *run()))
    np.savez_compressed(GOLDEN, **recorded)
    print(f"wrote {GOLDEN}: {len(recorded)} arrays")
