"""Models users ship that nobody in this project wrote (issue 22, items 3,
4, 9 and 10): each failure is said, before training, with what works, and
what is offered as working does work."""

import re
import warnings

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


def shortfall_warnings(caught):
    return [str(w.message) for w in caught
            if str(w.message).startswith("DKDPCallback: the pruning event")]


# --- 3. student="auto" on a model it cannot narrow ------------------------
@pytest.mark.parametrize("build", [
    lambda: keras.applications.MobileNet(weights=None, input_shape=(32, 32, 3),
                                         classes=10, alpha=0.25),
    lambda: keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3),
                                              classes=10),
], ids=["MobileNet", "EfficientNetB0"])
def test_the_auto_student_of_a_model_with_reshapes_is_built_through_its_groups(build):
    # Issue 22 item 3: Keras' cloning failed on the Reshape targets (MobileNet
    # v1's head, EfficientNet's squeeze-and-excite); the copy now rewrites them.
    teacher = dkdp.prunable(build())
    model = dkdp.DKDPModel(teacher, student="auto")
    student = model.student
    assert student.output_shape == teacher.output_shape == (None, 10)
    assert student.count_params() < 0.2 * dkdp.count_params(teacher, nonzero=False)
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype("float32")
    assert student(x).shape == (2, 10)


def test_an_add_with_a_branch_it_cannot_narrow_keeps_the_other_as_wide():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same")(inputs)
    a = L.SeparableConv2D(8, 3, padding="same")(x)  # not narrowed
    b = L.Conv2D(8, 1, name="shortcut")(x)  # was narrowed to 2: the Add failed
    x = L.Add(name="merge")([a, b])
    outputs = L.Dense(3)(L.GlobalAveragePooling2D()(x))
    student = dkdp.DKDPModel(keras.Model(inputs, outputs)).student
    assert student.get_layer("shortcut").filters == 8
    assert student.layers[1].filters == 8  # read by the SeparableConv2D


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


def test_a_teacher_made_prunable_without_statistics_is_refused_before_training():
    # prunable(model) by hand, then DKDPModel: the teacher keeps its masked
    # layers, which collect no gradients; the refusal must not tell a
    # DKDPModel user to use a DKDPModel, and must come before training.
    x, y = image_data()
    teacher = dkdp.prunable(keras.Sequential([
        keras.Input((8, 8, 3)), L.Conv2D(8, 3, name="c1"), L.GlobalAveragePooling2D(),
        L.Dense(4, name="head")]))
    model = compiled_dkdp(dkdp.DKDPModel(teacher, student=plain_student((8, 8, 3), 4)))
    cb = dkdp.DKDPCallback(importance="taylor", verbose=0,
                           threshold=thresholds.ConstantSparsity(0.5))
    with pytest.raises(ValueError, match=r"layers 'c1', 'head' of model .* were made "
                       r"prunable without track_statistics=True.*DKDPModel keeps a "
                       r"teacher's masked layers as they are: pass it the original"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])
    assert int(model.optimizer.iterations.numpy()) == 0


# --- 9. subclassed models with masked layers inside -----------------------
class SubNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.d1 = dkdp.MaskedDense(32, activation="relu")
        self.d2 = dkdp.MaskedDense(32, activation="relu")
        self.out = dkdp.MaskedDense(3)

    def call(self, x):
        return self.out(self.d2(self.d1(x)))


def six_feature_data(n=64, seed=0):
    x = np.random.default_rng(seed).random((n, 6)).astype("float32")
    return x, np.clip((x[:, 0] * 3).astype("int64"), 0, 2)


def built_subnet(x):
    model = SubNet()
    model(x[:1])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=CE)
    return model


def test_a_subclassed_model_with_masked_layers_is_weight_pruned_by_a_schedule():
    x, y = six_feature_data()
    model = built_subnet(x)
    cb = dkdp.DKDPCallback(granularity="weight", frequency=4, verbose=0,
                           threshold=thresholds.ConstantSparsity(0.5))
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[cb])
    assert cb.events == 2
    assert dkdp.sparsity(model) == pytest.approx(0.5, abs=0.01)
    # Each layer's mask decides what it computes.
    layer = model.d1
    mask = keras.ops.convert_to_numpy(layer.kernel_mask)
    kernel = keras.ops.convert_to_numpy(layer.kernel) * mask
    bias = keras.ops.convert_to_numpy(layer.bias)
    expected = np.maximum(x @ kernel + bias, 0.0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected, atol=1e-5)
    # kept_params: the non-zero parameters (no graph to compact by; no MACs).
    nonzero = sum(int(np.count_nonzero(w)) for l in (model.d1, model.d2, model.out)
                  for w in l.stripped_weights())
    assert history.history["kept_params"][-1] == nonzero
    kernels = sum(int(np.prod(l.kernel.shape)) for l in (model.d1, model.d2, model.out))
    biases = sum(int(np.prod(l.bias.shape)) for l in (model.d1, model.d2, model.out))
    assert nonzero <= round(0.51 * kernels) + biases
    assert "kept_macs" not in history.history


def test_what_a_subclassed_model_cannot_do_is_refused_before_training():
    x, y = six_feature_data()
    model = built_subnet(x)
    for cb, text in [
        (dkdp.DKDPCallback(granularity="unit", verbose=0,
                           threshold=thresholds.ConstantSparsity(0.5)),
         r"subclassed keras.Model \(SubNet\).*unit pruning.*Weight pruning works: "
         r"DKDPCallback\(granularity='weight'"),
        (dkdp.DKDPCallback(verbose=0, threshold=thresholds.Adaptive(
            dkdp.Budget(max_params=500))),
         r"subclassed keras.Model \(SubNet\).*Adaptive's budget.*Weight pruning works"),
    ]:
        with pytest.raises(ValueError, match=text):
            model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])
        assert int(model.optimizer.iterations.numpy()) == 0
    unbuilt = SubNet()
    unbuilt.compile(optimizer="adam", loss=CE)
    with pytest.raises(ValueError, match=r"are not built.*model\(x\[:1\]\)"):
        unbuilt.fit(x, y, epochs=1, verbose=0, callbacks=[dkdp.DKDPCallback(
            verbose=0, threshold=thresholds.ConstantSparsity(0.5))])


def test_dkdpmodel_refuses_a_subclassed_teacher_suggesting_only_what_works():
    x, _ = six_feature_data()
    with pytest.raises(TypeError) as raised:
        dkdp.DKDPModel(built_subnet(x))
    said = str(raised.value)
    assert "subclassed keras.Model (SubNet)" in said
    assert "DKDPCallback(granularity='weight'" in said and "ConstantSparsity" in said


# --- 10. a target few layers can reach -------------------------------------
def fit_with_unit_schedule(model, x, y, target=0.5, epochs=1):
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=CE)
    cb = dkdp.DKDPCallback(granularity="unit", frequency=2, verbose=0,
                           threshold=thresholds.ConstantSparsity(target))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=epochs, batch_size=8, verbose=0, callbacks=[cb])
    return cb, shortfall_warnings(caught)


def test_a_bidirectional_gru_model_says_once_per_fit_why_it_reaches_no_sparsity():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 50, (32, 10)).astype("int32"), rng.integers(0, 4, 32)
    model = keras.Sequential([keras.Input((10,), dtype="int32"), L.Embedding(50, 8),
                              L.Bidirectional(L.GRU(16)), L.Dense(4, name="head")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prunable names what it leaves out
        model = dkdp.prunable(model)
    for _ in range(2):  # once per fit, each fit
        cb, said = fit_with_unit_schedule(model, x, y)
        assert cb.events == 2 and cb.history[-1]["sparsity"] == 0.0
        assert len(said) == 1
        assert "asked for sparsity 0.50 and reached 0.00" in said[0]
        assert "no event of this fit can reach more than 0.00" in said[0]
        assert "Protected: 'head'" in said[0] and "100% of the masked kernels" in said[0]
        assert re.search(r"Not prunable: Bidirectional \(1 layer, [\d,]+ parameters\), "
                         r"Embedding \(1 layer, 400 parameters\), 9\d% of the model", said[0])
        assert "granularity='weight'" in said[0]


def separable_cnn():
    return keras.Sequential([
        keras.Input((16, 16, 3)), L.Conv2D(8, 3, activation="relu", name="stem"),
        L.SeparableConv2D(32, 3, activation="relu"),
        L.SeparableConv2D(64, 3, activation="relu"),
        L.GlobalAveragePooling2D(), L.Dense(10, name="head")])


def test_a_separable_cnn_says_how_far_short_it_falls_and_which_layers_are_not_prunable():
    rng = np.random.default_rng(0)
    x, y = rng.random((16, 16, 16, 3)).astype("float32"), rng.integers(0, 10, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = dkdp.prunable(separable_cnn())
    cb, said = fit_with_unit_schedule(model, x, y)
    reached = cb.history[-1]["sparsity"]
    # The stem's units feed a SeparableConv2D, which compact cannot see
    # through: removing them would shrink nothing, so they are kept.
    assert reached == 0.0
    assert len(said) == 1
    assert "asked for sparsity 0.50 and reached 0.00" in said[0]
    assert "Prunable (masked): 2 layers, 'stem', 'head'" in said[0]
    assert "Protected: 'stem', 'head'" in said[0] and "cannot see through" in said[0]
    assert "SeparableConv2D (2 layers," in said[0]


def test_a_cnn_of_prunable_layers_reaching_its_target_is_not_warned_about():
    rng = np.random.default_rng(0)
    x, y = rng.random((16, 16, 16, 3)).astype("float32"), rng.integers(0, 4, 16)
    model = dkdp.prunable(keras.Sequential([
        keras.Input((16, 16, 3)), L.Conv2D(16, 3, activation="relu"),
        L.Conv2D(32, 3, activation="relu"), L.GlobalAveragePooling2D(),
        L.Dense(32, activation="relu"), L.Dense(4)]))
    cb, said = fit_with_unit_schedule(model, x, y)
    assert cb.history[-1]["sparsity"] > 0.375
    assert said == []
