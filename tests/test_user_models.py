"""Models users ship that nobody in this project wrote (issue 22, items 3,
4, 9 and 10): each failure is said, before training, with what works, and
what is offered as working does work."""

import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
from dkdp_keras import thresholds

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
L = keras.layers


def compiled_dkdp(model):
    model.compile(teacher_optimizer=keras.optimizers.Adam(1e-2),
                  student_optimizer=keras.optimizers.Adam(1e-2), loss=CE)
    return model


def plain_student(input_shape, classes):
    def make(teacher):
        return keras.Sequential([keras.Input(input_shape), L.Flatten(), L.Dense(classes)])
    return make


# --- 3. student="auto" on a model it cannot narrow ------------------------
def test_the_auto_student_of_mobilenet_is_refused_at_construction_with_what_avoids_it():
    teacher = dkdp.prunable(keras.applications.MobileNet(
        weights=None, input_shape=(32, 32, 3), classes=10, alpha=0.25))
    with pytest.raises(ValueError) as raised:
        dkdp.DKDPModel(teacher, student="auto")
    said = str(raised.value)
    assert "student='auto' could not build a narrower copy of teacher" in said
    # Keras' cloning error names the Reshape class only; this names the layer.
    assert "layer 'reshape_2' (Reshape)" in said
    assert "target_shape=(10,)" in said  # Keras' reason, ANSI codes removed
    assert "\x1b" not in said
    assert "student= a Keras model" in said and "callable teacher -> student" in said
    # ... and student= does avoid it.
    model = dkdp.DKDPModel(teacher, student=plain_student((32, 32, 3), 10))
    assert model.student.output_shape == (None, 10)


def test_an_add_of_branches_narrowed_differently_names_the_add():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same")(inputs)
    a = L.SeparableConv2D(8, 3, padding="same")(x)  # not narrowed
    b = L.Conv2D(8, 1, name="shortcut")(x)  # narrowed to 2
    x = L.Add(name="merge")([a, b])
    outputs = L.Dense(3)(L.GlobalAveragePooling2D()(x))
    teacher = keras.Model(inputs, outputs)
    with pytest.raises(ValueError, match=r"could not build a narrower copy.*"
                       r"layer 'merge' \(Add\) cannot take its narrowed input.*"
                       r"\(8, 8, 8\) and \(8, 8, 2\).*Pass student="):
        dkdp.DKDPModel(teacher)


# --- 4. a frozen base under a gradient criterion ---------------------------
def frozen_base_model():
    base = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(8, 3, name="c1"),
                             L.Conv2D(8, 3, name="c2")], name="base")
    base.trainable = False
    return keras.Sequential([keras.Input((8, 8, 3)), base, L.GlobalAveragePooling2D(),
                             L.Dense(16, activation="relu", name="hidden"),
                             L.Dense(4, name="head")], name="transfer")


def image_data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 8, 8, 3)).astype("float32"), rng.integers(0, 4, n)


def test_a_frozen_base_under_taylor_names_trainable_false_and_what_works():
    x, y = image_data()
    model = compiled_dkdp(dkdp.DKDPModel(frozen_base_model(),
                                         student=plain_student((8, 8, 3), 4)))
    cb = dkdp.DKDPCallback(importance=dkdp.importance.Taylor(), granularity="unit",
                           threshold=thresholds.ConstantSparsity(0.5), verbose=0)
    with pytest.raises(ValueError) as raised:
        model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])
    said = str(raised.value)
    assert "layers 'c1', 'c2' of model 'transfer' are frozen (trainable=False)" in said
    assert "in frozen model 'base'" in said
    assert "only a DKDPModel collects" not in said  # they are using one
    assert "Unfreeze them (layer.trainable = True" in said
    assert ("dkdp_keras.prunable(teacher, layers=lambda layer: layer.trainable, "
            "track_statistics=True)") in said
    assert "importance='magnitude'" in said
    assert int(model.optimizer.iterations.numpy()) == 0


def test_what_the_frozen_message_offers_works_and_leaves_the_base_as_it_was():
    x, y = image_data()
    original = frozen_base_model()
    base_weights = original.layers[0].get_weights()
    teacher = dkdp.prunable(original, layers=lambda layer: layer.trainable,
                            track_statistics=True)
    assert [l.name for l in dkdp.masked_layers(teacher)] == ["hidden", "head"]
    model = compiled_dkdp(dkdp.DKDPModel(teacher, student=plain_student((8, 8, 3), 4)))
    cb = dkdp.DKDPCallback(importance=dkdp.importance.Taylor(), granularity="weight",
                           threshold=thresholds.ConstantSparsity(0.5), verbose=0)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[cb])
    assert cb.events == 2
    assert cb.history[-1]["sparsity"] == pytest.approx(0.5, abs=0.02)
    for before, after in zip(base_weights, model.teacher.layers[0].get_weights()):
        np.testing.assert_array_equal(before, after)
