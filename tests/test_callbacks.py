"""DKDPCallback inside fit: schedules, every criterion and granularity,
the adaptive controller, NaN safety, logs and summaries."""


import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
import dkdp_keras.layers  # noqa: F401
from dkdp_keras import importance, thresholds
from tests.conftest import sign_data, two_hidden_mlp

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


mlp = two_hidden_mlp


def data(n=128, seed=0):
    return sign_data(n, seed)


def dkdp_model(teacher=None, **kwargs):
    model = dkdp.DKDPModel(teacher or mlp(), **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=CE, metrics=["accuracy"])
    return model


def plain_model(**kwargs):
    model = dkdp.prunable(mlp(), **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=CE, metrics=["accuracy"])
    return model


def unit_columns_are_whole(layer):
    units = layer.kernel_mask.numpy().reshape(-1, layer.num_units)
    return bool(np.all(units.min(axis=0) == units.max(axis=0)))


def test_constant_sparsity_on_a_plain_prunable_model():
    x, y = data()
    model = plain_model()
    cb = dkdp.DKDPCallback(threshold=thresholds.ConstantSparsity(0.7), verbose=0)
    history = model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[cb])
    assert dkdp.sparsity(model) == pytest.approx(0.7, abs=0.005)
    for key in ("tau", "sparsity", "kept_params", "kept_macs"):
        assert key in history.history
    assert history.history["sparsity"][-1] == pytest.approx(dkdp.sparsity(model))
    assert history.history["kept_params"][-1] == dkdp.count_params(dkdp.compact(model))
    assert cb.events == 2


def test_polynomial_decay_every_n_steps():
    x, y = data(256)
    model = plain_model()
    sched = thresholds.PolynomialDecay(0.0, 0.8, begin_step=4, end_step=24)
    cb = dkdp.DKDPCallback(threshold=sched, frequency=4, begin=4, end=24, verbose=0)
    model.fit(x, y, epochs=4, batch_size=32, verbose=0, callbacks=[cb])  # 32 steps
    steps = [h["step"] for h in cb.history]
    assert steps == [4, 8, 12, 16, 20, 24]
    levels = [h["sparsity"] for h in cb.history]
    assert all(b >= a - 1e-9 for a, b in zip(levels, levels[1:]))
    assert levels[-1] == pytest.approx(0.8, abs=0.005)
    assert dkdp.sparsity(model) == pytest.approx(0.8, abs=0.005)


CRITERIA = {
    "magnitude": lambda x, y: importance.Magnitude(),
    "gradient": lambda x, y: importance.GradientMagnitude(),
    "taylor": lambda x, y: importance.Taylor(),
    "activation": lambda x, y: importance.ActivationFrequency(),
    "activation_abs": lambda x, y: importance.ActivationFrequency("mean_abs"),
    "learned_mask": lambda x, y: importance.LearnedMask(),
    "output_contribution": lambda x, y: importance.OutputContribution(x[:32]),
    "combined": lambda x, y: importance.Combined([("magnitude", 1.0), ("taylor", 1.0)]),
}


@pytest.mark.parametrize("granularity", ["weight", "unit"])
@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_every_criterion_and_granularity_in_fit(name, granularity):
    x, y = data()
    teacher = dkdp.prunable(mlp(), learnable_mask=(name == "learned_mask"),
                            gate_l1=1e-3 if name == "learned_mask" else 0.0,
                            track_statistics=True)
    model = dkdp_model(teacher)
    cb = dkdp.DKDPCallback(importance=CRITERIA[name](x, y), granularity=granularity,
                           threshold=thresholds.ConstantSparsity(0.5), verbose=0)
    model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[cb])
    layers = dkdp.masked_layers(model.teacher)
    if granularity == "weight":
        assert dkdp.sparsity(model.teacher) == pytest.approx(0.5, abs=0.005)
    else:
        # Whole units go; the output layer's units all stay.
        assert dkdp.sparsity(model.teacher) == pytest.approx(0.5, abs=0.06)
        assert all(unit_columns_are_whole(layer) for layer in layers)
        assert np.all(layers[-1].kernel_mask.numpy() == 1.0)
        removed = [(layer.kernel_mask.numpy().reshape(-1, layer.num_units).max(0) == 0).sum()
                   for layer in layers[:-1]]
        assert sum(removed) > 0


def test_gradient_criteria_on_plain_models_need_calibration_data():
    x, y = data()
    cb = dkdp.DKDPCallback(importance="taylor", threshold=thresholds.ConstantSparsity(0.5))
    with pytest.raises(ValueError, match="calibration_data"):
        plain_model(track_statistics=True).fit(x, y, epochs=1, verbose=0, callbacks=[cb])
    model = plain_model(track_statistics=True)
    cb = dkdp.DKDPCallback(importance="taylor", threshold=thresholds.ConstantSparsity(0.5),
                           calibration_data=(x[:64], y[:64]), verbose=0)
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[cb])
    assert dkdp.sparsity(model) == pytest.approx(0.5, abs=0.005)


def test_unprunable_model_is_refused():
    x, y = data()
    model = mlp()
    model.compile(optimizer="adam", loss=CE)
    with pytest.raises(ValueError, match="dkdp_keras.prunable"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[dkdp.DKDPCallback()])


def test_adaptive_meets_a_parameter_budget_in_the_same_fit():
    x, y = data(256)
    model = dkdp_model()
    dense = dkdp.count_params(model.teacher, nonzero=False)
    budget = dkdp.Budget(max_params=dense // 10)
    cb = dkdp.DKDPCallback(threshold=thresholds.Adaptive(budget, tolerance=0.2), verbose=0)
    history = model.fit(x, y, epochs=6, batch_size=32, verbose=0, callbacks=[cb],
                        validation_data=(x[:64], y[:64]))
    assert budget.is_met(model.teacher)
    # Measured as deployed: compacted, then non-zeros counted.
    assert dkdp.count_params(dkdp.compact(model.teacher)) <= dense // 10
    assert history.history["budget_usage"][-1] <= 1.0
    # It got there in steps, not at once.
    assert len(cb.history) >= 2
    assert cb.history[0]["sparsity"] < cb.history[-1]["sparsity"]


class ScriptedMetric(keras.callbacks.Callback):
    """Writes a scripted val_accuracy into the epoch logs."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def on_epoch_end(self, epoch, logs=None):
        logs["val_accuracy"] = self.values[epoch]


def test_adaptive_backs_off_when_the_metric_falls():
    x, y = data()
    model = plain_model()
    policy = thresholds.Adaptive(dkdp.Budget(max_params=150), tolerance=0.05,
                                 initial_step=0.3, backoff=0.5, recovery_events=1,
                                 finish_by=1.0)
    values = [0.90, 0.90, 0.50, 0.90, 0.90, 0.90, 0.90, 0.90]
    cb = dkdp.DKDPCallback(threshold=policy, verbose=0)
    model.fit(x, y, epochs=8, batch_size=64, verbose=0,
              callbacks=[ScriptedMetric(values), cb])
    levels = [h["sparsity"] for h in cb.history]
    # epoch 0: reference 0.90, prune; epoch 1: fine, prune more;
    # epoch 2: 0.50 < 0.85 -> back to the masks after epoch 0's event.
    assert policy.backoffs == 1
    assert policy.step == pytest.approx(0.15)
    assert levels[1] > levels[0]
    assert policy.budget.is_met(model)


def test_adaptive_restores_the_masks_of_the_last_good_step():
    x, y = data()
    model = plain_model()
    policy = thresholds.Adaptive(dkdp.Budget(max_params=100), tolerance=0.05,
                                 initial_step=0.2, finish_by=1.0, recovery_events=0)
    seen = {}

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen[epoch] = {l.name: l.kernel_mask.numpy().copy() for l in dkdp.masked_layers(model)}

    values = [0.9, 0.9, 0.2, 0.9, 0.9, 0.9]
    cb = dkdp.DKDPCallback(threshold=policy, verbose=0)
    model.fit(x, y, epochs=6, batch_size=64, verbose=0,
              callbacks=[ScriptedMetric(values), cb, Spy()])
    assert policy.backoffs == 1
    for name, mask in seen[2].items():
        np.testing.assert_array_equal(mask, seen[0][name])


def test_adaptive_warns_when_the_metric_ends_below_tolerance():
    x, y = data()
    model = plain_model()
    policy = thresholds.Adaptive(dkdp.Budget(max_params=300), tolerance=0.01, finish_by=0.5,
                                 restore_best=False)
    values = [0.9, 0.9, 0.9, 0.7]
    with pytest.warns(UserWarning, match=r"ended 0.2000 below its best"):
        model.fit(x, y, epochs=4, batch_size=64, verbose=0,
                  callbacks=[ScriptedMetric(values), dkdp.DKDPCallback(threshold=policy, verbose=0)])
    assert policy.budget.is_met(model)


def test_adaptive_needs_its_metric():
    x, y = data()
    cb = dkdp.DKDPCallback(threshold=thresholds.Adaptive(dkdp.Budget(max_params=300)))
    with pytest.raises(ValueError, match="pass validation_data"):
        plain_model().fit(x, y, epochs=1, verbose=0, callbacks=[cb])
    with pytest.raises(ValueError, match="max_params=2 is below the 3 parameters"):
        plain_model().fit(x, y, epochs=1, verbose=0, callbacks=[
            dkdp.DKDPCallback(threshold=thresholds.Adaptive(dkdp.Budget(max_params=2)))])


class PoisonKernel(keras.callbacks.Callback):
    """Writes NaN into the first kernel at the end of step `step`, after
    that step's loss was computed (so the logged loss stays finite)."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 == self.step:
            kernel = dkdp.masked_layers(self.model)[0].kernel
            values = kernel.numpy()
            values.flat[0] = np.nan
            kernel.assign(values)


@pytest.mark.parametrize("where,message", [
    ("weight", "loss became nan.*masks are as they were"),
    # A kernel that holds NaN while the logged loss is still finite (a NaN
    # input pixel did this on some CPUs, whose ReLU swallows NaN, and not
    # on others): caught by the scores' check before the first event.
    ("kernel", "kernel of layer .* holds NaN or Inf.*masks are as they were"),
])
def test_divergence_stops_training_before_any_pruning(where, message):
    x, y = data()
    w = np.ones(len(x), "float32")
    callbacks = []
    if where == "weight":
        w[5] = np.nan
    else:
        callbacks.append(PoisonKernel(step=2))
    model = plain_model()
    cb = dkdp.DKDPCallback(threshold=thresholds.ConstantSparsity(0.5), frequency=2, verbose=0)
    with pytest.raises(FloatingPointError, match=message):
        model.fit(x, y, sample_weight=w, epochs=1, batch_size=32, shuffle=False,
                  verbose=0, callbacks=callbacks + [cb])
    assert cb.events == 0
    assert all(np.all(l.kernel_mask.numpy() == 1.0) for l in dkdp.masked_layers(model))


def test_nan_scores_skip_the_event_with_a_warning():
    x, y = data()
    model = plain_model()

    def broken(layer, granularity):
        return keras.ops.full(layer.kernel.shape, np.nan)

    cb = dkdp.DKDPCallback(importance=broken, threshold=thresholds.ConstantSparsity(0.5), verbose=0)
    with pytest.warns(UserWarning, match="NaN or Inf; this pruning event is skipped"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])
    assert dkdp.sparsity(model) == 0.0


def test_student_refresh_every_event():
    x, y = data()
    model = dkdp_model()
    students = []

    class Watch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            students.append(model.student)

    cb = dkdp.DKDPCallback(threshold=thresholds.ConstantSparsity(0.5), student_refresh=1, verbose=0)
    model.fit(x, y, epochs=2, verbose=0, callbacks=[cb, Watch()])
    assert students[0] is not students[1]
    shrink = dkdp.DKDPCallback(threshold=thresholds.ConstantSparsity(0.8),
                               student_refresh=dkdp.StudentRefresh(shrink=2.0), verbose=0)
    before = model.student
    model.fit(x, y, epochs=2, verbose=0, callbacks=[shrink])
    assert model.student is not before


def test_tensorboard_and_importance_summary(tmp_path):
    x, y = data()
    model = dkdp_model()
    cb = dkdp.DKDPCallback(granularity="unit", threshold=thresholds.ConstantSparsity(0.5),
                           log_dir=tmp_path / "tb", verbose=0)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    import matplotlib

    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend that cannot write PNG files itself
    try:
        summary = dkdp.report.importance_summary(model, "magnitude", out_dir=tmp_path / "png")
        assert matplotlib.get_backend() == "svg"  # the caller's backend is left alone
    finally:
        matplotlib.use(backend)
    rows = {r["layer"]: r for r in summary.rows}
    for layer in dkdp.masked_layers(model.teacher):
        mask = layer.kernel_mask.numpy()
        assert rows[layer.name]["kept_weights"] == int(mask.sum())
        assert rows[layer.name]["kept_units"] == int((mask.reshape(-1, layer.num_units).max(0) > 0).sum())
    assert "| layer | type |" in summary.markdown
    for path in summary.plots:
        assert path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no masked layer"):
        dkdp.report.importance_summary(mlp())


@pytest.mark.parametrize(
    "kwargs,error,text",
    [
        (dict(granularity="layer"), ValueError, "granularity must be one of"),
        (dict(threshold=0.5), TypeError, "threshold must be a dkdp_keras.thresholds policy"),
        (dict(frequency=0), ValueError, "frequency must be in"),
        (dict(frequency="batch"), TypeError, "frequency must be an integer"),
        (dict(begin=10, end=5), ValueError, "end must be in"),
        (dict(normalize="max"), ValueError, "normalize must be one of"),
        (dict(importance="fisher"), ValueError, "Unknown importance criterion"),
        (dict(student_refresh="often"), TypeError, "student_refresh must be None"),
        (dict(floors=0.1), TypeError, "floors must be"),
    ],
)
def test_bad_arguments(kwargs, error, text):
    with pytest.raises(error, match=text):
        dkdp.DKDPCallback(**kwargs)
    with pytest.raises(ValueError, match="every= or shrink="):
        dkdp.StudentRefresh()


def test_only_the_statistics_the_criterion_reads_are_collected():
    x, y = data()
    model = dkdp_model()
    cb = dkdp.DKDPCallback(threshold=thresholds.ConstantSparsity(0.3), verbose=0)
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[cb])
    first = dkdp.masked_layers(model.teacher)[0]
    assert float(first.gradient_steps.numpy()) == 0 and float(first.activation_steps.numpy()) == 0
    cb = dkdp.DKDPCallback(importance="taylor", threshold=thresholds.ConstantSparsity(0.3),
                           frequency=100, verbose=0)
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[cb])
    assert float(first.gradient_steps.numpy()) == 4 and float(first.activation_steps.numpy()) == 0
    with pytest.raises(ValueError, match="Unknown statistics"):
        model.request_statistics({"hessian"})
    with pytest.raises(ValueError, match="Unknown gradient statistics"):
        model.request_statistics({"gradient"}, gradient_statistics=("fisher",))


@pytest.mark.parametrize("granularity, layer_importance, kept", [
    ("unit", False, ("taylor_unit",)),
    ("weight", False, ("taylor",)),
    ("weight", True, ("taylor", "taylor_unit")),
])
def test_only_the_gradient_means_the_scores_read_are_kept(granularity, layer_importance, kept):
    x, y = data()
    model = dkdp_model()
    cb = dkdp.DKDPCallback(importance="taylor", granularity=granularity,
                           layer_importance=layer_importance,
                           threshold=thresholds.ConstantSparsity(0.3), frequency=100,
                           verbose=0)
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[cb])
    for layer in dkdp.masked_layers(model.teacher):
        assert layer.gradient_statistics == kept
        for name in ("gradient_abs", "taylor", "taylor_unit"):
            assert (np.abs(getattr(layer, name).numpy()).max() > 0) == (name in kept), name
    # A criterion that reads a mean not kept says so instead of reading zeros.
    with pytest.raises(ValueError, match="gradient_abs statistics.*request_statistics"):
        dkdp.importance.GradientMagnitude().score(dkdp.masked_layers(model.teacher)[0])


def test_removed_filters_are_exact_zeros_after_batchnorm():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 3, 64)
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU()(h)
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(h))
    model = dkdp.prunable(keras.Model(inputs, outputs))
    model.compile(optimizer="adam", loss=CE)
    # The output layer's units stay, so 0.1 of all weights is 0.37 of conv's.
    cb = dkdp.DKDPCallback(granularity="unit", threshold=thresholds.ConstantSparsity(0.1), verbose=0)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    conv = model.get_layer("conv")
    dead = conv.unit_mask().numpy() == 0
    assert dead.sum() == 3
    bn = model.get_layer("bn")
    assert np.all(bn.moving_mean.numpy()[dead] == 0) and np.all(bn.moving_variance.numpy()[dead] == 0)
    assert isinstance(bn, dkdp.layers.MaskedBatchNormalization)
    np.testing.assert_array_equal(bn.channel_mask.numpy(), (~dead).astype("float32"))
    probe = keras.Model(model.inputs[0], bn.output)
    infer = probe(x[:4], training=False).numpy()[..., dead]
    train = probe(x[:4], training=True).numpy()[..., dead]
    # Removed filters are exact zeros after normalisation, in both modes.
    assert np.all(infer == 0.0) and np.all(train == 0.0)
    stripped = dkdp.strip(model)
    np.testing.assert_allclose(stripped(x[:4]).numpy(), model(x[:4]).numpy(), atol=1e-5)


def test_layer_importance_shifts_the_budget_between_layers():
    x, y = data()
    results = {}
    for flag in (False, True):
        keras.utils.set_random_seed(0)
        model = plain_model()
        model.layers[0].kernel.assign(model.layers[0].kernel.numpy() * 10.0)  # a heavy layer
        cb = dkdp.DKDPCallback(threshold=thresholds.ConstantSparsity(0.6), normalize="mean",
                               layer_importance=flag, verbose=0)
        model.fit(x, y, epochs=1, batch_size=64, verbose=0, callbacks=[cb])
        results[flag] = [1 - l.kernel_mask.numpy().mean() for l in dkdp.masked_layers(model)]
    assert max(abs(a - b) for a, b in zip(results[True], results[False])) > 0.1
    # The layer whose weights matter most (by magnitude) loses less with it.
    assert results[True][0] < results[False][0]


@pytest.mark.parametrize("restore_best", [True, False])
def test_adaptive_ends_with_the_best_epoch_within_the_budget(restore_best):
    x, y = data()
    model = plain_model()
    policy = thresholds.Adaptive(dkdp.Budget(max_params=150), tolerance=0.5,
                                 finish_by=0.2, restore_best=restore_best)
    weights = {}

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            weights[epoch] = model.get_weights()

    # The budget is met from the first event on; epoch 3 is the best.
    values = [0.90, 0.90, 0.90, 0.97, 0.92, 0.91]
    model.fit(x, y, epochs=6, batch_size=32, verbose=0,
              callbacks=[ScriptedMetric(values),
                         dkdp.DKDPCallback(threshold=policy, average=False, verbose=0),
                         Spy()])
    assert policy.budget.is_met(model)
    kept = 3 if restore_best else 5
    for now, then in zip(model.get_weights(), weights[kept]):
        np.testing.assert_array_equal(now, then)
    assert not all(np.array_equal(a, b) for a, b in zip(weights[3], weights[5]))


class WeightSpy(keras.callbacks.Callback):
    """Each epoch end's weights and masks (listed after DKDPCallback)."""

    def on_train_begin(self, logs=None):
        self.weights, self.masks = [], []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(self.model.get_weights())
        self.masks.append([l.kernel_mask.numpy().copy()
                           for l in dkdp.masked_layers(self.model)])


def assert_weights_are_the_mean_of(model, snapshots):
    for i, now in enumerate(model.get_weights()):
        mean = np.mean([w[i] for w in snapshots], axis=0)
        np.testing.assert_allclose(now, mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("average", [True, False])
def test_training_ends_with_the_mean_of_the_epochs_since_the_masks_changed(average):
    x, y = data()  # 128 examples, batch 32: 4 steps per epoch
    model = plain_model()
    cb = dkdp.DKDPCallback(threshold=thresholds.ConstantSparsity(0.5), end=4,
                           average=average, verbose=0)
    spy = WeightSpy()
    model.fit(x, y, epochs=5, batch_size=32, verbose=0, callbacks=[cb, spy])
    assert cb.events == 1  # at the end of epoch 1 only
    # Epochs 2-5 trained with the masks of that event; epoch 1's weights
    # were made for other masks and are not in the mean, nor is epoch 2's,
    # the first after the event (still recovering from it).
    if average:
        assert cb.averaged_epochs == 3
        assert_weights_are_the_mean_of(model, spy.weights[2:])
    else:
        assert cb.averaged_epochs == 0
        for now, last in zip(model.get_weights(), spy.weights[-1]):
            np.testing.assert_array_equal(now, last)
    # Different from the last epoch's: the test can tell the two apart.
    assert not all(np.allclose(a, b) for a, b in zip(spy.weights[-1], spy.weights[-2]))
    for layer, mask in zip(dkdp.masked_layers(model), spy.masks[-1]):
        np.testing.assert_array_equal(layer.kernel_mask.numpy(), mask)
    assert dkdp.sparsity(model) == pytest.approx(0.5, abs=0.01)


def test_adaptive_ends_with_the_mean_of_the_epochs_under_its_final_masks():
    x, y = data()
    model = plain_model()
    policy = thresholds.Adaptive(dkdp.Budget(max_params=150), tolerance=0.5,
                                 finish_by=0.5)
    spy = WeightSpy()
    values = [0.90, 0.90, 0.90, 0.97, 0.92, 0.91, 0.90, 0.90]
    cb = dkdp.DKDPCallback(threshold=policy, verbose=0)
    model.fit(x, y, epochs=8, batch_size=32, verbose=0,
              callbacks=[ScriptedMetric(values), cb, spy])
    assert policy.budget.is_met(model)
    same = lambda a, b: all(np.array_equal(u, v) for u, v in zip(a, b))  # noqa: E731
    # The epochs that trained with the final masks: the trailing run of
    # epoch ends whose masks equal the epoch end's before.
    epochs = []
    for e in range(len(spy.masks) - 1, 0, -1):
        if not (same(spy.masks[e], spy.masks[-1]) and same(spy.masks[e - 1], spy.masks[-1])):
            break
        epochs.insert(0, e)
    assert len(epochs) >= 3, "the budget should be met well before the end"
    # The first of them, still recovering from the event, is left out.
    assert cb.averaged_epochs == len(epochs) - 1
    assert_weights_are_the_mean_of(model, [spy.weights[e] for e in epochs[1:]])


def test_fewer_than_three_epochs_under_the_final_masks_are_not_averaged():
    x, y = data()  # 4 steps per epoch: the event at the end of epoch 1
    model = plain_model()
    cb = dkdp.DKDPCallback(threshold=thresholds.ConstantSparsity(0.5), end=4, verbose=0)
    spy = WeightSpy()
    model.fit(x, y, epochs=3, batch_size=32, verbose=0, callbacks=[cb, spy])
    # Epochs 2 and 3 only, and 2 is left out: the last epoch's weights.
    assert cb.averaged_epochs == 0
    for now, last in zip(model.get_weights(), spy.weights[-1]):
        np.testing.assert_array_equal(now, last)


def test_average_must_be_a_bool():
    with pytest.raises(TypeError, match="average must be True or False"):
        dkdp.DKDPCallback(average="yes")


def test_adaptive_fills_the_budget_that_a_coarse_unit_step_leaves():
    # Each conv channel feeds 16 Flatten positions into every hidden unit:
    # the smallest unit sparsity that meets the budget leaves room for more.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 4, 4, 1)).astype("float32")
    y = (x.sum(axis=(1, 2, 3)) > 0).astype("int32")
    kept = {}
    for fill in (False, True):
        keras.utils.set_random_seed(0)
        model = dkdp.prunable(keras.Sequential([
            keras.Input((4, 4, 1)),
            keras.layers.Conv2D(32, 3, padding="same", name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu", name="hidden"),
            keras.layers.Dense(2, name="out"),
        ]))
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=CE, metrics=["accuracy"])
        budget = dkdp.Budget(max_params=4_000)
        policy = thresholds.Adaptive(budget, tolerance=0.9, fill_budget=fill)
        # Steps of 8 units (the default, 16, aligns only layers of 64+ units).
        cb = dkdp.DKDPCallback(granularity="unit", threshold=policy, verbose=0,
                               unit_multiple=8)
        history = model.fit(x, y, epochs=5, batch_size=32, verbose=0, callbacks=[cb],
                            validation_data=(x[:64], y[:64]))
        assert budget.is_met(model)
        kept[fill] = history.history["kept_params"][-1]
        assert kept[fill] == dkdp.count_params(dkdp.compact(model))
        units = [int(l.unit_mask().numpy().sum()) for l in dkdp.masked_layers(model)[:2]]
        assert all(u % 8 == 0 for u in units)
    assert kept[False] < kept[True] <= 4_000
    assert kept[True] > 0.75 * 4_000


@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_the_budget_search_is_tight_and_takes_few_measurements(granularity):
    keras.utils.set_random_seed(0)
    model = dkdp.prunable(keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10),
    ]))
    model.compile(optimizer="adam", loss=CE)
    dense = dkdp.count_params(model, nonzero=False)
    budget = dkdp.Budget(max_params=int(0.137 * dense))
    cb = dkdp.DKDPCallback(granularity=granularity, unit_multiple=1, verbose=0,
                           threshold=thresholds.Adaptive(budget, fill_budget=False))
    cb.set_params({"epochs": 4})
    cb.set_model(model)
    cb.on_train_begin()
    scores = cb._scores()
    calls = []
    measure = cb._measure_with
    cb._measure_with = lambda masks: calls.append(1) or measure(masks)
    found = cb._sparsity_for_budget(scores)

    def usage(sparsity):
        return max(measure(cb._masks_for(sparsity, scores).masks).values())

    assert usage(found) <= 1.0
    if granularity == "weight":
        # Parameters fall almost linearly with sparsity: a few secant steps
        # land within 0.1% of the budget (bisection measured eleven times).
        assert usage(found) >= 0.999
        assert len(calls) <= 5
    else:
        # Steps of whole units: the smallest fitting sparsity, to 1/1024.
        assert usage(found - 0.999 / 1024) > 1.0 or usage(found) >= 0.999
        assert len(calls) <= 22
