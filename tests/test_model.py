"""DKDPModel: gradient routing, the combined loss, logging, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import dkdp_keras as dkdp

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def mlp(hidden=16, classes=4, inputs=6, name="mlp"):
    return keras.Sequential([
        keras.Input((inputs,)),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(classes),
    ], name=name)


def data(n=64, inputs=6, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, inputs)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + 2 * (x[:, 1] > 0).astype("int64")
    return x, y % classes


def make(seed=0, lr=0.1, **kwargs):
    keras.utils.set_random_seed(seed)
    model = dkdp.DKDPModel(mlp(), **kwargs)
    model.compile(
        teacher_optimizer=keras.optimizers.SGD(lr),
        student_optimizer=keras.optimizers.SGD(lr),
        loss=CE, metrics=["accuracy"],
    )
    return model


def weights(model):
    return [w.numpy().copy() for w in model.trainable_weights]


def one_step(model, x, y):
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)


def test_kd_term_moves_the_student_only():
    x, y = data()
    a = make(lambda_kd=0.0, student_hard_loss_weight=0.0)
    b = make(lambda_kd=5.0, student_hard_loss_weight=0.0)
    assert all(np.array_equal(p, q) for p, q in zip(weights(a.teacher), weights(b.teacher)))
    s0 = weights(a.student)
    one_step(a, x, y)
    one_step(b, x, y)
    for p, q in zip(weights(a.teacher), weights(b.teacher)):
        np.testing.assert_array_equal(p, q)  # λ does not reach the teacher
    assert all(np.array_equal(p, q) for p, q in zip(s0, weights(a.student)))  # λ=0: still
    assert not all(np.array_equal(p, q) for p, q in zip(s0, weights(b.student)))


def test_teacher_loss_never_moves_the_student():
    x, y = data()
    # (The student's own label loss is off: the labels differ on purpose.)
    a = make(lambda_kd=1.0, student_hard_loss_weight=0.0)
    b = make(lambda_kd=1.0, student_hard_loss_weight=0.0)
    one_step(a, x, y)
    one_step(b, x, (y + 1) % 4)  # other labels: other teacher update
    assert not np.array_equal(weights(a.teacher)[0], weights(b.teacher)[0])
    for p, q in zip(weights(a.student), weights(b.student)):
        np.testing.assert_array_equal(p, q)


def test_mutual_lets_the_kd_term_train_the_teacher():
    x, y = data()
    a, b = make(lambda_kd=0.0, mutual=True), make(lambda_kd=5.0, mutual=True)
    one_step(a, x, y)
    one_step(b, x, y)
    assert not np.array_equal(weights(a.teacher)[0], weights(b.teacher)[0])


def test_student_hard_loss_weight_trains_student_on_labels():
    x, y = data()
    a = make(lambda_kd=0.0, student_hard_loss_weight=0.0)
    b = make(lambda_kd=0.0)  # the default weight, 1.0
    s0 = weights(a.student)
    one_step(a, x, y)
    one_step(b, x, y)
    assert all(np.array_equal(p, q) for p, q in zip(s0, weights(a.student)))
    assert not np.array_equal(s0[0], weights(b.student)[0])


def test_the_student_trains_on_the_head_of_each_batch():
    x, y = data(64)
    # The second half's labels are what the untrained student predicts, so
    # that its accuracy there differs from the first half's.
    y[32:] = make().student(x[32:]).numpy().argmax(1)
    # 0.5 of a 64-example batch: the student's step is that of a plain
    # fraction-1 step on the first 32 examples, while the teacher's is that
    # of the whole batch.
    half = make(lambda_kd=0.7, student_batch_fraction=0.5)
    head = make(lambda_kd=0.7, student_batch_fraction=1.0)
    whole = make(lambda_kd=0.7, student_batch_fraction=1.0)
    one_step(half, x, y)
    one_step(head, x[:32], y[:32])
    one_step(whole, x, y)
    for p, q in zip(weights(half.student), weights(head.student)):
        np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-7)
    assert not np.allclose(weights(half.student)[0], weights(whole.student)[0])
    for p, q in zip(weights(half.teacher), weights(whole.teacher)):
        np.testing.assert_array_equal(p, q)
    # The logged student accuracy reads the student's own examples.
    s0 = make(lambda_kd=0.7).student(x[:32]).numpy()
    logged = half.history.history["student_accuracy"][0]
    assert logged == pytest.approx(np.mean(s0.argmax(1) == y[:32]))
    assert logged < 0.5
    # At least one example, however small the batch; evaluation reads all.
    tiny = make(student_batch_fraction=0.1)
    tiny.fit(x[:3], y[:3], batch_size=1, epochs=1, verbose=0)
    assert tiny.get_config()["student_batch_fraction"] == 0.1
    full = tiny.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    s = tiny.student(x).numpy()
    assert full["student_accuracy"] == pytest.approx(np.mean(s.argmax(1) == y))


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_logged_losses_equal_a_hand_computation():
    x, y = data(32)
    model = make(lambda_kd=0.7, temperature=3.0)
    logs = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    t = model.teacher(x).numpy()
    s = model.student(x).numpy()
    ce_t = -np.mean(np.log(_softmax(t)[np.arange(32), y]))
    ce_s = -np.mean(np.log(_softmax(s)[np.arange(32), y]))
    p, q = _softmax(t / 3.0), _softmax(s / 3.0)
    kl = 9.0 * np.mean(np.sum(p * np.log(p / q), axis=1))
    assert logs["teacher_loss"] == pytest.approx(ce_t, rel=1e-5)
    assert logs["student_loss"] == pytest.approx(ce_s, rel=1e-5)
    assert logs["kd_loss"] == pytest.approx(kl, rel=1e-4)
    assert logs["loss"] == pytest.approx(ce_t + 0.7 * kl, rel=1e-5)
    acc_t = np.mean(t.argmax(1) == y)
    assert logs["teacher_accuracy"] == pytest.approx(acc_t)
    assert logs["student_accuracy"] == pytest.approx(np.mean(s.argmax(1) == y))


def test_kl_equals_keras_logits_distillation():
    x, _ = data(32)
    model = make(temperature=4.0)
    t, s = model.teacher(x), model.student(x)
    ours = float(dkdp.distillation.kd_value(model._kd, t, s))
    keras_kd = keras.distillation.LogitsDistillation(
        temperature=4.0, loss=keras.losses.KLDivergence()
    )
    assert ours == pytest.approx(float(keras_kd.compute_loss(t, s)), rel=1e-6)
    mse = make(kd_loss="mse")
    value = float(dkdp.distillation.kd_value(mse._kd, t, s))
    assert value == pytest.approx(float(np.mean((t.numpy() - s.numpy()) ** 2)), rel=1e-5)


def test_feature_distillation_reads_named_layers():
    x, y = data()
    teacher = mlp()
    teacher.layers[0].name = "t_hidden"
    student = keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(16, activation="relu", name="s_hidden"),
        keras.layers.Dense(4)], name="student")
    kd = keras.distillation.FeatureDistillation(
        loss="mse", teacher_layer_name="t_hidden", student_layer_name="s_hidden")
    model = dkdp.DKDPModel(teacher, student=student, kd_loss=kd)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=CE)
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    feat_t = keras.Model(model.teacher.inputs[0], model.teacher.get_layer("t_hidden").output)(x)
    feat_s = keras.Model(student.inputs[0], student.get_layer("s_hidden").output)(x)
    assert logs["kd_loss"] == pytest.approx(float(np.mean((feat_t - feat_s) ** 2)), rel=1e-4)
    with pytest.raises(ValueError, match="does not have"):
        dkdp.DKDPModel(mlp(), student=mlp(name="s"), kd_loss=kd)


@pytest.mark.parametrize("lambda_kd, hard", [(0.0, 0.0), (2.0, 1.0)])
def test_the_teacher_trains_exactly_like_plain_fit(lambda_kd, hard):
    # Without `mutual`, one backward pass of L + λ·L_KD (+ the student's
    # hard loss) gives the teacher the gradient of L alone.
    x, y = data(128)
    keras.utils.set_random_seed(1)
    base = mlp()
    plain = dkdp.prunable(base, track_statistics=True)
    model = dkdp.DKDPModel(base, lambda_kd=lambda_kd,
                           student_hard_loss_weight=hard)
    for p, q in zip(plain.weights, model.teacher.weights):
        q.assign(p)
    plain.compile(optimizer=keras.optimizers.Adam(1e-2), loss=CE)
    model.compile(teacher_optimizer=keras.optimizers.Adam(1e-2),
                  student_optimizer=keras.optimizers.Adam(1e-2), loss=CE)
    plain.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    for p, q in zip(plain.trainable_weights, model.teacher.trainable_weights):
        np.testing.assert_allclose(p.numpy(), q.numpy(), rtol=0, atol=1e-6)


def test_masks_hold_through_training(rng):
    x, y = data()
    model = make(lr=0.5)
    masks = {}
    for layer in dkdp.masked_layers(model.teacher):
        masks[layer.name] = (rng.random(layer.kernel.shape) > 0.5).astype("float32")
        layer.kernel_mask.assign(masks[layer.name])
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    stripped = dkdp.strip(model.teacher)
    kernels = [l for l in stripped.layers if hasattr(l, "kernel")]
    for layer, plain in zip(dkdp.masked_layers(model.teacher), kernels):
        np.testing.assert_array_equal(layer.kernel_mask.numpy(), masks[layer.name])
        assert np.all(plain.kernel.numpy()[masks[layer.name] == 0] == 0.0)
    np.testing.assert_allclose(stripped(x).numpy(), model.teacher(x).numpy(), atol=1e-5)


def test_training_step_collects_importance_statistics():
    x, y = data(64)
    model = make()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    for layer in dkdp.masked_layers(model.teacher):
        assert float(layer.gradient_steps.numpy()) == 4
        assert float(layer.activation_steps.numpy()) == 4
        taylor = dkdp.importance.Taylor().score(layer, "unit").numpy()
        assert taylor.shape == (layer.num_units,) and taylor.max() > 0


def test_inputs_tf_data_sample_weights_and_one_hot():
    x, y = data(64)
    model = make()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    assert "teacher_accuracy" in model.fit(ds, epochs=1, verbose=0).history
    w = np.zeros(64, "float32")
    w[:32] = 1.0
    weighted = model.evaluate(x, y, sample_weight=w, verbose=0, return_dict=True)
    first = model.evaluate(x[:32], y[:32], verbose=0, return_dict=True)
    assert weighted["teacher_loss"] == pytest.approx(first["teacher_loss"] / 2, rel=1e-4)
    assert weighted["teacher_accuracy"] == pytest.approx(first["teacher_accuracy"], rel=1e-6)
    onehot = make()
    onehot.compile(optimizer="sgd", loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                   metrics=["accuracy"])
    logs = onehot.evaluate(x, keras.utils.to_categorical(y, 4), verbose=0, return_dict=True)
    sparse = make().evaluate(x, y, verbose=0, return_dict=True)
    assert logs["teacher_accuracy"] == pytest.approx(sparse["teacher_accuracy"])


def test_predict_serves_the_student_unless_asked():
    x, _ = data(8)
    model = make()
    np.testing.assert_allclose(model.predict(x, verbose=0), model.student(x), atol=1e-6)
    teacher_view = dkdp.DKDPModel(model.teacher, student=model.student, serve="teacher")
    np.testing.assert_allclose(teacher_view.predict(x, verbose=0), model.teacher(x), atol=1e-6)


def test_auto_student_is_quarter_width_except_the_output():
    model = dkdp.DKDPModel(dkdp.zoo.reference_cnn())
    assert dkdp.count_params(model.student, nonzero=False) == 52_210
    assert model.student.output.shape[-1] == 10
    # A plain Keras model: nothing prunes it, so it carries no masks.
    assert dkdp.masked_layers(model.student) == []
    assert model.student.count_params() == 52_210
    half = dkdp.DKDPModel(dkdp.zoo.reference_cnn(), student_width=0.5)
    assert dkdp.count_params(half.student, nonzero=False) == 207_066


@pytest.mark.parametrize(
    "kwargs,error,text",
    [
        (dict(lambda_kd=-1.0), ValueError, r"lambda_kd must be in \[0.0, inf\]"),
        (dict(lambda_kd=float("nan")), ValueError, "lambda_kd must be a finite number"),
        (dict(temperature=0.0), ValueError, r"temperature must be in \(0.0, inf\]"),
        (dict(temperature="4"), TypeError, "temperature must be a number"),
        (dict(kd_loss="cosine"), ValueError, "kd_loss must be one of"),
        (dict(mutual="yes"), TypeError, "mutual must be True or False"),
        (dict(student_width=1.5), ValueError, "student_width must be in"),
        (dict(student_batch_fraction=0.0), ValueError,
         r"student_batch_fraction must be in \(0.0, 1.0\]"),
        (dict(student="small"), ValueError, "student must be 'auto'"),
        (dict(student=3), TypeError, "student must be 'auto'"),
        (dict(student=lambda t: "x"), TypeError, "must return a keras.Model"),
        (dict(serve="both"), ValueError, "serve must be one of"),
    ],
)
def test_bad_arguments(kwargs, error, text):
    with pytest.raises(error, match=text):
        dkdp.DKDPModel(mlp(), **kwargs)


def test_student_must_match_the_teacher():
    with pytest.raises(ValueError, match=r"student outputs shape \[\(3,\)\] but the teacher outputs \[\(4,\)\]"):
        dkdp.DKDPModel(mlp(), student=mlp(classes=3, name="s"))
    with pytest.raises(ValueError, match=r"student takes inputs of shape \[\(5,\)\]"):
        dkdp.DKDPModel(mlp(), student=mlp(inputs=5, name="s"))
    inputs = keras.Input((6,))
    two = keras.Model(inputs, [keras.layers.Dense(2)(inputs), keras.layers.Dense(3)(inputs)])
    with pytest.raises(ValueError, match="has 2 outputs"):
        dkdp.DKDPModel(two)
    no_kernel = keras.Sequential([keras.Input((4,)), keras.layers.ReLU()])
    with pytest.raises(ValueError, match="no prunable layer"):
        dkdp.DKDPModel(no_kernel)
    with pytest.raises(TypeError, match="teacher must be a keras.Model"):
        dkdp.DKDPModel("teacher.keras")


def test_compile_arguments():
    model = dkdp.DKDPModel(mlp())
    opt = keras.optimizers.Adam(1e-3)
    model.compile(optimizer=opt, loss=CE)
    assert model.teacher_optimizer is opt and model.student_optimizer is not opt
    assert model.student_optimizer.get_config()["learning_rate"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="not both"):
        model.compile(optimizer="adam", teacher_optimizer="sgd", loss=CE)
    with pytest.raises(ValueError, match="needs loss="):
        model.compile(optimizer="adam")
    with pytest.raises(ValueError, match="does not take loss_weights"):
        model.compile(optimizer="adam", loss=CE, loss_weights=[1.0])


def test_loss_given_by_name_or_function():
    x, y = data()
    for loss in ("sparse_categorical_crossentropy",
                 keras.losses.sparse_categorical_crossentropy):
        keras.utils.set_random_seed(0)
        teacher = keras.Sequential([keras.Input((6,)),
                                    keras.layers.Dense(4, activation="softmax")])
        model = dkdp.DKDPModel(teacher)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
        expected = float(keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(y, model.teacher(x))))
        # One step on the whole batch: the logged loss is the one before it.
        logs = model.fit(x, y, batch_size=64, epochs=1, verbose=0).history
        assert logs["teacher_loss"][0] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="Unknown loss"):
        dkdp.DKDPModel(mlp()).compile(optimizer="sgd", loss="no_such_loss")


def test_refresh_student():
    x, y = data()
    model = make()
    old = model.student
    model.refresh_student("width")
    assert model.student is not old
    assert [l.name for l in model.layers] == [model.teacher.name, model.student.name]
    model.fit(x, y, epochs=1, verbose=0)
    model.refresh_student(lambda teacher: mlp(hidden=3, name="tiny"))
    assert model.student.name == "tiny"
    assert model.student_optimizer.built
    model.fit(x, y, epochs=1, verbose=0)
    for layer in dkdp.masked_layers(model.teacher)[:-1]:
        mask = np.ones(layer.kernel.shape, "float32")
        mask[..., : layer.num_units // 2] = 0.0  # half the units removed
        layer.kernel_mask.assign(mask)
    model.refresh_student("compact_teacher")
    assert dkdp.masked_layers(model.student) == []
    assert model.student.layers[0].units == 8  # 16 hidden units, half removed
    np.testing.assert_allclose(model.student(x), model.teacher(x), atol=1e-5)
    np.testing.assert_allclose(model.compact_teacher()(x), model.teacher(x), atol=1e-5)
    model.fit(x, y, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="strategy must be one of"):
        model.refresh_student("deeper")


def test_save_load_and_resume(tmp_path):
    x, y = data(96)
    straight = make(lr=0.05)
    straight.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    first = make(lr=0.05)
    first.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    path = tmp_path / "dkdp.keras"
    first.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, dkdp.DKDPModel)
    assert (loaded.lambda_kd, loaded.temperature) == (first.lambda_kd, first.temperature)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), first.predict(x, verbose=0), atol=1e-6)
    assert int(loaded.student_optimizer.iterations.numpy()) == 3
    loaded.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    for p, q in zip(straight.trainable_weights, loaded.trainable_weights):
        np.testing.assert_allclose(p.numpy(), q.numpy(), atol=1e-6)
    for p, q in zip(dkdp.masked_layers(straight.teacher), dkdp.masked_layers(loaded.teacher)):
        np.testing.assert_allclose(p.gradient_abs.numpy(), q.gradient_abs.numpy(), atol=1e-6)
