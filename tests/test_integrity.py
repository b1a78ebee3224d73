"""No run lost, no figure untrue: the end of training, budgets that cannot
be met, epochs with no good step, data of unknown length, dead state in
saved files, shared layers, Dropout on resume (issue 20's defects, each a
test that failed before its fix)."""

import os
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import dkdp_keras as dkdp
from dkdp_keras import thresholds
from dkdp_keras.state import pruning_state
from tests.conftest import sign_data
from tests.test_callbacks import ScriptedMetric
from tests.test_reliability import Interrupt, Interrupted

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def mlp_6_16_16_3():
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(3),
    ])


def six_feature_data(n=256, seed=0):
    x = np.random.default_rng(seed).random((n, 6)).astype("float32")
    return x, np.clip((x[:, 0] * 3).astype("int64"), 0, 2)


def compiled(model, lr=1e-2):
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=CE, metrics=["accuracy"])
    return model


# --- 1. The prune to the budget after the last epoch, with Taylor --------
def test_statistics_reset_by_a_last_epoch_event_are_reset_by_the_end_of_fit():
    """Statistics now start anew when training goes on after an event, not
    at the event (see the next test); an event at the last epoch end still
    leaves the next fit statistics of its own steps only."""
    x, y = six_feature_data()
    model = compiled(dkdp.DKDPModel(mlp_6_16_16_3()))
    policy = thresholds.Adaptive(dkdp.Budget(max_params=100), warmup_epochs=2)
    cb = dkdp.DKDPCallback(importance="taylor", granularity="unit",
                           threshold=policy, verbose=0)
    model.fit(x, y, validation_split=0.25, epochs=2, verbose=0, callbacks=[cb])
    assert cb.history[-1]["step"] == int(model.optimizer.iterations.numpy())
    assert policy.budget.is_met(model.teacher)
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    steps = [float(l.gradient_steps.numpy()) for l in dkdp.masked_layers(model.teacher)]
    assert steps == [4.0] * 3, steps


def test_the_prune_after_training_uses_the_last_epochs_statistics(monkeypatch):
    """Adaptive's prune to the budget after the last epoch, right after an
    event at its end: forced here by a search that cannot meet the budget
    during training (the run that crashed had a budget pruning could not
    meet; such budgets are now refused before training)."""
    x, y = six_feature_data()
    model = compiled(dkdp.DKDPModel(mlp_6_16_16_3()))
    policy = thresholds.Adaptive(dkdp.Budget(max_params=40), warmup_epochs=2)
    cb = dkdp.DKDPCallback(importance="taylor", granularity="unit",
                           threshold=policy, verbose=0)
    search = cb._sparsity_for_budget
    monkeypatch.setattr(cb, "_sparsity_for_budget",
                        lambda scores: 0.5 * search(scores))
    cb.on_train_end = (lambda end: lambda logs=None: (
        monkeypatch.setattr(cb, "_sparsity_for_budget", search), end(logs)))(cb.on_train_end)
    with pytest.warns(UserWarning, match="pruned to it after the last epoch"):
        model.fit(x, y, validation_split=0.25, epochs=2, verbose=0, callbacks=[cb])
    assert cb.history[-1]["step"] == int(model.optimizer.iterations.numpy())
    assert len(cb.history) == 2  # the last epoch end and the prune after it
    assert policy.budget.is_met(model.teacher)
    assert dkdp.count_params(model.compact_teacher()) <= 40


# --- 4. Budgets that no pruning can meet ---------------------------------
@pytest.mark.parametrize("granularity,budget,text", [
    ("unit", dict(max_params=10), r"max_params=10 .*leaves 15\b"),
    ("weight", dict(max_params=3), r"max_params=3 .*leaves \d+"),
    ("unit", dict(max_latency_ms=1e-9), r"max_latency_ms=1e-09 .*leaves"),
])
def test_a_budget_no_pruning_can_meet_is_refused_before_training(granularity, budget, text):
    x, y = six_feature_data(64)
    model = compiled(dkdp.DKDPModel(mlp_6_16_16_3()))
    cb = dkdp.DKDPCallback(granularity=granularity, verbose=0,
                           threshold=thresholds.Adaptive(dkdp.Budget(**budget)))
    with pytest.raises(ValueError, match="cannot be met by pruning" + ".*" + text):
        model.fit(x, y, validation_split=0.25, epochs=2, verbose=0, callbacks=[cb])
    assert int(model.optimizer.iterations.numpy()) == 0  # before any step


def test_the_smallest_value_the_refusal_names_is_feasible():
    x, y = six_feature_data()
    model = compiled(dkdp.DKDPModel(mlp_6_16_16_3()))
    cb = dkdp.DKDPCallback(importance="taylor", granularity="unit", verbose=0,
                           threshold=thresholds.Adaptive(dkdp.Budget(max_params=15),
                                                         finish_by=0.5))
    model.fit(x, y, validation_split=0.25, epochs=3, verbose=0, callbacks=[cb])
    assert cb.threshold.budget.is_met(model.teacher)
    assert dkdp.count_params(model.compact_teacher()) <= 15


# --- 6. A resume with no epoch left still ends the run -------------------
@pytest.mark.parametrize("ending", ["best", "average"])
def test_a_resume_after_the_last_epoch_ends_as_the_run_did(tmp_path, ending):
    """Interrupted after the last epoch (a CLI run during its export): the
    resumed fit runs no epoch, and on_train_end knew nothing of the run (the
    Adaptive controller's state was not read back: no best epoch)."""
    x, y = sign_data(128)

    def run():
        keras.utils.set_random_seed(0)
        model = compiled(dkdp.prunable(keras.Sequential([
            keras.Input((8,)), keras.layers.Dense(24, activation="relu"),
            keras.layers.Dense(3)])))
        policy = thresholds.Adaptive(dkdp.Budget(max_params=150), finish_by=0.4,
                                     tolerance=0.5)
        cb = dkdp.DKDPCallback(threshold=policy, average=ending == "average",
                               verbose=0)
        backup = keras.callbacks.BackupAndRestore(str(tmp_path / "b"),
                                                  delete_checkpoint=False)
        values = [0.9, 0.9, 0.95, 0.9, 0.9, 0.9]
        model.fit(x, y, epochs=6, batch_size=32, verbose=0,
                  callbacks=[ScriptedMetric(values), cb, backup])
        return model, cb

    straight, cb = run()
    assert cb.final["kept"] == ending
    resumed, cb_resumed = run()  # the backup holds all 6 epochs
    assert int(resumed.optimizer.iterations.numpy()) == 24
    assert cb_resumed.final["kept"] == ending
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


# --- 2. A weight average that validates worse is not kept ----------------
def bn_model_and_data():
    x, y = sign_data(256, 0)
    xv, yv = sign_data(128, 1)
    # Inputs of scale 30: BatchNormalization's moving variance (from 1
    # towards ~1e3) is still settling at momentum 0.99, so its mean over
    # epochs is off.
    teacher = keras.Sequential([
        keras.Input((8,)), keras.layers.Dense(24), keras.layers.BatchNormalization(),
        keras.layers.ReLU(), keras.layers.Dense(3)])
    return compiled(dkdp.DKDPModel(teacher)), (30 * x, y), (30 * xv, yv)


def test_a_weight_average_that_validates_worse_is_not_kept(capsys):
    model, (x, y), (xv, yv) = bn_model_and_data()
    cb = dkdp.DKDPCallback(threshold=thresholds.ConstantSparsity(0.5), end=8,
                           batchnorm_momentum=None, verbose=1)
    history = model.fit(x, y, validation_data=(xv, yv), epochs=8, batch_size=64,
                        verbose=0, callbacks=[cb])
    last = history.history["val_teacher_accuracy"][-1]
    now = model.evaluate(xv, yv, verbose=0, return_dict=True)["teacher_accuracy"]
    assert now == pytest.approx(last)
    assert cb.final["kept"] == "last" and cb.averaged_epochs == 0
    assert cb.final["values"]["average"] < last - 0.05
    out = capsys.readouterr().out
    assert "ends with the weights of the last epoch" in out
    assert "also considered: the mean of its weights" in out


def test_without_validation_data_a_batchnorm_model_keeps_its_last_epoch():
    model, (x, y), _ = bn_model_and_data()
    teacher = dkdp.prunable(model.teacher)
    compiled(teacher)
    cb = dkdp.DKDPCallback(threshold=thresholds.ConstantSparsity(0.5), end=4,
                           batchnorm_momentum=None, verbose=0)
    last = []
    spy = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: last.__setitem__(slice(None), teacher.get_weights()))
    teacher.fit(x, y, epochs=6, batch_size=64, verbose=0, callbacks=[cb, spy])
    assert cb.final["kept"] == "last"
    for a, b in zip(teacher.get_weights(), last):
        np.testing.assert_array_equal(a, b)


# --- 3. Few steps an epoch: BatchNormalization statistics that follow ----
def test_batchnorm_momentum_follows_the_steps_of_an_epoch_and_comes_back():
    model, (x, y), (xv, yv) = bn_model_and_data()
    bn = [l for l in model.teacher.layers if isinstance(l, keras.layers.BatchNormalization)][0]
    seen = []
    spy = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: seen.append(bn.momentum))
    cb = dkdp.DKDPCallback(threshold=thresholds.ConstantSparsity(0.3), verbose=0)
    model.fit(x, y, validation_data=(xv, yv), epochs=3, batch_size=64, verbose=0,
              callbacks=[cb, spy])
    assert seen == [pytest.approx(0.05 ** (1 / 4))] * 3  # 4 steps an epoch
    assert bn.momentum == 0.99
    # Its moving variance follows the data (scale 30: about 900 before the
    # Dense layer's own scale), not the initial 1.
    assert float(np.median(bn.moving_variance.numpy())) > 50


# --- 9. An epoch whose every step was skipped ----------------------------
def test_an_epoch_of_skipped_steps_says_so_and_prunes_nothing():
    x, y = sign_data(96)
    x[:] = np.nan
    model = dkdp.DKDPModel(keras.Sequential([
        keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(3)]), on_nonfinite="skip")
    compiled(model)
    cb = dkdp.DKDPCallback(threshold=thresholds.ConstantSparsity(0.5), verbose=0)
    with pytest.warns(UserWarning, match="epoch 1 applied no training step"):
        history = model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[cb])
    assert history.history["skipped_steps"] == [3.0, 3.0]
    assert all(np.isnan(v) for v in history.history["loss"])
    assert dkdp.sparsity(model.teacher) == 0.0 and cb.events == 0


# --- 8. Data of unknown length -------------------------------------------
def test_the_default_schedule_follows_the_steps_of_data_of_unknown_length():
    x, y = sign_data(128)
    data = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True).batch(16)
    assert int(data.cardinality()) == tf.data.UNKNOWN_CARDINALITY
    model = compiled(dkdp.prunable(sign_mlp()))
    cb = dkdp.DKDPCallback(verbose=0)  # PolynomialDecay(0, 0.8) to 70% of the steps
    seen = []
    spy = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: seen.append(int(model.optimizer.iterations.numpy())))
    history = model.fit(data, epochs=4, verbose=0, callbacks=[cb, spy])
    levels = history.history["sparsity"]
    # 8 batches an epoch (Keras counts one more step in the first epoch of
    # data of unknown length): the schedule ends at 70% of 4 epochs of the
    # steps the first one took; after epoch 1 it is partway, not at 0.8.
    steps = seen[0]
    assert steps in (8, 9)
    end = int(0.7 * 4 * steps)
    assert cb.threshold.end_step == end
    assert levels[0] == pytest.approx(0.8 * (1 - (1 - steps / end) ** 3), abs=0.02)
    assert levels[0] < 0.7
    assert levels[-1] == pytest.approx(0.8, abs=0.01)


def sign_mlp():
    return keras.Sequential([
        keras.Input((8,)), keras.layers.Dense(24, activation="relu"),
        keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])


# --- 10. No dead copies in a file saved after fit ------------------------
def test_a_keras_file_saved_after_fit_holds_no_dead_copies(tmp_path):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(256, 64)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    teacher = keras.Sequential([
        keras.Input((64,)), keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(256, activation="relu"), keras.layers.Dense(2)])
    model = compiled(dkdp.DKDPModel(teacher))
    cb = dkdp.DKDPCallback(
        threshold=thresholds.Adaptive(dkdp.Budget(max_params=20_000), finish_by=0.4),
        verbose=0)
    model.fit(x, y, validation_split=0.25, epochs=6, batch_size=64, verbose=0,
              callbacks=[cb])
    assert cb.final["kept"] in ("average", "best", "last")
    state = pruning_state(model)
    assert not [k for k in state.keys()
                if k.startswith(("avg:", "best:", "adaptive:good:"))]
    path = tmp_path / "m.keras"
    model.save(path)
    variables = list(model.weights) + list(model.optimizer.variables) + list(
        model.student_optimizer.variables)
    weight_bytes = sum(np.asarray(v.numpy()).nbytes for v in variables)
    state_bytes = sum(np.asarray(v.numpy()).nbytes for v in state.variables)
    assert state_bytes < 0.01 * weight_bytes
    # The file: the variables once, plus config and archive overhead.
    assert os.path.getsize(path) < weight_bytes + state_bytes + 100_000
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(reloaded.teacher.predict(x[:8], verbose=0),
                               model.teacher.predict(x[:8], verbose=0), atol=1e-6)


# --- 11. Shared layers, two callbacks ------------------------------------
def shared_layer_model():
    inputs = keras.Input((6,))
    shared = keras.layers.Dense(6, activation="relu", name="shared")
    h = shared(shared(inputs))
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(h))


def test_the_auto_student_of_a_model_with_a_shared_layer_is_refused():
    with pytest.raises(ValueError, match=r"student='auto'.*more than one place.*student="):
        dkdp.DKDPModel(shared_layer_model())
    # A student of one's own works, and weight pruning trains.
    student = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    model = compiled(dkdp.DKDPModel(shared_layer_model(), student=student))
    x, y = six_feature_data(64)
    cb = dkdp.DKDPCallback(threshold=thresholds.ConstantSparsity(0.5), verbose=0)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])
    assert dkdp.sparsity(model.teacher) == pytest.approx(0.5, abs=0.02)


def test_unit_pruning_of_a_model_with_a_shared_layer_is_refused_before_training():
    student = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    model = compiled(dkdp.DKDPModel(shared_layer_model(), student=student))
    x, y = six_feature_data(64)
    cb = dkdp.DKDPCallback(granularity="unit", verbose=0,
                           threshold=thresholds.ConstantSparsity(0.5))
    with pytest.raises(ValueError, match="more than one place.*granularity='weight'"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])
    assert int(model.optimizer.iterations.numpy()) == 0


def test_two_dkdp_callbacks_in_one_fit_are_refused():
    x, y = sign_data(64)
    model = compiled(dkdp.prunable(sign_mlp()))
    one = dkdp.DKDPCallback(threshold=thresholds.ConstantSparsity(0.5), verbose=0)
    two = dkdp.DKDPCallback(scope="layer", verbose=0,
                            threshold=thresholds.ConstantSparsity(0.3))
    with pytest.raises(ValueError, match="Two DKDPCallbacks were given to one fit"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[one, two])
    assert int(model.optimizer.iterations.numpy()) == 0
    # One callback over several fits is fine, and so is a new one later.
    model.fit(x, y, epochs=1, verbose=0, callbacks=[one])
    model.fit(x, y, epochs=1, verbose=0, callbacks=[two])


# --- 5. Dropout on resume -------------------------------------------------
def dropout_dkdp(seed=0):
    keras.utils.set_random_seed(seed)
    teacher = keras.Sequential([
        keras.Input((8,)), keras.layers.Dense(24, activation="relu"),
        keras.layers.Dropout(0.3), keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(3)])
    return compiled(dkdp.DKDPModel(teacher, lambda_kd=0.5))


def test_a_run_with_dropout_resumes_exactly(tmp_path):
    x, y = sign_data(96)

    def callbacks(extra=()):
        cb = dkdp.DKDPCallback(importance="taylor", granularity="unit", verbose=0,
                               threshold=thresholds.PolynomialDecay(0.0, 0.6, 0, 12))
        return [cb, keras.callbacks.BackupAndRestore(str(tmp_path / "b")), *extra]

    def fit(model, cbs):
        model.fit(x, y, epochs=5, batch_size=32, shuffle=False, verbose=0, callbacks=cbs)

    straight = dropout_dkdp()
    fit(straight, callbacks())
    first = dropout_dkdp()
    with pytest.raises(Interrupted):
        fit(first, callbacks([Interrupt(3 * 3 + 1)]))  # inside epoch 4
    resumed = dropout_dkdp(seed=1)  # another process: other seeds
    fit(resumed, callbacks())
    for a, b in zip(straight.weights, resumed.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6, err_msg=a.path)


# --- 12. The report shows what was decided from ---------------------------
def test_the_summary_shows_the_scores_of_the_decision_and_what_ships(tmp_path):
    from tests.conftest import small_cnn

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(96, 8, 8, 2)).astype("float32")
    y = (x[:, 0, 0, 0] > 0).astype("int64") + (x[:, 1, 1, 1] > 0)
    model = compiled(dkdp.DKDPModel(small_cnn()))
    cb = dkdp.DKDPCallback(importance="taylor", granularity="unit", verbose=0,
                           threshold=thresholds.ConstantSparsity(0.5))
    model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[cb])
    decision = cb.last_decision
    assert decision["criterion"] == "Taylor" and decision["step"] == 6
    summary = dkdp.report.importance_summary(model, decision=decision, out_dir=tmp_path)
    assert summary.title == "Taylor scores of each unit at the pruning decision of step 6"
    small = model.compact_teacher()
    for layer, row in zip(dkdp.masked_layers(model.teacher), summary.rows):
        scores = decision["scores"][layer.name]
        kept = layer.kernel_mask.numpy().reshape(-1, layer.num_units).max(0) > 0
        # The scores the masks came from: within a layer, every unit the
        # decision pruned scored at most what every kept unit did (masked
        # units scored 0 by construction in a summary made after fit).
        if (~kept).any() and (scores[~kept] > 0).any():
            assert scores[~kept].max() <= scores[kept].min()
        assert row["mean_score"] == pytest.approx(float(scores[kept].mean()))
        # Counts as shipped: the compacted layer's kernel.
        kernel = small.get_layer(layer.name).kernel.numpy()
        assert row["shipped_weights"] == int(np.count_nonzero(kernel))
    # Some layer ships fewer weights than its masks keep: inputs from the
    # removed units of the layer before went too.
    assert any(r["shipped_weights"] < r["kept_weights"] for r in summary.rows)
    assert "shipped weights" in summary.markdown
    assert all(p.stat().st_size > 5000 for p in summary.plots)


def test_the_cli_report_lists_events_in_units_a_reader_follows():
    from dkdp_keras.pipeline import _events_table

    history = [
        {"step": 41, "tau": 1.8e-8, "sparsity": 0.225, "kept_params": 66_000, "before": 0.0},
        {"step": 82, "tau": 4.1e-4, "sparsity": 0.40, "kept_params": 40_000,
         "before": float("nan")},
    ]
    table = _events_table(history, 41, "lamp")
    assert "| 1 | 1 (41) | 0.0% -> 22.5% | +22.5% | 66,000 | 1.8e-08 |" in table
    # Without its own 'before' (an old checkpoint), the last event's sparsity.
    assert "| 2 | 2 (82) | 22.5% -> 40.0% | +22.6% | 40,000 | 0.00041 |" in table
    assert "LAMP score" in table and "each layer's best entry scores 1" in table
    assert _events_table([], 41, "lamp") == "No pruning event.\n"


# --- 3. A short run on small data means something ------------------------
@pytest.mark.slow
def test_the_quick_digits_run_beats_chance_by_far(tmp_path):
    """246 steps at BatchNormalization's momentum 0.99 left its moving
    variance 18x too large, and every model of the run at chance (10%)."""
    import json

    from dkdp_keras import cli

    out = tmp_path / "run"
    assert cli.main(["run", "--quick", "--dataset", "digits", "--no-dense",
                     "--quantize", "none", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    teacher, student = metrics["models"]
    assert teacher["tflite_acc"] > 0.8 and student["tflite_acc"] > 0.6
    assert max(metrics["history"]["val_teacher_accuracy"]) > 0.8
    report = (out / "report.md").read_text()
    assert "## Pruning events" in report
    assert "Taylor scores of each unit at the pruning decision of step" in report


def test_the_cli_refuses_a_budget_pruning_cannot_meet_before_any_training(tmp_path, capsys):
    from dkdp_keras import cli

    out = tmp_path / "run"
    code = cli.main(["run", "--dataset", "digits", "--model", "lenet_300_100",
                     "--max-params", "100", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "cannot be met by pruning" in err[0] and "leaves" in err[0]
    assert not (out / "settings.json").exists() and not (out / "dense.keras").exists()


# --- Messages that say what is wrong --------------------------------------
def test_a_monitor_the_logs_will_not_have_is_refused_before_training():
    x, y = six_feature_data(64)
    for kwargs, text in [
        ({}, r"'val_accuracy'.*fit has no validation data: pass validation_data="),
        ({"validation_split": 0.25}, None),
    ]:
        model = compiled(dkdp.DKDPModel(mlp_6_16_16_3()))
        policy = thresholds.Adaptive(dkdp.Budget(max_params=200),
                                     monitor="val_accuracy" if text else "val_acc")
        cb = dkdp.DKDPCallback(threshold=policy, verbose=0)
        with pytest.raises(ValueError, match=text or r"'val_acc'.*'val_teacher_accuracy'"):
            model.fit(x, y, epochs=1, verbose=0, callbacks=[cb], **kwargs)
        assert int(model.optimizer.iterations.numpy()) == 0


def test_a_frozen_layer_under_taylor_is_named_as_frozen():
    x, y = six_feature_data(64)
    teacher = mlp_6_16_16_3()
    teacher.layers[0].trainable = False
    model = compiled(dkdp.DKDPModel(teacher))
    cb = dkdp.DKDPCallback(importance="taylor", granularity="unit", verbose=0,
                           threshold=thresholds.ConstantSparsity(0.3))
    with pytest.raises(ValueError, match=r"layer 'dense\w*' of model .* is frozen \(trainable=False\).*Unfreeze it"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])
    assert int(model.optimizer.iterations.numpy()) == 0
