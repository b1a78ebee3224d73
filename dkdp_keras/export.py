"""Export to TFLite/LiteRT, checked against Keras, sized and timed."""

import dataclasses
import gzip
import os
import pathlib
import secrets
import tempfile
import time

import keras
import numpy as np

from dkdp_keras import _validation
from dkdp_keras.compaction import compact
from dkdp_keras.prunable import check_graph_model, masked_layers

QUANTIZE = (None, "none", "dynamic", "float16", "int8")


@dataclasses.dataclass
class ExportReport:
    """What `export_tflite` wrote and measured.

    Attributes:
        path: the `.tflite` file.
        quantize: "none", "dynamic", "float16" or "int8".
        prepared: what was done to the model first ("compacted": removed
            units gone, masks and gates baked into plain layers, by
            `dkdp_keras.compact`; "as is").
        bytes: file size. gzip_bytes: size after gzip -9 (what zeros buy).
        max_abs_diff: largest |TFLite − Keras| over the check outputs
            (dequantized for int8 outputs).
        top1_agreement: fraction of check inputs whose arg-max agrees.
        latency_ms: median batch-1 invocation time, one thread.
        accuracy: TFLite top-1 accuracy when labels were given, else None.
        check_examples: how many inputs the check ran on.
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

    def as_dict(self):
        return dataclasses.asdict(self)


def _check_path(path):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path, got {path!r}.")
    text = os.fspath(path)
    # pathlib drops a trailing separator: "out/" would become the file "out".
    if text.endswith(tuple(s for s in (os.sep, os.altsep) if s)) or os.path.isdir(text):
        raise IsADirectoryError(
            f"path must be a file, but {text!r} is a directory: pass a file "
            f"path such as {os.path.join(text, 'model.tflite')!r}."
        )
    path = pathlib.Path(path)
    if path.suffix != ".tflite":
        raise ValueError(
            f"path must end in .tflite, got {str(path)!r} (for example "
            f"{str(path.with_suffix('.tflite'))!r})."
        )
    parent = path.parent if str(path.parent) else pathlib.Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(
            f"The directory {str(parent)!r} of {str(path)!r} does not exist: "
            "create it first."
        )
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"The directory {str(parent)!r} is not writable.")
    return path


def _same_length(name, x, y):
    """An (x, y) pair must hold as many labels as inputs: numpy would
    otherwise broadcast one label against every prediction."""
    if y is None:
        return
    if y.ndim == 0:
        raise ValueError(
            f"{name} has {len(x)} inputs (x) but a single label (y) of shape (): "
            f"pass one label per input, an array of length {len(x)}."
        )
    if len(y) != len(x):
        raise ValueError(
            f"{name} has {len(x)} inputs (x) but {len(y)} labels (y): pass "
            "an (x, y) pair with one label per input (or x alone)."
        )


def _class_labels(name, y, output_shape):
    """Class indices, one per prediction, from labels given as indices
    (shape of the output without its class axis, or with a class axis of 1)
    or one-hot rows (the output's shape)."""
    def same(a, b):
        return len(a) == len(b) and all(
            i is None or j is None or int(i) == int(j) for i, j in zip(a, b)
        )

    per_example = tuple(y.shape[1:])
    classes = output_shape[:-1]
    if same(per_example, output_shape) and output_shape[-1] not in (None, 1):
        return y.argmax(-1)
    if same(per_example, classes):
        return y
    if same(per_example, classes + (1,)):
        return y[..., 0]
    raise ValueError(
        f"{name} has labels of shape {per_example} per example, but with the "
        f"model's output of shape {output_shape} they must be class indices "
        f"of shape {classes} or one-hot rows of shape {output_shape}."
    )


def _as_arrays(data, name):
    """(x, y or None) from an array, an (x, y) pair or a tf.data dataset."""
    if data is None:
        return None, None
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return np.asarray(data[0]), np.asarray(data[1])
    if hasattr(data, "as_numpy_iterator"):  # a batched tf.data dataset
        xs, ys = [], []
        for item in data.as_numpy_iterator():
            x, y = (item[0], item[1]) if isinstance(item, tuple) else (item, None)
            xs.append(x)
            if y is not None:
                ys.append(y)
            if sum(len(b) for b in xs) >= 256:
                break
        return np.concatenate(xs), (np.concatenate(ys) if ys else None)
    try:
        return np.asarray(data), None
    except Exception:
        raise TypeError(
            f"{name} must be an array, an (x, y) pair or a tf.data dataset, "
            f"got {type(data).__name__}."
        ) from None


def _convert(model, quantize, representative, sparsity, int8_io, fixed_batch):
    import tensorflow as tf

    signature = None
    if fixed_batch:
        signature = [
            keras.InputSpec(shape=(1,) + tuple(t.shape[1:]), dtype=t.dtype)
            for t in model.inputs
        ]
    with tempfile.TemporaryDirectory() as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False,
                     input_signature=signature)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        optimizations = []
        if quantize in ("dynamic", "float16", "int8"):
            optimizations.append(tf.lite.Optimize.DEFAULT)
        if sparsity:
            optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
        converter.optimizations = optimizations
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantize == "int8":
            samples = representative.astype("float32")

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
        return converter.convert()


def _interpreter(path):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path), num_threads=1)


def _run(path, x):
    """TFLite outputs for `x`, one example at a time (batch 1), float."""
    interp = _interpreter(path)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = out["quantization"]
    results = []
    for i in range(len(x)):
        sample = x[i : i + 1].astype("float32")
        if inp["dtype"] in (np.int8, np.uint8):
            sample = np.round(sample / in_scale + in_zero).astype(inp["dtype"])
        interp.set_tensor(inp["index"], sample)
        interp.invoke()
        value = interp.get_tensor(out["index"]).astype("float32")
        if out["dtype"] in (np.int8, np.uint8):
            value = (value - out_zero) * out_scale
        results.append(value)
    return np.concatenate(results)


def measure_tflite_latency_ms(path, runs=100, warmup=10, batch=1):
    """Median wall time of one invocation (one thread) of a `.tflite` file on
    zeros of the input's shape with the given batch size, in ms."""
    return measure_tflite_latencies_ms([path], runs, warmup, batch, rounds=1)[0]


def measure_tflite_latencies_ms(paths, runs=100, warmup=10, batch=1, rounds=5):
    """`measure_tflite_latency_ms` of several files, interleaved: after each
    file's `warmup`, `rounds` rounds each time every file `runs / rounds`
    times, so that a machine whose speed drifts during the measurement
    slows every file alike. Each file's figure is still the median of
    `runs` invocations."""
    runs = int(runs)
    rounds = max(1, min(int(rounds), runs))
    setups = []
    for path in paths:
        interp = _interpreter(path)
        inp = interp.get_input_details()[0]
        shape = [batch] + list(inp["shape"][1:])
        interp.resize_tensor_input(inp["index"], shape)
        interp.allocate_tensors()
        interp.set_tensor(inp["index"], np.zeros(shape, dtype=inp["dtype"]))
        for _ in range(warmup):
            interp.invoke()
        setups.append(interp)
    times = [[] for _ in paths]
    for r in range(rounds):
        share = runs // rounds + (1 if r < runs % rounds else 0)
        for interp, record in zip(setups, times):
            for _ in range(share):
                start = time.perf_counter()
                interp.invoke()
                record.append(time.perf_counter() - start)
    return [1000.0 * float(np.median(t)) for t in times]


def export_tflite(model, path, quantize=None, representative_data=None,
                  sparsity=False, check_data=None, int8_io=False,
                  max_abs_diff=1e-4, min_top1_agreement=0.99,
                  latency_runs=100, fixed_batch=False):
    """Convert a Keras model to a `.tflite` file and check it in LiteRT.

    Masked models are compacted first (`dkdp_keras.compact`: removed units
    gone, masks and gates baked into plain layers). The model goes through Keras 3's own SavedModel export and
    `tf.lite.TFLiteConverter.from_saved_model`; the file is then run in the
    LiteRT interpreter (`ai_edge_litert`) at batch 1 on the check data and
    compared with the Keras model. A failed check raises `ValueError`
    naming the figures; nothing new is left at `path` then (a file already
    there is kept), nor when the check is interrupted.

    Args:
        model: a Keras Sequential/Functional model (or a DKDPModel: the
            model it serves is exported).
        path: the output file, ending in `.tflite`; its directory must exist.
            The file is written under a temporary name beside it and moved
            to `path` only when the check passes.
        quantize: None or "none" (float32), "dynamic" (dynamic-range int8
            weights), "float16" (float16 weights) or "int8" (full integer,
            needs `representative_data`).
        representative_data: inputs for int8 calibration (an array, an
            (x, y) pair or a batched tf.data dataset; up to 500 examples
            are used).
        sparsity: turn on the converter's sparse weight encoding
            (for unstructured pruning). With quantize="int8" the file it
            writes does not run in LiteRT's default CPU delegate (XNNPACK
            refuses its sparse int8 kernels), which the check reports.
        check_data: inputs (or an (x, y) pair, to also report accuracy;
            y: class indices or one-hot rows, one per input) to
            compare TFLite with Keras on; default: 64 examples of the
            representative data, else 64 uniform random inputs.
        int8_io: with "int8", int8 model inputs and outputs as well.
        max_abs_diff: the float32 check: largest allowed |TFLite − Keras|.
        min_top1_agreement: the quantized check: smallest allowed fraction
            of check inputs with the same arg-max.
        latency_runs: batch-1 invocations timed (after 10 warm-up ones).
        fixed_batch: if True, the file's input has batch size 1 instead
            of a dynamic one: what microcontroller runtimes expect (static
            shapes), and Flatten needs no run-time shape operations.

    Returns:
        An `ExportReport`.
    """
    path = _check_path(path)
    _validation.choice("quantize", quantize, QUANTIZE)
    quantize = "none" if quantize in (None, "none") else quantize
    if not isinstance(int8_io, bool) or (int8_io and quantize != "int8"):
        raise ValueError("int8_io=True needs quantize='int8'.")
    rep_x, rep_y = _as_arrays(representative_data, "representative_data")
    if rep_x is not None:
        _same_length("representative_data", rep_x, rep_y)
    if quantize == "int8" and rep_x is None:
        raise ValueError(
            "quantize='int8' needs representative_data: a few hundred typical "
            "inputs (for example x_train[:200]) to calibrate the ranges."
        )
    _validation.number("max_abs_diff", max_abs_diff, low=0.0)
    _validation.number("min_top1_agreement", min_top1_agreement, low=0.0)
    _validation.number("latency_runs", latency_runs, low=1, integer=True)
    if not isinstance(fixed_batch, bool):
        raise TypeError(f"fixed_batch must be True or False, got {fixed_batch!r}.")
    if hasattr(model, "teacher") and hasattr(model, "student"):
        model = model.student if model.serve == "student" else model.teacher
    check_graph_model(model)
    if not isinstance(sparsity, bool):
        raise TypeError(f"sparsity must be True or False, got {sparsity!r}.")
    if rep_x is not None:
        _validation.examples("representative_data", rep_x, model=model)
    prepared = "as is"
    if masked_layers(model):
        model = compact(model)
        prepared = "compacted"

    check_x, check_y = _as_arrays(check_data, "check_data")
    if check_x is None:
        if rep_x is not None:
            check_x = rep_x[:64]
        else:
            shape = (64,) + tuple(model.inputs[0].shape)[1:]
            check_x = np.random.default_rng(0).random(shape).astype("float32")
    expected_shape = tuple(model.inputs[0].shape)[1:]
    if tuple(check_x.shape[1:]) != expected_shape:
        raise ValueError(
            f"check_data has examples of shape {tuple(check_x.shape[1:])}, the "
            f"model takes {expected_shape}."
        )
    labels = None
    if check_y is not None:
        _same_length("check_data", check_x, check_y)
        labels = _class_labels("check_data", check_y,
                               tuple(model.outputs[0].shape)[1:])

    flatbuffer = _convert(model, quantize, rep_x, sparsity, int8_io, fixed_batch)
    # The file is written and checked under a temporary name in the same
    # directory, and moved to `path` only once the check passed: a failure
    # or an interrupt (KeyboardInterrupt is no Exception) leaves no
    # unchecked file at `path`, and an earlier file there untouched.
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
        diff = float(np.max(np.abs(lite_out - keras_out)))
        agree = float(np.mean(lite_out.argmax(-1) == keras_out.argmax(-1)))
        if quantize == "none" and diff > max_abs_diff:
            raise ValueError(
                f"The float32 TFLite model differs from Keras by up to {diff:.3g} "
                f"(allowed {max_abs_diff:g}) on {len(check_x)} inputs."
            )
        if quantize != "none" and agree < min_top1_agreement:
            raise ValueError(
                f"The {quantize} TFLite model agrees with Keras on the top-1 "
                f"class for {agree:.1%} of {len(check_x)} inputs (required "
                f"{min_top1_agreement:.1%}); max abs diff {diff:.3g}."
            )
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    accuracy = None
    if labels is not None:
        accuracy = float(np.mean(lite_out.argmax(-1) == labels))
    return ExportReport(
        path=str(path),
        quantize=quantize,
        prepared=prepared,
        bytes=len(flatbuffer),
        gzip_bytes=len(gzip.compress(flatbuffer, 9)),
        max_abs_diff=diff,
        top1_agreement=agree,
        latency_ms=measure_tflite_latency_ms(path, runs=latency_runs),
        accuracy=accuracy,
        check_examples=len(check_x),
    )
