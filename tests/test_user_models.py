"""Models users ship that nobody in this project wrote (issue 22, items 3,
4, 9 and 10): each failure is said, before training, with what works, and
what is offered as working does work."""

import keras
import pytest

import dkdp_keras as dkdp

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
