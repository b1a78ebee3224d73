"""Bad input fails early, with the argument, the value and what is allowed.

Checks already tested beside their module (test_model, test_callbacks,
test_thresholds, test_budget, test_export, ...) are not repeated here."""

import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
from dkdp_keras import importance, thresholds
from dkdp_keras.thresholds import compute_masks, threshold_for_sparsity

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def mlp(inputs=6, classes=3, name="mlp"):
    return keras.Sequential([
        keras.Input((inputs,)),
        keras.layers.Dense(8, activation="relu"),
        keras.layers.Dense(classes),
    ], name=name)


X = np.zeros((16, 6), "float32")
Y = np.zeros(16, "int64")
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("call,error,text", [
    # DKDPModel hyperparameters: NaN, infinite, negative, zero.
    (lambda: dkdp.DKDPModel(mlp(), temperature=NAN), ValueError,
     "temperature must be a finite number, got nan"),
    (lambda: dkdp.DKDPModel(mlp(), temperature=-2.0), ValueError,
     r"temperature must be in \(0.0, inf\], got -2.0"),
    (lambda: dkdp.DKDPModel(mlp(), lambda_kd=INF), ValueError,
     "lambda_kd must be a finite number, got inf"),
    (lambda: dkdp.DKDPModel(mlp(), student_hard_loss_weight=-0.5), ValueError,
     r"student_hard_loss_weight must be in \[0.0, inf\], got -0.5"),
    (lambda: dkdp.DKDPModel(mlp(), student_width=0.0), ValueError,
     r"student_width must be in \(0.0, 1.0\], got 0.0"),
    (lambda: dkdp.DKDPModel(mlp(), kd_loss=keras.losses.KLDivergence()), ValueError,
     r"kd_loss must be one of \('kl', 'mse'\) or a keras.distillation.DistillationLoss"),
    # Strings and files where a model is expected.
    (lambda: dkdp.DKDPModel(mlp(), student="student.keras"), ValueError,
     "student must be 'auto', a Keras model or a callable"),
    (lambda: dkdp.prunable("model.keras"), TypeError,
     "model must be a keras.Model.*keras.saving.load_model"),
    (lambda: dkdp.compact("model.keras"), TypeError, "model must be a keras.Model"),
    (lambda: dkdp.strip(None), TypeError, r"model must be a keras.Model \(Sequential or Functional\), got NoneType"),
    (lambda: dkdp.sparsity("model.keras"), TypeError,
     "model must be a keras.Model, got str.*load_model"),
    (lambda: dkdp.count_params([1, 2]), TypeError, "model must be a keras.Model, got list"),
    (lambda: dkdp.count_macs("m"), TypeError, "model must be a keras.Model"),
    (lambda: dkdp.masked_layers(3), TypeError, "model must be a keras.Model, got int"),
    # prunable's flags.
    (lambda: dkdp.prunable(mlp(), track_statistics="yes"), TypeError,
     "track_statistics must be True or False, got 'yes'"),
    (lambda: dkdp.prunable(mlp(), gate_l1=NAN), ValueError,
     "gate_l1 must be a finite number, got nan"),
    # Student refresh strategies are checked when the callback is made.
    (lambda: dkdp.StudentRefresh(every=1, strategy="deeper"), ValueError,
     r"strategy must be one of \('width', 'compact_teacher'\), got 'deeper'"),
    (lambda: dkdp.StudentRefresh(every=1, strategy=3), TypeError,
     "strategy must be 'width', 'compact_teacher' or a callable"),
    (lambda: dkdp.StudentRefresh(every=0), ValueError, r"every must be in \[1, inf\], got 0"),
    (lambda: dkdp.StudentRefresh(shrink=1.0), ValueError, r"shrink must be in \(1.0, inf\]"),
    # Callback arguments.
    (lambda: dkdp.DKDPCallback(granularity="filter"), ValueError,
     r"granularity must be one of \('weight', 'unit'\), got 'filter'"),
    (lambda: dkdp.DKDPCallback(scope="local"), ValueError, "scope must be one of"),
    (lambda: dkdp.DKDPCallback(log_dir=5), TypeError, "log_dir must be a directory path, got 5"),
    (lambda: dkdp.DKDPCallback(calibration_data=X), TypeError,
     "calibration_data must be a pair"),
    (lambda: dkdp.DKDPCallback(calibration_data=(X, Y[:3])), ValueError,
     "calibration_data x has 16 inputs but 3 targets"),
    (lambda: dkdp.DKDPCallback(threshold=thresholds.Adaptive), TypeError,
     "threshold must be a dkdp_keras.thresholds policy"),
    # Sparsities and tolerances out of range.
    (lambda: thresholds.PolynomialDecay(0.0, 1.2, 0, 10), ValueError,
     r"final_sparsity must be in \[0.0, 1.0\), got 1.2"),
    (lambda: thresholds.ConstantSparsity(-0.1), ValueError, r"target must be in \[0.0, 1.0\)"),
    (lambda: thresholds.Adaptive(dkdp.Budget(max_params=10), tolerance=-0.01), ValueError,
     r"tolerance must be in \[0.0, 1.0\), got -0.01"),
    (lambda: thresholds.Adaptive(dkdp.Budget(max_params=10), tolerance=NAN), ValueError,
     "tolerance must be a finite number"),
    (lambda: thresholds.Adaptive(dkdp.Budget(max_params=10), finish_by=0.0), ValueError,
     r"finish_by must be in \(0.0, 1.0\]"),
    (lambda: thresholds.Adaptive(dkdp.Budget(max_params=10), backoff=1.0), ValueError,
     r"backoff must be in \(0.0, 1.0\)"),
    # Budgets of the wrong type.
    (lambda: thresholds.Adaptive({"max_params": 100}), TypeError,
     "budget must be a dkdp_keras.Budget"),
    (lambda: dkdp.Budget(max_params="60k"), TypeError, "max_params must be a number, got '60k'"),
    (lambda: dkdp.Budget(max_bytes=-1), ValueError, r"max_bytes must be in \(0, inf\]"),
    (lambda: dkdp.Budget(max_params=10, bytes_per_param=3), ValueError, "bytes_per_param must be 1"),
    # Unknown criteria, granularities, normalisations.
    (lambda: importance.get("hessian"), ValueError, "Unknown importance criterion 'hessian'"),
    (lambda: importance.get("wanda"), ValueError,
     r"measures the model on calibration inputs.*importance=dkdp_keras.importance.Wanda\(x\)"),
    (lambda: importance.ActivationFrequency("max"), ValueError, "'nonzero' or 'mean_abs'"),
    (lambda: importance.OutputContribution(X, target="accuracy"), ValueError,
     "target must be 'output' or 'loss', got 'accuracy'"),
    (lambda: importance.OutputContribution(X, Y[:4], target="loss", loss=CE), ValueError,
     "x has 16 inputs but 4 targets"),
    (lambda: importance.OutputContribution(np.zeros((0, 6))), ValueError,
     "x must hold at least one example"),
    (lambda: importance.Magnitude().score(dkdp.masked_layers(dkdp.prunable(mlp()))[0], "channel"),
     ValueError, r"granularity must be one of \('weight', 'unit', 'layer'\), got 'channel'"),
    # Reference models.
    (lambda: dkdp.zoo.reference_cnn(num_classes=0), ValueError, r"num_classes must be in \[1, inf\], got 0"),
    (lambda: dkdp.zoo.lenet_300_100(input_shape=(28, -1)), ValueError,
     r"input_shape must be a non-empty tuple of positive integers.*\(28, -1\)"),
    (lambda: dkdp.zoo.lenet_300_100(width=0), ValueError, r"width must be in \(0.0, inf\]"),
])
def test_public_api_refuses_bad_values(call, error, text):
    with pytest.raises(error, match=text):
        call()


@pytest.mark.parametrize("call,error,text", [
    (lambda s: threshold_for_sparsity([0.1, NAN, 0.3], 0.5), ValueError,
     "scores contain 1 NaN or Inf values"),
    (lambda s: threshold_for_sparsity([], 0.5), ValueError, "at least one score"),
    (lambda s: threshold_for_sparsity([0.1, 0.2], 0.5, sizes=[1, 0]), ValueError,
     "sizes must be 2 positive numbers, one per score"),
    (lambda s: threshold_for_sparsity([0.1, 0.2], 0.5, sizes=[1, 2, 3]), ValueError,
     r"sizes must be 2 positive numbers.*shape \(3,\)"),
    (lambda s: threshold_for_sparsity([0.1, 0.2], NAN), ValueError,
     "sparsity must be a finite number"),
    (lambda s: compute_masks([keras.layers.Dense(2)], s[:1], 0.5), TypeError,
     "layers must be masked layers .* got Dense"),
    (lambda s: compute_masks(dkdp.masked_layers(_masked), s, 0.5, normalize="max"), ValueError,
     r"normalize must be one of \('mean', 'l2', 'lamp', 'none'\), got 'max'"),
])
def test_threshold_mechanism_refuses_bad_values(call, error, text):
    scores = [importance.Magnitude().score(l) for l in dkdp.masked_layers(_masked)]
    with pytest.raises(error, match=text):
        call(scores)


_masked = dkdp.prunable(mlp())


def test_impossible_budgets_fail_before_training():
    model = dkdp.prunable(dkdp.zoo.lenet_300_100(input_shape=(6,), width=0.1))
    model.compile(optimizer="adam", loss=CE)
    x, y = np.zeros((8, 6), "float32"), np.zeros(8, "int64")
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(batch)

    for budget, text in [
        (dkdp.Budget(max_bytes=8), r"max_bytes=8 is below the 12 bytes \(3 parameters x 4\)"),
        (dkdp.Budget(max_macs=2), "max_macs=2 is below the 3 multiply-accumulates"),
    ]:
        cb = dkdp.DKDPCallback(threshold=thresholds.Adaptive(budget), verbose=0)
        with pytest.raises(ValueError, match=text):
            model.fit(x, y, epochs=1, verbose=0, callbacks=[cb, Spy()])
    assert seen == []  # no step ran


def test_data_whose_shape_does_not_match_the_model_fails_before_any_step():
    model = dkdp.DKDPModel(mlp())
    model.compile(optimizer="adam", loss=CE)
    before = [w.numpy().copy() for w in model.weights]
    with pytest.raises(ValueError, match=r"inputs have shape \(5,\) per example, but the "
                                         r"teacher 'mlp' takes \(6,\)"):
        model.fit(np.zeros((8, 5), "float32"), np.zeros(8, "int64"), verbose=0)
    with pytest.raises(ValueError, match=r"inputs have shape \(6, 1\) per example"):
        model.evaluate(np.zeros((8, 6, 1), "float32"), np.zeros(8, "int64"), verbose=0)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights))
    assert int(model.optimizer.iterations.numpy()) == 0

    plain = dkdp.prunable(mlp(), track_statistics=True)
    plain.compile(optimizer="adam", loss=CE)
    cb = dkdp.DKDPCallback(importance="taylor", calibration_data=(np.zeros((4, 7), "float32"),
                                                                  np.zeros(4, "int64")))
    with pytest.raises(ValueError, match=r"calibration_data x has examples of shape \(7,\), "
                                         r"but model 'mlp' takes \(6,\)"):
        plain.fit(X, Y, epochs=1, verbose=0, callbacks=[cb])
    with pytest.raises(ValueError, match=r"x has examples of shape \(7,\)"):
        importance.collect_gradients(plain, np.zeros((4, 7), "float32"), np.zeros(4), CE)
    with pytest.raises(ValueError, match=r"OutputContribution x has examples of shape \(2,\)"):
        importance.OutputContribution(np.zeros((4, 2), "float32")).prepare(plain)


def test_export_checks_its_representative_data(tmp_path):
    model = mlp()
    with pytest.raises(ValueError, match=r"representative_data has examples of shape \(4,\), "
                                         r"but model 'mlp' takes \(6,\)"):
        dkdp.export_tflite(model, tmp_path / "m.tflite", quantize="int8",
                           representative_data=np.zeros((8, 4), "float32"))
    with pytest.raises(TypeError, match="sparsity must be True or False, got 'yes'"):
        dkdp.export_tflite(model, tmp_path / "m.tflite", sparsity="yes")
    assert not (tmp_path / "m.tflite").exists()


XF = np.random.default_rng(0).random((8, 6)).astype("float32")
YF = np.array([0, 1, 2, 0, 1, 2, 0, 1], "int64")


def _ds(*parts, batch=4):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(parts if len(parts) > 1 else parts[0]).batch(batch)


def _with(y, i, value):
    y = y.astype(type(value)).copy()
    y[i] = value
    return y


@pytest.mark.parametrize("loss,data,kwargs,text", [
    # Labels out of the output layer's range, under a sparse loss given as
    # an object, a name or a function.
    (CE, (XF, _with(YF, 3, 7)), {}, r"y holds the label 7, but the teacher 'mlp' has 3 "
     r"outputs: a sparse categorical crossentropy takes class indices 0 to 2\. Fix the "
     r"labels, or give the teacher's last layer one unit per class"),
    ("sparse_categorical_crossentropy", (XF, _with(YF, 0, -1)), {}, r"y holds the label -1"),
    (keras.losses.sparse_categorical_crossentropy, (XF, _with(YF, 0, 1.5)), {},
     r"y holds the label 1.5, .* class indices 0 to 2"),
    # NaN labels, whatever the loss.
    (CE, (XF, _with(YF, 5, NAN)), {}, r"y holds 1 NaN or Inf labels \(the first in "
     r"example 5\): drop or fix those examples before fit"),
    ("mse", (XF, np.where(np.eye(3)[YF] > 0, NAN, 0.0)), {}, "y holds 8 NaN or Inf labels"),
    # One-hot labels with a sparse loss.
    (CE, (XF, np.eye(3, dtype="float32")[YF]), {}, r"y looks one-hot \(shape \(8, 3\), one "
     r"column per class of the teacher 'mlp'\), but the loss is a sparse categorical "
     r"crossentropy, which takes class indices: pass y.argmax\(-1\), or compile with "
     r"loss=keras.losses.CategoricalCrossentropy\(\)"),
    # Datasets: without labels; one-hot labels (from the spec: no batch is read).
    (CE, (_ds(XF),), {}, r"x is a tf.data dataset that yields inputs only, without labels: "
     r"DKDPModel.fit needs \(inputs, labels\) batches, for example tf.data.Dataset.zip"),
    (CE, (_ds(XF, np.eye(3)[YF]),), {}, r"x yields labels of shape \(None, 3\), one-hot"),
    # Arrays without labels.
    (CE, (XF,), {}, r"fit got inputs x without labels y: .* pass y="),
    # validation_data, found before the first epoch instead of after it.
    (CE, (XF, YF), dict(validation_data=(XF[:, :5], YF)), r"validation_data has examples of "
     r"shape \(5,\), but the teacher 'mlp' takes \(6,\): validation examples must be shaped "
     r"like the training examples"),
    (CE, (XF, YF), dict(validation_data=(XF, YF[:3])), r"validation_data has 8 inputs \(x\) "
     r"but 3 labels \(y\): pass one label per input"),
    (CE, (XF, YF), dict(validation_data=(XF, _with(YF, 0, 3))),
     r"validation_data holds the label 3"),
    (CE, (XF, YF), dict(validation_data=_ds(XF[:, :4], YF)), r"validation_data has examples of "
     r"shape \(4,\)"),
    (CE, (XF, YF), dict(validation_data=_ds(XF)), r"validation_data is a tf.data dataset that "
     r"yields inputs only"),
])
def test_fit_refuses_bad_data_before_the_first_step(loss, data, kwargs, text):
    model = dkdp.DKDPModel(mlp())
    model.compile(optimizer="adam", loss=loss)
    with pytest.raises(ValueError, match=text):
        model.fit(*data, batch_size=4, epochs=1, verbose=0, **kwargs)
    assert int(model.optimizer.iterations.numpy()) == 0


def test_good_data_passes_the_checks_and_generators_are_not_read():
    from dkdp_keras import _data_checks

    model = dkdp.DKDPModel(mlp())
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=-1))
    # -1 is the ignored class; (n, 1) labels are class indices, not one-hot.
    model.fit(XF, _with(YF, 0, -1)[:, None], validation_data=_ds(XF, YF), epochs=1, verbose=0)

    read = []

    def batches():
        read.append(1)
        yield XF, _with(YF, 0, 7)

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            read.append(i)
            return XF, _with(YF, 0, 7)

    generator = batches()
    _data_checks.check_fit(model, (generator,), dict(validation_data=Batches()))
    assert read == []
    one_hot = dkdp.DKDPModel(mlp())
    one_hot.compile(optimizer="adam", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    one_hot.fit(XF, np.eye(3)[YF], validation_data=(XF, np.eye(3)[YF]), epochs=1, verbose=0)
