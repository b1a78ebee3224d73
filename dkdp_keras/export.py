"""Export to TFLite/LiteRT, checked against Keras, sized and timed."""

import dataclasses
import gzip
import os
import secrets
import warnings

import keras
import numpy as np

from dkdp_keras import _data_checks, _validation, litert, sparse_format
from dkdp_keras.compaction import ALIGN, compact
from dkdp_keras.prunable import check_graph_model, masked_layers

QUANTIZE = (None, "none", "dynamic", "float16", "int8")


@dataclasses.dataclass
class ExportReport:
    """What `export_tflite` wrote and measured.

    Attributes:
        path: the `.tflite` file.
        quantize: "none", "dynamic", "float16" or "int8".
        prepared: what was done to the model first ("compacted" by
            `dkdp_keras.compact`; "float32 copy of a mixed_float16 model"
            (LiteRT has no float16 kernels); both, joined by ", "; "as is").
        bytes: file size. gzip_bytes: size after gzip -9 (what zeros buy).
        max_abs_diff: largest |TFLite − Keras| over the check outputs
            (dequantized for int8 outputs).
        top1_agreement: fraction of check inputs whose arg-max agrees.
        latency_ms: median batch-1 invocation time, one thread.
        accuracy: TFLite top-1 accuracy when labels were given, else None.
        check_examples: how many inputs the check ran on.
        max_rel_diff: `max_abs_diff` divided by `output_scale`.
        output_scale: the largest |Keras output| over the check inputs.
        keras_accuracy: the Keras model's top-1 accuracy on the same
            labelled inputs, else None.
        fixed_batch: whether the file's input has batch size 1.
        check_passed: whether the file met the check's tolerances.
        check: one sentence: what the check measured, against which
            tolerance, and whether it passed.
        sparse: with sparsity=True, how many weight tensors are stored
            sparse and what that buys on this CPU (file size everywhere;
            speed only where XNNPACK runs sparse kernels: see
            `dkdp_keras.sparse_format`); else "".
    """

    path: str
    quantize: str
    prepared: str
    bytes: int
    gzip_bytes: int
    max_abs_diff: float
    top1_agreement: float
    latency_ms: float
    accuracy: float = None
    check_examples: int = 0
    max_rel_diff: float = None
    output_scale: float = None
    keras_accuracy: float = None
    fixed_batch: bool = False
    check_passed: bool = True
    check: str = ""
    sparse: str = ""

    def as_dict(self):
        return dataclasses.asdict(self)


class ExportCheckError(ValueError):
    """Raised by `export_tflite(..., strict=True)` when the file fails its
    check. `report` is the `ExportReport` of the file, which was kept at
    `report.path` (beside the path asked for, which is left as it was)."""

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


def _all_layers(model):
    """Every layer of `model`, nested models and the layers inside wrappers
    (Bidirectional, TimeDistributed) included."""
    found = []

    def visit(layer):
        found.append(layer)
        if isinstance(layer, keras.Model):
            for inner in layer.layers:
                visit(inner)
        for attribute in ("layer", "forward_layer", "backward_layer"):
            inner = getattr(layer, attribute, None)
            if isinstance(inner, keras.layers.Layer) and inner not in found:
                visit(inner)

    for layer in model.layers:
        visit(layer)
    return found


def _recurrent_layers(model):
    """The model's recurrent layers that loop (keras.layers.RNN, unroll=False):
    the converter needs a static batch for them, and crashes calibrating int8."""
    return [layer.name for layer in _all_layers(model)
            if isinstance(layer, keras.layers.RNN) and not layer.unroll]


_HALF = ("float16", "bfloat16")
_HALF_POLICIES = _HALF + ("mixed_float16", "mixed_bfloat16")


def _half_precision_policy(model):
    """The first float16/bfloat16 policy (e.g. "mixed_float16") of a layer, or None."""
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.InputLayer):
            continue  # it takes the global policy, but computes nothing
        policy = layer.dtype_policy
        if policy.compute_dtype in _HALF or policy.variable_dtype in _HALF:
            return policy.name
    return None


def _float32_config(config):
    """A layer config with every float16/bfloat16 dtype policy, its own and
    those of the layers it holds (a Bidirectional's LSTM), set to float32."""
    if isinstance(config, list):
        return [_float32_config(item) for item in config]
    if not isinstance(config, dict):
        return config
    def half(value):  # a policy's name, or its serialized config's
        name = value.get("config", {}).get("name") if isinstance(value, dict) else value
        return isinstance(name, str) and name in _HALF_POLICIES
    return {key: "float32" if key == "dtype" and half(value) else _float32_config(value)
            for key, value in config.items()}


def _float32_copy(model, policy):
    """The model rebuilt with float32 layers (nested models too), its weights
    copied: a mixed_float16 graph converts to float16 ops LiteRT has not."""

    def clone(layer):
        if not isinstance(layer, keras.layers.Layer):
            return layer  # a keras.ops node: it computes in its inputs' dtype
        return layer.__class__.from_config(_float32_config(layer.get_config()))

    previous = keras.config.dtype_policy()
    # Sub-layers that a layer builds in its __init__ without passing its
    # own policy on get the global one: float32 while copying.
    keras.config.set_dtype_policy("float32")
    try:
        copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
        copy.set_weights(model.get_weights())
    except Exception as error:
        raise ValueError(
            f"Model '{model.name}' computes in {policy}, which LiteRT does not run, "
            f"and could not be copied with float32 layers ({type(error).__name__}: "
            f"{str(error).strip()[:300]}). Build it again under the float32 policy, "
            "set_weights(model.get_weights()), and export that copy."
        ) from error
    finally:
        keras.config.set_dtype_policy(previous)
    return copy


def _convert(model, quantize, representative, sparsity, int8_io, fixed_batch):
    import tensorflow as tf

    def configure(converter):
        optimizations = []
        if quantize in ("dynamic", "float16", "int8"):
            optimizations.append(tf.lite.Optimize.DEFAULT)
        if sparsity:
            optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
        converter.optimizations = optimizations
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantize == "int8":
            # Token ids stay integers; float inputs are float32.
            samples = representative.astype(_data_checks.input_dtype(model))

            def gen():
                for i in range(min(len(samples), 500)):
                    yield [samples[i : i + 1]]

            converter.representative_dataset = gen
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.TFLITE_BUILTINS_INT8
            ]
            if int8_io:
                converter.inference_input_type = tf.int8
                converter.inference_output_type = tf.int8

    return litert.convert(model, configure, fixed_batch=fixed_batch)


def _run(path, x):
    """TFLite outputs for `x`, one example at a time (batch 1), float; `x`
    quantized for an int8/uint8 input, else cast to the input's type."""
    interp = litert.interpreter(path)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = out["quantization"]
    quantized_input = inp["dtype"] in (np.int8, np.uint8) and in_scale != 0
    results = []
    for i in range(len(x)):
        sample = x[i : i + 1]
        if quantized_input:
            sample = np.round(sample.astype("float32") / in_scale + in_zero)
        interp.set_tensor(inp["index"], sample.astype(inp["dtype"]))
        interp.invoke()
        value = interp.get_tensor(out["index"]).astype("float32")
        if out["dtype"] in (np.int8, np.uint8):
            value = (value - out_zero) * out_scale
        results.append(value)
    return np.concatenate(results)


#: Timing and the interpreter live in `dkdp_keras.litert`; their names here
#: are the ones the package has always had.
measure_tflite_latency_ms = litert.measure_latency_ms
measure_tflite_latencies_ms = litert.measure_latencies_ms


def export_tflite(model, path, quantize=None, representative_data=None,
                  sparsity=False, check_data=None, int8_io=False,
                  max_abs_diff=None, min_top1_agreement=None,
                  latency_runs=100, fixed_batch=None, max_rel_diff=_data_checks.MAX_REL_DIFF,
                  max_accuracy_drop=None, strict=False, align=ALIGN):
    """Convert a Keras model to a `.tflite` file and check it in LiteRT.

    Masked models are compacted first (`dkdp_keras.compact`); a mixed-
    precision model (float16/bfloat16 policy, such as "mixed_float16") is
    copied with float32 layers and its weights, as LiteRT's builtin kernels
    do not compute in float16 (the model itself is left as it is). The
    model goes through Keras' SavedModel export and
    `tf.lite.TFLiteConverter.from_saved_model`; the file is then run in the
    LiteRT interpreter at batch 1 on the check data and compared with the
    Keras model it was converted from. float32: max |TFLite − Keras| over
    max |Keras output| must be at most `max_rel_diff` (float32 rounding
    differs by ~1e-6 of the output scale, a wrong file by a sizable part of
    it). Quantized: with labels, the TFLite accuracy must be at most
    `max_accuracy_drop` below Keras'; without, the top-1 classes must agree
    on `min_top1_agreement` of the inputs (a healthy post-training-quantized
    MobileNetV2 agrees on ~94% and loses ~1.5 points of accuracy).

    The report's `check` says what was measured and whether it passed. The
    file is written under a temporary name beside `path` and moved there
    whole; an interrupted export leaves nothing new. A failed check warns
    and still writes the file to `path` (it is what was asked for; the
    report has its figures). With `strict=True` it raises `ExportCheckError`
    instead: `path` (and a file already there) is left as it was, and the
    new file is kept beside it as `<name>.failed-check.tflite`, so that
    only checked files ever reach `path`.

    Args:
        model: a Keras Sequential/Functional model (or a DKDPModel: the
            model it serves is exported).
        path: the output file, ending in `.tflite`; its directory must exist.
        quantize: None or "none" (float32), "dynamic" (dynamic-range int8
            weights), "float16" (float16 weights) or "int8" (full integer,
            needs `representative_data`).
        representative_data: inputs for int8 calibration (an array, an
            (x, y) pair or a batched tf.data dataset; up to 500 are used).
        sparsity: the converter's sparse weight encoding (for unstructured
            pruning). With "int8" LiteRT's default CPU delegate (XNNPACK)
            cannot run the file, which the check reports.
        check_data: inputs, or an (x, y) pair to check accuracy (y: class
            indices or one-hot rows), to compare TFLite with Keras on; a
            few hundred make the quantized check meaningful. Default: 256
            representative inputs, else 256 random ones (uniform in [0, 1),
            or token ids below the Embedding's input_dim).
        int8_io: with "int8", int8 model inputs and outputs as well.
        max_abs_diff: also bound the float32 check's max |TFLite − Keras|.
        min_top1_agreement: the quantized check's smallest fraction of
            inputs with the same arg-max; None: 0.9 without labels, not
            checked with labels (the accuracy is).
        latency_runs: batch-1 invocations timed (after 10 warm-up ones).
        fixed_batch: True: the input has batch size 1 instead of a dynamic
            one (static shapes for microcontroller runtimes; no run-time
            shape ops for Flatten). None: True for models with a recurrent
            layer that is not unrolled (the converter lowers its loop only
            with a static batch), else False.
        max_rel_diff: the float32 check's largest max |TFLite − Keras| as a
            fraction of max |Keras output| (1e-3: a thousand times float32's
            usual disagreement, far below a wrong file's).
        max_accuracy_drop: the quantized check with labels: largest Keras
            minus TFLite accuracy (None: 0.05, which a healthy int8 file
            meets on a few hundred inputs despite sampling noise).
        strict: raise `ExportCheckError` when the check fails.
        align: what a masked model's widths are compacted to multiples of
            (`dkdp_keras.compact`): 16 keeps zero channels for XNNPACK's
            float32 speed, 1 keeps none (the smallest file).

    Returns:
        An `ExportReport`.

    Raises:
        ExportCheckError: with `strict=True`, when the check fails.
        ValueError: for arguments that cannot work, before conversion (full
            int8 of a recurrent loop, which crashes TensorFlow's converter;
            `max_accuracy_drop` without labels), or when the converter
            needs `fixed_batch=True`.
        RuntimeError: when LiteRT cannot run the file at all (no file is
            left at `path` then).
    """
    path = _validation.tflite_path(path)
    _validation.choice("quantize", quantize, QUANTIZE)
    quantize = "none" if quantize in (None, "none") else quantize
    if not isinstance(int8_io, bool) or (int8_io and quantize != "int8"):
        raise ValueError("int8_io=True needs quantize='int8'.")
    rep_x, rep_y = _data_checks.export_arrays(representative_data, "representative_data")
    if rep_x is not None:
        _data_checks.same_length("representative_data", rep_x, rep_y)
    if quantize == "int8" and rep_x is None:
        raise ValueError(
            "quantize='int8' needs representative_data: a few hundred typical "
            "inputs (for example x_train[:200]) to calibrate the ranges."
        )
    for name, value in [("max_rel_diff", max_rel_diff), ("max_abs_diff", max_abs_diff),
                        ("min_top1_agreement", min_top1_agreement),
                        ("max_accuracy_drop", max_accuracy_drop)]:
        if value is not None or name == "max_rel_diff":
            _validation.number(name, value, low=0.0)
    _validation.number("latency_runs", latency_runs, low=1, integer=True)
    _validation.number("align", align, low=1, integer=True)
    if fixed_batch is not None and not isinstance(fixed_batch, bool):
        raise TypeError(f"fixed_batch must be True or False (or None), got {fixed_batch!r}.")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}.")
    if hasattr(model, "teacher") and hasattr(model, "student"):
        model = model.student if model.serve == "student" else model.teacher
    check_graph_model(model)
    if not isinstance(sparsity, bool):
        raise TypeError(f"sparsity must be True or False, got {sparsity!r}.")
    if rep_x is not None:
        _validation.examples("representative_data", rep_x, model=model)

    check_x, labels = _data_checks.check_inputs(model, check_data, rep_x, _all_layers(model))
    if labels is None and max_accuracy_drop is not None:
        raise ValueError(
            "max_accuracy_drop needs labels to compute accuracies: pass "
            "check_data=(x, y), or min_top1_agreement to bound the agreement "
            "with Keras instead."
        )
    if max_accuracy_drop is None:
        max_accuracy_drop = _data_checks.MAX_ACCURACY_DROP

    prepared = []
    if masked_layers(model):
        model = compact(model, align=align)
        prepared.append("compacted")
    policy = _half_precision_policy(model)
    if policy is not None:
        model = _float32_copy(model, policy)
        prepared.append(f"float32 copy of a {policy} model")
    prepared = ", ".join(prepared) or "as is"

    recurrent = _recurrent_layers(model)
    if recurrent and quantize == "int8":
        # TensorFlow's calibrator ends the Python process (a segmentation
        # fault, tensorflow/tensorflow#41305) on a recurrent loop.
        raise ValueError(
            f"quantize='int8' (full integer) is not possible for model '{model.name}': "
            f"the TFLite converter crashes Python calibrating the loop of its recurrent "
            f"layers ({', '.join(recurrent)}). Export with quantize='dynamic' (int8 "
            "weights) or 'float16', or build those layers with unroll=True.")
    fixed = bool(recurrent) if fixed_batch is None else fixed_batch
    try:
        flatbuffer = _convert(model, quantize, rep_x, sparsity, int8_io, fixed)
    except Exception as error:
        if fixed or "TensorList" not in str(error):
            raise
        which = f" (its {', '.join(recurrent)})" if recurrent else ""
        raise ValueError(
            f"The TFLite converter needs a static batch size for model '{model.name}'"
            f"{which}: its loop becomes TensorList ops whose element shape must be "
            "known. Pass fixed_batch=True (None does so for Keras recurrent layers)."
        ) from error

    # Written and checked under a temporary name beside `path`, then moved
    # whole: an interrupt (no Exception) leaves no half-checked file there.
    staging = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(staging, "xb") as f:  # the umask's permissions, unlike mkstemp
            f.write(flatbuffer)
        keras_out = np.asarray(model.predict(check_x, verbose=0), "float32")
        try:
            lite_out = _run(staging, check_x)
        except RuntimeError as error:
            hint = ""
            if sparsity and quantize != "none":
                hint = (
                    " LiteRT's default CPU delegate (XNNPACK) cannot run the "
                    f"sparse {quantize} kernels that sparsity=True writes: "
                    "export with sparsity=False (gzip then stores the zeros "
                    "compactly), or sparsity=True with quantize=None."
                )
            raise RuntimeError(
                f"The LiteRT interpreter could not run the exported file: "
                f"{str(error).strip().rstrip('.')}.{hint}"
            ) from None
        measured = _data_checks.Measured(keras_out, lite_out, labels)
        passed, sentence = measured.judge(quantize, max_rel_diff, max_abs_diff,
                                          max_accuracy_drop, min_top1_agreement)
        latency = measure_tflite_latency_ms(staging, runs=latency_runs)
        final = path
        if not passed and strict:
            final = path.with_name(f"{path.stem}.failed-check{path.suffix}")
        os.replace(staging, final)
    finally:
        staging.unlink(missing_ok=True)
    report = ExportReport(
        path=str(final),
        quantize=quantize,
        prepared=prepared,
        bytes=len(flatbuffer),
        gzip_bytes=len(gzip.compress(flatbuffer, 9)),
        latency_ms=latency,
        fixed_batch=fixed,
        **measured.report_fields(),
        check_passed=passed,
        check=sentence,
        sparse=sparse_format.note(flatbuffer) if sparsity else "",
    )
    if not passed and strict:
        raise ExportCheckError(
            f"{sentence} strict=True: {str(path)!r} was left as it was; the file "
            f"that failed is kept at {str(final)!r}.", report)
    if not passed:
        warnings.warn(
            f"{sentence} The file is written to {str(path)!r} all the same; pass "
            "strict=True to make a failed check raise.", stacklevel=2)
    return report
