"""The continual mode (`DKDPModel.next_task`, `dkdp_keras.continual`)."""

import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
from dkdp_keras import continual

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_old_class_distillation_is_the_softened_kl_on_the_old_classes_only():
    rng = np.random.default_rng(0)
    p, z = rng.normal(size=(6, 10)), rng.normal(size=(6, 10))
    old, t = np.array([0, 2, 3], "int32"), 2.0
    a, b = softmax(p[:, old] / t), softmax(z[:, old] / t)
    expected = t ** 2 * np.mean(np.sum(a * np.log(a / b), axis=-1))
    got = float(continual.old_class_distillation(p, z, old, t))
    assert got == pytest.approx(expected, rel=1e-5)
    # The new classes' logits do not enter it; equal old logits give 0.
    z2 = z.copy()
    z2[:, [1, 4, 9]] += 50.0
    assert float(continual.old_class_distillation(p, z2, old, t)) == pytest.approx(got, rel=1e-5)
    assert float(continual.old_class_distillation(p, p + 0.0, old, t)) == pytest.approx(0, abs=1e-6)


def test_the_replay_buffer_is_class_balanced_and_seeded():
    rng = np.random.default_rng(1)
    y = rng.choice(5, size=400, p=[0.5, 0.2, 0.1, 0.1, 0.1])
    x = np.arange(400, dtype="float32")[:, None] + 0.5
    buffer = continual.ReplayBuffer.select(x, y, 52, seed=3)
    assert len(buffer) == 52
    assert np.bincount(buffer.y).tolist() == [11, 11, 10, 10, 10]
    assert buffer.classes == [0, 1, 2, 3, 4]
    # Each example is one of the data's, with its own label, once.
    index = (buffer.x[:, 0] - 0.5).astype(int)
    assert len(set(index)) == 52 and np.array_equal(y[index], buffer.y)
    again = continual.ReplayBuffer.select(x, y, 52, seed=3)
    assert np.array_equal(again.x, buffer.x)
    other = continual.ReplayBuffer.select(x, y, 52, seed=4)
    assert not np.array_equal(other.x, buffer.x)
    # One-hot labels are read as their classes.
    onehot = continual.ReplayBuffer.select(x, np.eye(5)[y], 52, seed=3)
    assert np.array_equal(onehot.x, buffer.x)
    # mix: the buffer and the new data, every example once an epoch.
    xb = np.full((30, 1), -1.0, "float32")
    mixed = buffer.mix(xb, np.full(30, 7), batch_size=16, seed=0)
    steps = buffer.steps(xb, 16)
    seen = np.concatenate([bx.numpy()[:, 0] for bx, _ in mixed.take(steps)])
    assert steps == 6 and len(seen) == 82
    assert np.sum(seen == -1) == 30 and set(seen[seen > 0]) == set(buffer.x[:, 0])


def test_aligning_scales_the_new_classes_to_the_old_mean_norm():
    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6)])
    kernel = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    kernel[:, 3:] *= 3.0
    kernel[1, 4] = 0.0
    net.layers[0].kernel.assign(kernel)
    gain = continual.align_classes(net, np.arange(3), np.arange(3, 6))
    after = net.layers[0].kernel.numpy()
    norms = np.linalg.norm(after, axis=0)
    assert norms[3:].mean() == pytest.approx(norms[:3].mean(), rel=1e-5)
    assert gain == pytest.approx(np.linalg.norm(kernel[:, :3], axis=0).mean()
                                 / np.linalg.norm(kernel[:, 3:], axis=0).mean(), rel=1e-5)
    np.testing.assert_array_equal(after[:, :3], kernel[:, :3])
    assert after[1, 4] == 0.0
    assert continual.align_classes(net, np.arange(3), np.arange(3, 6)) == pytest.approx(1.0)


def small_model(seed=0):
    keras.utils.set_random_seed(seed)
    model = dkdp.DKDPModel(dkdp.zoo.lenet_300_100(input_shape=(8, 8, 1), width=0.2))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS, metrics=["accuracy"])
    return model


def test_next_task_refuses_what_it_cannot_do():
    model = small_model()
    x = np.zeros((20, 8, 8, 1), "float32")
    with pytest.raises(ValueError, match=r"class labels in 0\.\.9"):
        model.next_task(x, np.full(20, 12), buffer_size=5)
    with pytest.raises(ValueError, match="every one of the 10 classes is old"):
        model.next_task(x, np.arange(20) % 10, buffer_size=5)
    with pytest.raises(ValueError, match="lambda_old"):
        model.next_task(x, np.arange(20) % 5, buffer_size=5, lambda_old=-1.0)
    with pytest.raises(TypeError, match="align"):
        model.next_task(x, np.arange(20) % 5, buffer_size=5, align="yes")
    assert model.previous is None and model.continual is None
    # A later task adds its classes to the old ones and replaces the copy;
    # its buffer is drawn from the task's data and the buffer before.
    first = model.next_task(x, np.arange(20) % 5, buffer_size=10)
    copy = model.previous
    second = model.next_task(x + 1.0, 5 + np.arange(20) % 3, buffer_size=16, replay=first)
    assert model.continual["old_classes"] == list(range(8))
    assert model.previous is not copy and copy not in model.layers
    assert np.bincount(second.y).tolist() == [2] * 8 and np.sum(second.x[:, 0, 0, 0] == 0) == 10


def test_next_task_freezes_the_teacher_and_the_mode_survives_a_keras_file(tmp_path):
    rng = np.random.default_rng(0)
    xa = rng.random((64, 8, 8, 1)).astype("float32")
    ya = np.arange(64) % 5
    model = small_model()
    model.fit(xa, ya, epochs=1, batch_size=16, verbose=0)
    masked_before = model.teacher
    replay = model.next_task(xa, ya, buffer_size=10, lambda_old=2.0, temperature=3.0)
    assert model.continual == {"old_classes": [0, 1, 2, 3, 4], "lambda_old": 2.0,
                               "temperature": 3.0, "align": True}
    assert len(replay) == 10 and not model.previous.trainable
    # The teacher the next task trains is the compacted one, prunable again.
    masked = dkdp.masked_layers(model.teacher)
    assert masked and all(float(np.min(layer.kernel_mask.numpy())) == 1.0 for layer in masked)
    assert model.teacher is not masked_before and masked_before not in model.layers
    assert (dkdp.count_params(dkdp.compact(model.teacher), nonzero=False)
            == model.previous.count_params())
    before = model.teacher.predict(xa, verbose=0)
    np.testing.assert_allclose(model.previous.predict(xa, verbose=0), before, atol=1e-5)
    xb = rng.random((64, 8, 8, 1)).astype("float32") + 0.5
    yb = 5 + np.arange(64) % 5
    history = model.fit(replay.mix(xb, yb, 16), steps_per_epoch=replay.steps(xb, 16),
                        epochs=1, verbose=0)
    assert history.history["old_kd_loss"][0] > 0
    # The previous model did not train; the teacher did.
    np.testing.assert_allclose(model.previous.predict(xa, verbose=0), before, atol=1e-5)
    assert not np.allclose(model.teacher.predict(xa, verbose=0), before, atol=1e-3)
    path = tmp_path / "continual.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.continual == model.continual
    for a, b in ((loaded.previous, model.previous), (loaded.teacher, model.teacher),
                 (loaded.student, model.student)):
        np.testing.assert_allclose(a.predict(xb, verbose=0), b.predict(xb, verbose=0),
                                   atol=1e-5)

