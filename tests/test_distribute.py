"""DKDPModel and DKDPCallback under tf.distribute.MirroredStrategy, on two
logical CPU devices. The devices must be configured before TensorFlow
initialises, so the runs happen in a fresh process."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    import dkdp_keras as dkdp

    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 8)).astype("float32")
    y = ((x[:, 0] > 0).astype("int64") + (x[:, 1] > 0)).astype("int64")
    bad = x.copy()
    bad[40, 3] = np.nan  # in the second batch of 32
    CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def run(strategy, on_nonfinite="raise", data=x):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            teacher = keras.Sequential([
                keras.Input((8,)), keras.layers.Dense(24, activation="relu"),
                keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])
            # The whole batch for the student: with a fraction, each replica's
            # student reads the head of its own share, other examples than
            # the head of the global batch on one device.
            model = dkdp.DKDPModel(teacher, lambda_kd=0.5, on_nonfinite=on_nonfinite,
                                   student_batch_fraction=1.0)
            model.compile(teacher_optimizer=keras.optimizers.Adam(1e-2),
                          student_optimizer=keras.optimizers.Adam(1e-2),
                          loss=CE, metrics=["accuracy"])
        cb = dkdp.DKDPCallback(importance="taylor", granularity="unit",
                               threshold=dkdp.thresholds.PolynomialDecay(0.0, 0.5, 0, 6),
                               frequency=2, verbose=0)
        out = {}
        try:
            history = model.fit(data, y, batch_size=32, epochs=2, shuffle=False,
                                verbose=0, callbacks=[cb], validation_data=(x[:32], y[:32]))
            out["history"] = {k: [float(v) for v in vs] for k, vs in history.history.items()}
        except FloatingPointError as error:
            out["error"] = str(error)
        layers = dkdp.masked_layers(model.teacher)
        out["replica_masks"] = [
            [np.asarray(r).tolist() for r in strategy.experimental_local_results(l.kernel_mask.value)]
            for l in layers]
        out["weights"] = [np.asarray(w).tolist() for w in model.weights]
        out["iterations"] = int(model.optimizer.iterations.numpy())
        out["events"] = cb.events
        return out

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    single = tf.distribute.get_strategy()
    results = {"replicas": mirrored.num_replicas_in_sync}
    results["mirrored"] = run(mirrored)
    results["single"] = run(single)
    results["mirrored_skip"] = run(mirrored, "skip", bad)
    results["single_skip"] = run(single, "skip", bad)
    results["mirrored_raise"] = run(mirrored, "raise", bad)
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)
""")


#: pytest-xdist: this module's tests share the module fixture `results`;
#: one worker runs them all, so the fixture is built once.
pytestmark = pytest.mark.xdist_group("test_distribute")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distribute") / "results.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], capture_output=True,
                         text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


def assert_close_runs(a, b, atol=1e-5):
    for p, q in zip(a["weights"], b["weights"]):
        np.testing.assert_allclose(np.array(p), np.array(q), rtol=0, atol=atol)
    for key in a["history"]:
        np.testing.assert_allclose(a["history"][key], b["history"][key], rtol=1e-5, atol=1e-6,
                                   err_msg=key)


def test_masks_are_the_same_on_every_replica(results):
    assert results["replicas"] == 2
    for run in ("mirrored", "mirrored_skip"):
        for replicas in results[run]["replica_masks"]:
            assert len(replicas) == 2 and replicas[0] == replicas[1]


def test_two_replicas_train_and_prune_as_one_device(results):
    mirrored, single = results["mirrored"], results["single"]
    assert mirrored["events"] == single["events"] == 3  # steps 2, 4, 6
    assert mirrored["iterations"] == single["iterations"] == 6
    # The same units removed, to the scheduled sparsity.
    for m, s in zip(mirrored["replica_masks"], single["replica_masks"]):
        assert m[0] == s[0]
    assert mirrored["history"]["sparsity"][-1] == pytest.approx(0.5, abs=0.06)
    assert_close_runs(mirrored, single)


def test_a_nan_batch_is_skipped_on_every_replica(results):
    run, single = results["mirrored_skip"], results["single_skip"]
    assert run["history"]["skipped_steps"] == [1.0, 1.0]
    assert run["iterations"] == 4
    assert all(np.all(np.isfinite(np.array(w))) for w in run["weights"])
    assert_close_runs(run, single)


def test_a_nan_batch_stops_a_mirrored_run_with_nothing_applied(results):
    run = results["mirrored_raise"]
    assert "training step 1 hold NaN or Inf" in run["error"]
    assert run["iterations"] == 1
    assert all(np.all(np.isfinite(np.array(w))) for w in run["weights"])
