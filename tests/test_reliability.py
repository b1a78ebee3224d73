"""Nothing lost: checkpoint and resume, determinism, `.keras` files in a
fresh process."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
from dkdp_keras import thresholds
from dkdp_keras.state import pruning_state
from tests.conftest import sign_data, two_hidden_mlp

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
ROOT = pathlib.Path(__file__).resolve().parents[1]


mlp = two_hidden_mlp


def data(n=96, seed=0):
    return sign_data(n, seed)


class Interrupted(Exception):
    pass


class Interrupt(keras.callbacks.Callback):
    """Raises before training step `step` (counted from 0 over the run)."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_begin(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            raise Interrupted(f"interrupted before step {self.step}")


def make_dkdp(seed=0):
    keras.utils.set_random_seed(seed)
    model = dkdp.DKDPModel(mlp(), lambda_kd=0.5)
    model.compile(teacher_optimizer=keras.optimizers.Adam(1e-2),
                  student_optimizer=keras.optimizers.Adam(5e-3),
                  loss=CE, metrics=["accuracy"])
    return model


def make_plain(seed=0):
    keras.utils.set_random_seed(seed)
    model = dkdp.prunable(mlp())
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=CE)
    return model


POLICIES = {
    # Epoch-end events on a gradient criterion (its statistics checkpointed).
    "schedule": lambda: dict(
        importance="taylor", granularity="unit",
        threshold=thresholds.PolynomialDecay(0.0, 0.6, 0, 12)),
    # The adaptive controller: reference, step, last good masks.
    "adaptive": lambda: dict(
        threshold=thresholds.Adaptive(dkdp.Budget(max_params=300), tolerance=0.02,
                                      initial_step=0.2, finish_by=1.0)),
    # Events every 2 steps, inside epochs.
    "steps": lambda: dict(
        threshold=thresholds.PolynomialDecay(0.0, 0.7, 0, 14), frequency=2),
}


def snapshot(model, callback):
    """Everything a resumed run must reproduce."""
    optimizers = [model.optimizer] + (
        [model.student_optimizer] if isinstance(model, dkdp.DKDPModel) else [])
    state = pruning_state(model)
    out = {
        "weights": [w.numpy().copy() for w in model.weights],
        "optimizers": [[v.numpy().copy() for v in opt.variables] for opt in optimizers],
        "state": {key: state.get(key) for key in state.keys()},
        "tau": callback.tau, "events": callback.events,
        "history": [dict(h) for h in callback.history],
    }
    if isinstance(callback.threshold, thresholds.Adaptive):
        out["adaptive"] = callback.threshold.get_state()
    return out


def assert_same(a, b):
    assert len(a["weights"]) == len(b["weights"])
    for p, q in zip(a["weights"], b["weights"]):
        np.testing.assert_allclose(p, q, rtol=0, atol=1e-6)
    for opt_a, opt_b in zip(a["optimizers"], b["optimizers"]):
        assert len(opt_a) == len(opt_b)
        for p, q in zip(opt_a, opt_b):
            np.testing.assert_allclose(p, q, rtol=0, atol=1e-6)
    assert sorted(a["state"]) == sorted(b["state"])
    for key in a["state"]:
        np.testing.assert_allclose(a["state"][key], b["state"][key], rtol=0,
                                   atol=1e-6, err_msg=key)
    assert (a["tau"], a["events"]) == (b["tau"], b["events"])
    assert a["history"] == b["history"]
    if "adaptive" in a:
        ga, gb = dict(a["adaptive"]), dict(b["adaptive"])
        masks_a, masks_b = ga.pop("last_good_masks"), gb.pop("last_good_masks")
        assert ga == gb
        # Dropped when training ends (dead after fit); while a run is in
        # progress, layer names are numbered per process, the order is the
        # model's.
        assert (masks_a is None) == (masks_b is None)
        for p, q in zip((masks_a or {}).values(), (masks_b or {}).values()):
            np.testing.assert_array_equal(p, q)


def masks(model):
    return [layer.kernel_mask.numpy().copy() for layer in dkdp.masked_layers(model)]


def fit(model, callbacks, epochs, x, y, validation=False):
    return model.fit(x, y, epochs=epochs, batch_size=32, shuffle=False, verbose=0,
                     callbacks=callbacks,
                     validation_data=(x[:48], y[:48]) if validation else None)


def straight_and_resumed(callback, epochs, tmp_path, x, y, inspect=None):
    """Snapshots of a DKDP run of `epochs` epochs straight through, and of one
    checkpointed by ModelCheckpoint after 2 epochs, loaded from the `.keras`
    file and continued with `fit(initial_epoch=2)`; and `inspect(loaded)`,
    read before the continued fit."""
    model = make_dkdp()
    cb = callback()
    fit(model, [cb], epochs, x, y)
    straight = snapshot(model, cb)
    path = tmp_path / "ckpt.keras"
    fit(make_dkdp(), [callback(), keras.callbacks.ModelCheckpoint(str(path))], 2, x, y)
    loaded = keras.saving.load_model(path)
    seen = inspect(loaded) if inspect else None
    cb_loaded = callback()
    loaded.fit(x, y, epochs=epochs, initial_epoch=2, batch_size=32, shuffle=False,
               verbose=0, callbacks=[cb_loaded])
    return straight, snapshot(loaded, cb_loaded), seen


@pytest.mark.parametrize("kind,policy,order", [
    ("dkdp", "schedule", "callback_first"),
    ("dkdp", "adaptive", "callback_first"),
    ("plain", "steps", "callback_first"),
    # BackupAndRestore listed first: the checkpoint misses the epoch's
    # pruning event, which the resumed run replays exactly.
    ("dkdp", "schedule", "backup_first"),
])
def test_resume_after_interruption_ends_like_an_uninterrupted_run(
        tmp_path, kind, policy, order):
    x, y = data()
    make = make_dkdp if kind == "dkdp" else make_plain
    epochs, stop = 5, 3 * 3 + 1  # 3 steps per epoch: stop inside epoch 4
    validation = policy == "adaptive"

    def callbacks(extra=()):
        cb = dkdp.DKDPCallback(verbose=0, **POLICIES[policy]())
        backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
        ordered = [cb, backup] if order == "callback_first" else [backup, cb]
        return cb, ordered + list(extra)

    model = make()
    cb, cbs = callbacks()
    fit(model, cbs, epochs, x, y, validation)
    straight = snapshot(model, cb)
    assert cb.events >= 2 and dkdp.sparsity(model if kind == "plain" else model.teacher) > 0.2

    first = make()
    cb_first, cbs = callbacks([Interrupt(stop)])
    with pytest.raises(Interrupted):
        fit(first, cbs, epochs, x, y, validation)
    assert (tmp_path / "backup" / "latest.weights.h5").exists()

    # A new process would start here: same seed, new model, new callback.
    resumed = make()
    cb_resumed, cbs = callbacks()
    fit(resumed, cbs, epochs, x, y, validation)
    assert_same(snapshot(resumed, cb_resumed), straight)
    assert int(resumed.optimizer.iterations.numpy()) == epochs * 3
    if kind == "dkdp":
        assert int(resumed.student_optimizer.iterations.numpy()) == epochs * 3


def test_adaptive_decision_lost_to_a_misordered_checkpoint_is_announced(tmp_path):
    x, y = data()

    def callbacks(extra=()):
        cb = dkdp.DKDPCallback(verbose=0, **POLICIES["adaptive"]())
        return [keras.callbacks.BackupAndRestore(str(tmp_path / "b")), cb, *extra]

    with pytest.raises(Interrupted):
        fit(make_dkdp(), callbacks([Interrupt(7)]), 4, x, y, validation=True)
    with pytest.warns(UserWarning, match="Adaptive decision at the end of epoch 2.*is lost"):
        fit(make_dkdp(), callbacks(), 4, x, y, validation=True)


def test_a_keras_checkpoint_resumes_the_pruning_state(tmp_path):
    """ModelCheckpoint writes `.keras` files; load_model + fit(initial_epoch)
    continues the schedule with its events, τ and history."""
    x, y = data()

    def callback():
        return dkdp.DKDPCallback(verbose=0, **POLICIES["schedule"]())

    straight, resumed, _ = straight_and_resumed(callback, 4, tmp_path, x, y)
    assert_same(resumed, straight)


def test_the_state_stays_out_of_the_models_layers_and_weights():
    model = make_dkdp()
    before = (len(model.weights), [l.name for l in model.layers])
    x, y = data()
    fit(model, [dkdp.DKDPCallback(verbose=0, **POLICIES["adaptive"]())], 2, x, y,
        validation=True)
    assert (len(model.weights), [l.name for l in model.layers]) == before
    state = pruning_state(model)
    assert int(state.get("events")) >= 1 and int(state.get("epoch")) == 2
    plain = dkdp.prunable(mlp())
    n = len(plain.weights)
    plain.compile(optimizer="adam", loss=CE)
    fit(plain, [dkdp.DKDPCallback(verbose=0, threshold=thresholds.ConstantSparsity(0.5))],
        1, x, y)
    assert len(plain.weights) == n and len(plain.layers) == 3
    assert int(pruning_state(plain).get("events")) == 1


def test_two_runs_with_one_seed_give_the_same_masks():
    x, y = data()
    results = []
    for _ in range(2):
        model = make_dkdp(seed=3)
        cb = dkdp.DKDPCallback(importance="taylor", granularity="unit",
                               threshold=thresholds.PolynomialDecay(0.0, 0.5, 0, 6),
                               frequency=2, verbose=0)
        fit(model, [cb], 2, x, y)
        results.append((masks(model.teacher), [w.numpy() for w in model.weights], cb.tau))
    (m1, w1, t1), (m2, w2, t2) = results
    assert 0.3 < np.mean([1 - m.mean() for m in m1[:-1]]) and t1 == t2
    for a, b in zip(m1, m2):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)
    # A different seed gives other weights and so other masks.
    model = make_dkdp(seed=4)
    cb = dkdp.DKDPCallback(importance="taylor", granularity="unit",
                           threshold=thresholds.PolynomialDecay(0.0, 0.5, 0, 6),
                           frequency=2, verbose=0)
    fit(model, [cb], 2, x, y)
    assert any(not np.array_equal(a, b) for a, b in zip(m1, masks(model.teacher)))


LOADER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import keras
    import dkdp_keras  # registers the library's classes; nothing else
    paths, x_path, out_path = json.loads(sys.argv[1])
    x = np.load(x_path)
    out = {}
    for name, path in paths.items():
        model = keras.saving.load_model(path, safe_mode=True)
        out[name] = np.asarray(model(x, training=False))
        out[name + ":type"] = np.array(type(model).__name__)
        if isinstance(model, dkdp_keras.DKDPModel):
            out[name + ":teacher"] = np.asarray(model.teacher(x, training=False))
            out[name + ":events"] = np.asarray(
                dkdp_keras.state.pruning_state(model).get("events", -1))
            out[name + ":compiled"] = np.array(model.compiled)
    np.savez(out_path, **out)
""")


def test_keras_files_load_in_a_fresh_process_in_safe_mode(tmp_path):
    x, y = data()
    model = make_dkdp()
    model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[
        dkdp.DKDPCallback(granularity="unit", threshold=thresholds.ConstantSparsity(0.4),
                          verbose=0)])
    refreshed = make_dkdp(seed=1)
    refreshed.refresh_student("compact_teacher")
    features = dkdp.DKDPModel(
        mlp(), student=mlp("student"),
        kd_loss=keras.distillation.FeatureDistillation(
            teacher_layer_name=None, student_layer_name=None), serve="teacher")
    gated = dkdp.prunable(mlp(), learnable_mask=True, gate_l1=1e-3, track_statistics=True)
    models = {
        "dkdp": model, "refreshed": refreshed, "features": features, "gated": gated,
        "compacted": model.compact_teacher(), "stripped": dkdp.strip(model.teacher),
    }
    paths = {}
    for name, m in models.items():
        paths[name] = str(tmp_path / f"{name}.keras")
        m.save(paths[name])
    np.save(tmp_path / "x.npy", x[:8])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    run = subprocess.run(
        [sys.executable, "-c", LOADER,
         json.dumps([paths, str(tmp_path / "x.npy"), str(tmp_path / "out.npz")])],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    for name, m in models.items():
        np.testing.assert_allclose(out[name], np.asarray(m(x[:8], training=False)),
                                   rtol=0, atol=1e-6, err_msg=name)
        assert str(out[name + ":type"]) == type(m).__name__
    np.testing.assert_allclose(out["dkdp:teacher"], model.teacher(x[:8]).numpy(), atol=1e-6)
    assert int(out["dkdp:events"]) == 2 and bool(out["dkdp:compiled"])
    assert int(out["refreshed:events"]) == -1  # never pruned: no state saved


# --------------------------------------------------------------- NaN / Inf
def nan_batch_data():
    """Three batches of 32; the middle one holds a NaN."""
    x, y = data()
    bad = x.copy()
    bad[40, 3] = np.nan
    return x, y, bad


def test_a_nan_batch_stops_a_dkdp_model_with_the_last_good_step_kept():
    x, y, bad = nan_batch_data()
    reference = make_dkdp()
    fit(reference, [], 1, x[:32], y[:32])  # the one good step
    model = make_dkdp()
    cb = dkdp.DKDPCallback(importance="taylor", threshold=thresholds.ConstantSparsity(0.5),
                           frequency=1, verbose=0)
    with pytest.raises(FloatingPointError,
                       match="training step 1 hold NaN or Inf.*applied no update.*"
                             "on_nonfinite='skip'"):
        fit(model, [cb], 2, bad, y)
    # Step 0 ran and was pruned after; step 1 changed nothing.
    assert int(model.optimizer.iterations.numpy()) == 1
    assert int(model.student_optimizer.iterations.numpy()) == 1
    assert cb.events == 1
    # Masks and statistics aside (the reference neither prunes nor reads
    # them), everything is as after the good step, and finite.
    assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)
    for a, b in zip(model.trainable_weights, reference.trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6, err_msg=a.path)
    for opt, ref in ((model.optimizer, reference.optimizer),
                     (model.student_optimizer, reference.student_optimizer)):
        for p, q in zip(opt.variables, ref.variables):
            np.testing.assert_allclose(p.numpy(), q.numpy(), rtol=0, atol=1e-6)
    first = dkdp.masked_layers(model.teacher)[0]
    assert float(first.gradient_steps.numpy()) == 0  # reset by the event after step 0
    assert dkdp.sparsity(model.teacher) == pytest.approx(0.5, abs=0.01)


def test_under_xla_a_nan_batch_is_refused_and_shows_in_the_logs():
    """XLA drops assertions: the step cannot stop fit, but it applies
    nothing and its NaN loss reaches the logs (and DKDPCallback's check)."""
    x, y, bad = nan_batch_data()
    keras.utils.set_random_seed(0)
    model = dkdp.DKDPModel(mlp())
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=CE, jit_compile=True)
    history = fit(model, [], 1, bad, y)
    assert np.isnan(history.history["loss"][0])
    assert int(model.optimizer.iterations.numpy()) == 2
    assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)
    with pytest.raises(FloatingPointError, match="training loss became nan"):
        fit(model, [dkdp.DKDPCallback(verbose=0)], 1, bad, y)
    assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)


def test_skip_mode_goes_on_as_if_the_nan_batch_were_not_there():
    x, y, bad = nan_batch_data()
    keep = np.r_[0:32, 64:96]  # the two good batches

    def run(xs, ys, **kwargs):
        keras.utils.set_random_seed(0)
        model = dkdp.DKDPModel(mlp(), lambda_kd=0.5, **kwargs)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=CE)
        cb = dkdp.DKDPCallback(importance="taylor", threshold=thresholds.ConstantSparsity(0.4),
                               verbose=0)
        history = fit(model, [cb], 3, xs, ys)
        return model, history.history

    skipped, logs = run(bad, y, on_nonfinite="skip")
    clean, _ = run(x[keep], y[keep])
    assert logs["skipped_steps"] == [1.0, 1.0, 1.0]
    assert all(np.isfinite(logs["loss"]))
    assert int(skipped.optimizer.iterations.numpy()) == 6
    for a, b in zip(skipped.weights, clean.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-5, err_msg=a.path)
    assert dkdp.sparsity(skipped.teacher) == pytest.approx(0.4, abs=0.01)
    with pytest.raises(ValueError, match=r"on_nonfinite must be one of \('raise', 'skip'\)"):
        dkdp.DKDPModel(mlp(), on_nonfinite="ignore")


def test_a_plain_model_gets_back_its_last_good_weights():
    x, y, bad = nan_batch_data()
    bad[:, 0] = np.where(np.arange(len(bad)) == 40, np.inf, bad[:, 0])
    model = make_plain()
    cb = dkdp.DKDPCallback(threshold=thresholds.ConstantSparsity(0.5), verbose=0)
    fit(model, [cb], 1, x, y)  # one good epoch: pruned, checked, kept
    good = [w.numpy().copy() for w in model.weights]
    good_opt = [v.numpy().copy() for v in model.optimizer.variables]
    with pytest.raises(FloatingPointError, match="back to those after step 3"):
        fit(model, [cb], 1, bad, y)
    for a, b in zip(model.weights, good):
        np.testing.assert_array_equal(a.numpy(), b)
    for a, b in zip(model.optimizer.variables, good_opt):
        np.testing.assert_array_equal(a.numpy(), b)


def test_adaptive_never_decides_on_a_nan_metric():
    x, y = data()

    class NaNMetric(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                logs["val_accuracy"] = float("nan")

    model = make_dkdp()
    cb = dkdp.DKDPCallback(verbose=0, **POLICIES["adaptive"]())
    with pytest.raises(FloatingPointError, match="metric val_accuracy is nan"):
        fit(model, [NaNMetric(), cb], 4, x, y, validation=True)
    state = cb.threshold.get_state()
    assert state["reference"] is not None and np.isfinite(state["reference"])
    assert cb.events == 1


def test_a_run_that_compacts_its_student_resumes_from_a_keras_checkpoint(tmp_path):
    """A student rebuilt from the compacted teacher has another architecture;
    the `.keras` checkpoint stores it, so the run resumes from there."""
    x, y = data()

    def callback():
        return dkdp.DKDPCallback(
            granularity="unit", threshold=thresholds.PolynomialDecay(0.0, 0.5, 0, 9),
            student_refresh=dkdp.StudentRefresh(every=1, strategy="compact_teacher"),
            verbose=0)

    straight, resumed, loaded_units = straight_and_resumed(
        callback, 3, tmp_path, x, y,
        inspect=lambda loaded: loaded.student.layers[0].units)
    assert loaded_units < 24  # compacted: the teacher has 24
    assert_same(resumed, straight)
