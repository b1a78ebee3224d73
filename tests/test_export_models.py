"""Export of the models users ship (issue 22, items 5, 7 and 8): checks
that pass healthy files and fail wrong ones without deleting what was
asked for; mixed-precision models; recurrent models on token ids."""

import pathlib
import warnings

import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
from dkdp_keras import export


def _failed_check_warnings(record):
    return [str(w.message) for w in record if "check FAILED" in str(w.message)]


def _conv_net(logit_scale=1.0):
    """Three conv/swish/pool stages and a Dense head, its kernel scaled by
    `logit_scale`: float32 rounding then differs between Keras and TFLite
    in proportion to the output, as on a trained EfficientNetB0 (logits of
    magnitude 191)."""
    inputs = keras.Input((32, 32, 3))
    x = inputs
    for filters in (8, 16, 16):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="swish")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(x), name="conv_net")
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([kernel * logit_scale, bias])
    return model


# --- item 5: the float32 check is relative to the output scale ------------

def test_float32_check_is_relative_to_the_output_scale(tmp_path):
    model = _conv_net(logit_scale=1e5)
    x = np.random.default_rng(0).random((64, 32, 32, 3)).astype("float32")
    path = tmp_path / "big_logits.tflite"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = dkdp.export_tflite(model, path, check_data=x, latency_runs=1)
    assert _failed_check_warnings(record) == []
    # An absolute bound of 1e-4 (the old check) rejects this healthy file:
    assert report.output_scale > 1e3 and report.max_abs_diff > 1e-4
    assert report.max_rel_diff == pytest.approx(report.max_abs_diff / report.output_scale)
    assert report.max_rel_diff < 1e-5 and report.top1_agreement == 1.0
    assert report.check_passed
    assert report.check.startswith("float32 check passed on 64 inputs")
    assert "of the largest Keras output" in report.check and "allowed 0.001 of it" in report.check
    assert path.stat().st_size == report.bytes


def test_a_wrong_float32_file_fails_its_check_and_is_kept(tmp_path, monkeypatch):
    """A conversion of other weights (a genuinely wrong file) fails the
    check: by default a warning and the file at the path asked for; with
    strict=True an ExportCheckError, the path left as it was and the file
    beside it."""
    model = _conv_net(logit_scale=100.0)
    wrong = _conv_net(logit_scale=100.0)  # same graph, other initial weights
    convert = export._convert
    monkeypatch.setattr(export, "_convert", lambda m, *args: convert(wrong, *args))
    x = np.random.default_rng(0).random((32, 32, 32, 3)).astype("float32")
    path = tmp_path / "m.tflite"
    with pytest.warns(UserWarning, match=r"float32 check FAILED on 32 inputs.*written to "
                                         r".*m.tflite' all the same; pass strict=True"):
        report = dkdp.export_tflite(model, path, check_data=x, latency_runs=1)
    assert not report.check_passed and report.max_rel_diff > 0.05
    assert report.check.startswith("float32 check FAILED")
    assert report.path == str(path) and path.stat().st_size == report.bytes

    path.write_bytes(b"an earlier, checked export")
    with pytest.raises(export.ExportCheckError, match=r"float32 check FAILED.*strict=True: "
                                                      r".*m.tflite' was left as it was") as info:
        dkdp.export_tflite(model, path, check_data=x, latency_runs=1, strict=True)
    assert isinstance(info.value, ValueError)  # what `except ValueError` callers catch
    assert path.read_bytes() == b"an earlier, checked export"
    kept = tmp_path / "m.failed-check.tflite"
    assert info.value.report.path == str(kept) and not info.value.report.check_passed
    assert kept.stat().st_size == info.value.report.bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.failed-check.tflite", "m.tflite"]


# --- item 5: the quantized check -----------------------------------------

def _identity_classifier():
    """6 inputs -> 3 logits equal to x[:, :3]: Keras' top-1 class is known."""
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)], name="identity")
    kernel = np.zeros((6, 3), "float32")
    kernel[:3, :3] = np.eye(3)
    model.layers[0].set_weights([kernel, np.zeros(3, "float32")])
    return model


def _issue_figures():
    """500 inputs, labels and TFLite outputs with the issue's figures for a
    post-training-quantized MobileNetV2: Keras accuracy 72.0%, TFLite
    70.6%, top-1 agreement 94.4% (28 flips); one flip among the first 64."""
    rng = np.random.default_rng(0)
    x = rng.random((500, 6)).astype("float32")
    keras_top1 = x[:, :3].argmax(-1)
    labels = keras_top1.copy()
    flips = [10] + list(range(100, 127))                   # 28 disagreements
    keras_right_lite_wrong = flips[:14]
    lite_right_keras_wrong = flips[14:21]
    both_wrong = flips[21:]
    other_wrong = [i for i in range(500) if i not in flips][:140 - 7 - 7]
    lite_top1 = keras_top1.copy()
    for i in keras_right_lite_wrong:
        lite_top1[i] = (keras_top1[i] + 1) % 3
    for i in lite_right_keras_wrong:
        labels[i] = lite_top1[i] = (keras_top1[i] + 1) % 3
    for i in both_wrong:
        labels[i] = (keras_top1[i] + 1) % 3
        lite_top1[i] = (keras_top1[i] + 2) % 3
    for i in other_wrong:
        labels[i] = (keras_top1[i] + 1) % 3
    lite_out = 5.0 * np.eye(3, dtype="float32")[lite_top1]
    assert np.mean(keras_top1 == labels) == 0.72 and np.mean(lite_top1 == labels) == 0.706
    assert np.mean(lite_top1 == keras_top1) == 0.944
    assert np.sum(lite_top1[:64] != keras_top1[:64]) == 1
    return x, labels, lite_out


def test_the_quantized_check_passes_a_healthy_post_training_quantization(tmp_path, monkeypatch):
    x, labels, lite_out = _issue_figures()
    monkeypatch.setattr(export, "_run", lambda path, xs: lite_out[: len(xs)])
    model = _identity_classifier()
    args = dict(quantize="dynamic", latency_runs=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        labelled = dkdp.export_tflite(model, tmp_path / "a.tflite", check_data=(x, labels), **args)
        unlabelled = dkdp.export_tflite(model, tmp_path / "b.tflite", check_data=x, **args)
        few = dkdp.export_tflite(model, tmp_path / "c.tflite", check_data=x[:64], **args)
    assert _failed_check_warnings(record) == []
    assert labelled.check_passed and unlabelled.check_passed and few.check_passed
    assert labelled.accuracy == pytest.approx(0.706)
    assert labelled.keras_accuracy == pytest.approx(0.72)
    assert labelled.top1_agreement == pytest.approx(0.944)
    assert ("TFLite accuracy 70.6% against Keras' 72.0% on the labelled inputs (a drop of "
            "1.4 points, allowed 5.0)") in labelled.check
    assert "94.4% of 500 inputs (required 90.0%)" in unlabelled.check
    assert few.top1_agreement == pytest.approx(63 / 64) and few.check_examples == 64
    for name in "abc":
        assert (tmp_path / f"{name}.tflite").stat().st_size > 0

    # A bound the user sets on the agreement is kept, labels or not.
    with pytest.warns(UserWarning, match=r"94.4% of 500 inputs \(required 95.0%\)"):
        strict_agreement = dkdp.export_tflite(model, tmp_path / "d.tflite",
                                              check_data=(x, labels),
                                              min_top1_agreement=0.95, **args)
    assert not strict_agreement.check_passed


def test_the_quantized_check_fails_a_wrong_file(tmp_path, monkeypatch):
    x, labels, _ = _issue_figures()
    rng = np.random.default_rng(1)
    chance = 5.0 * np.eye(3, dtype="float32")[rng.integers(0, 3, len(x))]
    monkeypatch.setattr(export, "_run", lambda path, xs: chance[: len(xs)])
    model = _identity_classifier()
    args = dict(quantize="dynamic", latency_runs=1)
    with pytest.warns(UserWarning, match=r"dynamic check FAILED on 500 inputs: TFLite accuracy"):
        labelled = dkdp.export_tflite(model, tmp_path / "a.tflite", check_data=(x, labels), **args)
    assert labelled.keras_accuracy - labelled.accuracy > 0.2
    with pytest.warns(UserWarning, match=r"dynamic check FAILED on 256 inputs: .*agrees with "
                                         r"Keras on the top-1 class for .*\(required 90.0%\)"):
        unlabelled = dkdp.export_tflite(model, tmp_path / "b.tflite", check_data=x[:256], **args)
    assert not labelled.check_passed and not unlabelled.check_passed
    assert unlabelled.top1_agreement < 0.5
    assert (tmp_path / "a.tflite").exists() and (tmp_path / "b.tflite").exists()
    with pytest.raises(export.ExportCheckError, match="dynamic check FAILED"):
        dkdp.export_tflite(model, tmp_path / "c.tflite", check_data=x, strict=True, **args)
    assert not (tmp_path / "c.tflite").exists() and (tmp_path / "c.failed-check.tflite").exists()


def test_an_accuracy_check_on_few_labelled_inputs_says_it_is_within_noise(tmp_path, monkeypatch):
    # CI's DenseNet121 check failed on 32 labelled inputs by two flips: the
    # failure must say that one input is 3.1 points and ask for more inputs.
    x, labels, _ = _issue_figures()
    model = _identity_classifier()
    keras_out = model.predict(x[:32], verbose=0)
    few = keras_out.argmax(-1)  # Keras right on all 32, TFLite wrong on two
    flipped = keras_out.copy()
    flipped[:2] = np.roll(flipped[:2], 1, axis=-1)
    monkeypatch.setattr(export, "_run", lambda path, xs: flipped[: len(xs)])
    with pytest.warns(UserWarning, match=r"drop of 6.2 points, allowed 5.0\); on 32 labelled "
                                         r"inputs one input moves the accuracy by 3.1 points, "
                                         r"so the bound allows 1 flips: pass a few hundred"):
        report = dkdp.export_tflite(model, tmp_path / "a.tflite", quantize="dynamic",
                                    check_data=(x[:32], few), latency_runs=1)
    assert not report.check_passed
    # On 500 inputs the same bound allows 25 flips: a failure is no noise.
    chance = 5.0 * np.eye(3, dtype="float32")[np.random.default_rng(1).integers(0, 3, 500)]
    monkeypatch.setattr(export, "_run", lambda path, xs: chance[: len(xs)])
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        report = dkdp.export_tflite(model, tmp_path / "b.tflite", quantize="dynamic",
                                    check_data=(x, labels), latency_runs=1)
    failed = _failed_check_warnings(said)
    assert not report.check_passed and len(failed) == 1
    assert "few hundred" not in failed[0]


def test_an_accuracy_bound_without_labels_is_refused_before_conversion(tmp_path, monkeypatch):
    def no_conversion(*args):
        raise AssertionError("converted before checking the arguments")

    monkeypatch.setattr(export, "_convert", no_conversion)
    x = np.zeros((8, 6), "float32")
    with pytest.raises(ValueError, match=r"max_accuracy_drop needs labels.*check_data=\(x, y\)"):
        dkdp.export_tflite(_identity_classifier(), tmp_path / "m.tflite", quantize="dynamic",
                           check_data=x, max_accuracy_drop=0.02)
    with pytest.raises(TypeError, match="strict must be True or False"):
        dkdp.export_tflite(_identity_classifier(), tmp_path / "m.tflite", strict="yes")
    assert list(tmp_path.iterdir()) == []


def _channel_task(n, rng):
    """32x32x3 images whose class is the channel with the highest offset:
    continuous margins, so some inputs lie near a decision boundary, as
    in real data."""
    offsets = rng.random((n, 1, 1, 3)).astype("float32")
    x = (0.5 * rng.random((n, 32, 32, 3)) + 0.5 * offsets).astype("float32")
    return x, offsets.reshape(n, 3).argmax(-1)


@pytest.mark.slow
def test_post_training_int8_mobilenet_v2_passes_its_default_check(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = _channel_task(1024, rng)
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                           classes=3, classifier_activation=None)
    norms = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    for layer in norms:  # statistics that follow a few epochs (Keras' 0.999 would not)
        layer.momentum = 0.9
    model.compile(keras.optimizers.Adam(2e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:768], y[:768], epochs=6, batch_size=32, verbose=0)
    for layer in norms:  # the statistics of the trained network, exactly
        layer.momentum = 0.0
    model(x[:256], training=True)
    test_x, test_y = x[768:], y[768:]
    logits = model.predict(test_x, verbose=0)
    assert logits.std(axis=0).min() > 0.5  # the output depends on the input
    keras_accuracy = float(np.mean(logits.argmax(-1) == test_y))
    assert keras_accuracy > 0.55  # chance is 1/3

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        default = dkdp.export_tflite(model, tmp_path / "default.tflite", quantize="int8",
                                     representative_data=x[:256], latency_runs=5)
        labelled = dkdp.export_tflite(model, tmp_path / "labelled.tflite", quantize="int8",
                                      representative_data=x[:256], latency_runs=5,
                                      check_data=(test_x, test_y))
    assert _failed_check_warnings(record) == []
    assert default.check_passed and default.check_examples == 256
    assert 0.9 <= default.top1_agreement
    assert labelled.check_passed and labelled.keras_accuracy == pytest.approx(keras_accuracy)
    assert abs(labelled.keras_accuracy - labelled.accuracy) <= 0.05
    for report in (default, labelled):
        assert pathlib.Path(report.path).stat().st_size == report.bytes


# --- item 7: mixed precision ----------------------------------------------

def _mixed_precision_net():
    """Conv, a keras.ops gate, a nested Sequential block with BN, Dense:
    built under mixed_float16 by the caller."""
    block = keras.Sequential([keras.Input((16, 16, 8)),
                              keras.layers.Conv2D(8, 3, padding="same"),
                              keras.layers.BatchNormalization()], name="block")
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same")(inputs)
    x = x * keras.ops.sigmoid(x + 3.0)
    x = keras.layers.ReLU()(block(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4)(x), name="mixed")


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_mixed_float16_model_exports_as_float32(tmp_path, quantize):
    from ai_edge_litert.interpreter import Interpreter

    x = np.random.default_rng(0).random((64, 32, 32, 3)).astype("float32")
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _mixed_precision_net()
        # Exported in the session that trained it: the policy is still set.
        report = dkdp.export_tflite(model, tmp_path / "m.tflite", quantize=quantize,
                                    representative_data=x, latency_runs=1)
        assert keras.config.dtype_policy().name == "mixed_float16"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert report.prepared == "float32 copy of a mixed_float16 model"
    assert report.check_passed and report.check_examples == 64
    assert {layer.dtype_policy.name for layer in model.layers[1:]} == {"mixed_float16"}
    interpreter = Interpreter(model_path=report.path)
    assert interpreter.get_input_details()[0]["dtype"] == np.float32
    assert interpreter.get_output_details()[0]["dtype"] == np.float32
    # The file computes what the mixed-precision model does, up to float16
    # rounding (float32 file) or int8 rounding.
    keras_out = np.asarray(model.predict(x, verbose=0), "float32")
    assert keras_out.std(axis=0).min() > 1e-3
    lite_out = export._run(report.path, x)
    scale = np.abs(keras_out).max()
    assert np.abs(lite_out - keras_out).max() <= (1e-2 if quantize is None else 0.1) * scale
    if quantize is None:
        assert report.max_rel_diff < 1e-5  # against the float32 copy it was converted from


def test_a_masked_mixed_float16_model_is_compacted_then_exported_as_float32(tmp_path):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = dkdp.prunable(keras.Sequential([
            keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3), keras.layers.BatchNormalization(),
            keras.layers.ReLU(), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4)]))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    layer = dkdp.masked_layers(model)[0]
    mask = np.ones(layer.kernel.shape, "float32")
    mask[..., :3] = 0.0  # three of the eight filters removed
    layer.kernel_mask.assign(mask)
    x = np.random.default_rng(0).random((32, 32, 32, 3)).astype("float32")
    report = dkdp.export_tflite(model, tmp_path / "m.tflite", check_data=x, latency_runs=1)
    assert report.prepared == "compacted, float32 copy of a mixed_float16 model"
    assert report.check_passed
    lite_out = export._run(report.path, x)
    keras_out = np.asarray(model.predict(x, verbose=0), "float32")
    assert np.abs(lite_out - keras_out).max() <= 1e-2 * np.abs(keras_out).max()


# --- item 8: recurrent models on token ids --------------------------------

def _token_model(recurrent, vocabulary=50, length=12):
    return keras.Sequential([keras.Input((length,), dtype="int32"),
                             keras.layers.Embedding(vocabulary, 8), recurrent,
                             keras.layers.Dense(3)], name="tokens")


def _recording_run(monkeypatch):
    seen = []
    run = export._run

    def record(path, x):
        seen.append(np.array(x))
        return run(path, x)

    monkeypatch.setattr(export, "_run", record)
    return seen


@pytest.mark.parametrize("recurrent", [
    lambda: keras.layers.LSTM(6),
    lambda: keras.layers.GRU(6),
    lambda: keras.layers.Bidirectional(keras.layers.GRU(4)),
], ids=["lstm", "gru", "bidirectional_gru"])
def test_recurrent_token_models_export_checked_on_token_ids(tmp_path, monkeypatch, recurrent):
    from ai_edge_litert.interpreter import Interpreter

    model = _token_model(recurrent())
    seen = _recording_run(monkeypatch)
    report = dkdp.export_tflite(model, tmp_path / "rnn.tflite", latency_runs=1)
    assert report.fixed_batch and report.check_passed and report.max_rel_diff < 1e-4
    detail = Interpreter(model_path=report.path).get_input_details()[0]
    assert list(detail["shape_signature"]) == [1, 12] and detail["dtype"] == np.int32
    (checked,) = seen
    assert np.issubdtype(checked.dtype, np.integer) and checked.shape == (256, 12)
    assert checked.min() >= 0 and checked.max() < 50 and len(np.unique(checked)) == 50


def test_a_recurrent_model_is_checked_on_the_given_tokens_and_quantized(tmp_path):
    model = _token_model(keras.layers.LSTM(6))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, (40, 12)).astype("int32")
    labels = rng.integers(0, 3, 40)
    keras_accuracy = float(np.mean(model.predict(tokens, verbose=0).argmax(-1) == labels))
    report = dkdp.export_tflite(model, tmp_path / "f.tflite", check_data=(tokens, labels),
                                latency_runs=1)
    assert report.check_passed and report.accuracy == pytest.approx(keras_accuracy)
    assert report.keras_accuracy == pytest.approx(keras_accuracy)
    dynamic = dkdp.export_tflite(model, tmp_path / "d.tflite", quantize="dynamic",
                                 check_data=tokens, latency_runs=1)
    assert dynamic.check_passed and dynamic.fixed_batch and dynamic.check_examples == 40


def test_a_dynamic_batch_recurrent_model_names_the_option(tmp_path):
    model = _token_model(keras.layers.LSTM(6))
    with pytest.raises(ValueError, match=r"needs a static batch size for model 'tokens' "
                                         r"\(its lstm.*Pass fixed_batch=True"):
        dkdp.export_tflite(model, tmp_path / "m.tflite", fixed_batch=False, latency_runs=1)
    assert list(tmp_path.iterdir()) == []


def test_full_int8_of_a_recurrent_loop_is_refused_before_the_converter_crashes(
        tmp_path, monkeypatch):
    def no_conversion(*args):
        raise AssertionError("the converter's int8 calibration of an RNN loop segfaults")

    monkeypatch.setattr(export, "_convert", no_conversion)
    tokens = np.random.default_rng(0).integers(0, 50, (16, 12)).astype("int32")
    with pytest.raises(ValueError, match=r"quantize='int8'.*recurrent layers \(gru.*"
                                         r"quantize='dynamic'.*unroll=True"):
        dkdp.export_tflite(_token_model(keras.layers.GRU(6)), tmp_path / "m.tflite",
                           quantize="int8", representative_data=tokens)


def test_an_embedding_model_quantizes_to_int8_with_integer_calibration(tmp_path, monkeypatch):
    model = keras.Sequential([keras.Input((12,), dtype="int32"), keras.layers.Embedding(50, 8),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(3)])
    tokens = np.random.default_rng(0).integers(0, 50, (64, 12)).astype("int32")
    seen = _recording_run(monkeypatch)
    report = dkdp.export_tflite(model, tmp_path / "i8.tflite", quantize="int8",
                                representative_data=tokens, latency_runs=1)
    assert report.check_passed and not report.fixed_batch
    np.testing.assert_array_equal(seen[0], tokens)


def test_integer_inputs_without_an_embedding_ask_for_check_data(tmp_path, monkeypatch):
    def no_conversion(*args):
        raise AssertionError("converted before checking the arguments")

    monkeypatch.setattr(export, "_convert", no_conversion)
    model = keras.Sequential([keras.Input((4,), dtype="int32"),
                              keras.layers.CategoryEncoding(num_tokens=10, output_mode="count"),
                              keras.layers.Dense(3)])
    with pytest.raises(ValueError,
                       match=r"takes int32 inputs and has no Embedding.*pass check_data"):
        dkdp.export_tflite(model, tmp_path / "m.tflite")
