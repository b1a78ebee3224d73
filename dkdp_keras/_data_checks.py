"""Checks of the data given to `DKDPModel.fit`, run before the first step:
mistakes that TensorFlow would otherwise report as a graph trace in the
first step (labels out of range), after it (NaN labels), or after the
first epoch (a bad `validation_data`), each named with the fix.

They are cheap: arrays are checked whole (one pass over the labels); a
tf.data dataset is read for its first batch only; a Python generator or
a `keras.utils.PyDataset` is never read (reading it would consume what
the user gave `fit`).

Below them, the data of `export_tflite`'s check: its representative and
check data read as arrays, default check inputs, and the comparison of
the TFLite file's outputs with Keras' (what is measured, what passes)."""

import inspect

import keras
import numpy as np

_SPARSE_NAMES = ("sparse_categorical_crossentropy", "SparseCategoricalCrossentropy")


def check_fit(model, args, kwargs):
    """Check `DKDPModel.fit(*args, **kwargs)`'s data against `model`."""
    if getattr(model, "_loss_fn", None) is None:
        return  # not compiled: Keras says so itself
    try:
        bound = inspect.signature(keras.Model.fit).bind(model, *args, **kwargs)
    except TypeError:
        return  # keras.Model.fit reports bad arguments itself
    given = bound.arguments
    x, y = given.get("x"), given.get("y")
    rules = _Rules(model)
    if _is_dataset(x):
        rules.dataset("x", x, check_inputs=False)
    elif _array(x) is not None:
        if y is None:
            raise ValueError(
                "fit got inputs x without labels y: DKDPModel trains on "
                "labels (the task loss L(M_t(x), y)); pass y=, or a tf.data "
                "dataset of (inputs, labels) batches."
            )
        # The examples' shape is checked when the step is traced, before it
        # runs (DKDPModel._check_inputs); only the labels are checked here.
        rules.labels("y", _array(y), len(_array(x)))
    validation = given.get("validation_data")
    if validation is None:
        return
    if _is_dataset(validation):
        rules.dataset("validation_data", validation, check_inputs=True)
    elif isinstance(validation, (tuple, list)) and len(validation) in (2, 3):
        vx, vy = _array(validation[0]), _array(validation[1])
        if vx is not None:
            rules.inputs("validation_data", vx.shape)
            if vy is not None:
                rules.labels("validation_data", vy, len(vx))


def _is_dataset(value):
    try:
        import tensorflow as tf
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, tf.data.Dataset)


def _array(value):
    """`value` as a numpy array if it is an array or tensor (not a
    generator, PyDataset, dict or list of inputs), else None."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "shape") and hasattr(value, "__array__") and not isinstance(
        value, (dict, keras.utils.PyDataset)
    ):
        try:
            return np.asarray(value)
        except Exception:
            return None
    return None


class _Rules:
    """What the teacher and the loss allow."""

    def __init__(self, model):
        self.teacher = model.teacher
        output = tuple(self.teacher.outputs[0].shape)
        self.output_rank = len(output)
        self.classes = output[-1] if output else None
        self.sparse, self.ignore_class = _sparse_loss(model)

    def inputs(self, name, shape):
        if len(self.teacher.inputs) != 1:
            return
        want = tuple(self.teacher.inputs[0].shape)[1:]
        got = tuple(shape)[1:]
        if len(got) != len(want) or any(
            w is not None and g is not None and int(g) != int(w)
            for g, w in zip(got, want)
        ):
            got = tuple(None if g is None else int(g) for g in got)
            raise ValueError(
                f"{name} has examples of shape {got}, but the teacher "
                f"'{self.teacher.name}' takes {want}: validation examples "
                "must be shaped like the training examples."
            )

    def labels(self, name, y, examples=None):
        if examples is not None and (y.ndim == 0 or len(y) != examples):
            count = "a single label" if y.ndim == 0 else f"{len(y)} labels"
            raise ValueError(
                f"{name} has {examples} inputs (x) but {count} (y): pass one "
                "label per input."
            )
        if y.dtype.kind == "f":
            bad = ~np.isfinite(y)
            if bad.any():
                first = np.argwhere(bad)[0][0]
                raise ValueError(
                    f"{name} holds {int(bad.sum())} NaN or Inf labels (the "
                    f"first in example {int(first)}): drop or fix those "
                    "examples before fit."
                )
        if not self.sparse or self.classes is None:
            return
        classes = int(self.classes)
        if (self.output_rank == 2 and y.ndim == 2 and classes > 1
                and y.shape[-1] == classes):
            raise ValueError(
                f"{name} looks one-hot (shape {tuple(y.shape)}, one column per "
                f"class of the teacher '{self.teacher.name}'), but the loss is "
                "a sparse categorical crossentropy, which takes class indices: "
                "pass y.argmax(-1), or compile with "
                "loss=keras.losses.CategoricalCrossentropy()."
            )
        if y.dtype.kind not in "iuf" or y.size == 0:
            return
        values = y[y != self.ignore_class] if self.ignore_class is not None else y
        bad = (values < 0) | (values >= classes) | (values != np.floor(values))
        if bad.any():
            label = values[bad].flat[0]
            label = int(label) if float(label).is_integer() else float(label)
            raise ValueError(
                f"{name} holds the label {label!r}, but the teacher "
                f"'{self.teacher.name}' has {classes} outputs: a sparse "
                f"categorical crossentropy takes class indices 0 to "
                f"{classes - 1}. Fix the labels, or give the teacher's last "
                "layer one unit per class."
            )

    def dataset(self, name, dataset, check_inputs):
        spec = dataset.element_spec
        if not isinstance(spec, tuple) or len(spec) < 2 or spec[1] is None:
            raise ValueError(
                f"{name} is a tf.data dataset that yields inputs only, "
                "without labels: DKDPModel.fit needs (inputs, labels) "
                "batches, for example tf.data.Dataset.zip((inputs, labels)) "
                "or dataset.map(lambda x: (x, label_of(x)))."
            )
        if check_inputs and hasattr(spec[0], "shape"):
            self.inputs(name, spec[0].shape)
        # Only what the element spec says: reading a batch would be one more
        # pass over the pipeline, and a seeded shuffle with
        # reshuffle_each_iteration would then start every epoch one
        # permutation later than a plain Keras fit of the same dataset
        # (the benchmark's paired runs compare exactly that). Label values
        # in a dataset are left to the training step's own checks (NaN:
        # DKDPModel's FloatingPointError).
        shape = getattr(spec[1], "shape", None)
        if (self.sparse and self.classes is not None and shape is not None
                and self.output_rank == 2 and len(shape) == 2
                and shape[-1] is not None and int(self.classes) > 1
                and int(shape[-1]) == int(self.classes)):
            raise ValueError(
                f"{name} yields labels of shape {tuple(shape)}, one-hot (one "
                f"column per class of the teacher '{self.teacher.name}'), but "
                "the loss is a sparse categorical crossentropy, which takes "
                "class indices: map the labels with tf.argmax(y, -1), or "
                "compile with loss=keras.losses.CategoricalCrossentropy()."
            )


def _sparse_loss(model):
    """(whether the task loss is a sparse categorical crossentropy, its
    ignore_class)."""
    loss = model._loss_fn
    named = (model._compile_args or {}).get("loss")
    sparse = (
        isinstance(loss, keras.losses.SparseCategoricalCrossentropy)
        or getattr(loss, "fn", None) is keras.losses.sparse_categorical_crossentropy
        or (isinstance(named, str) and named in _SPARSE_NAMES)
    )
    ignore = None
    if sparse:
        try:
            ignore = loss.get_config().get("ignore_class")
        except Exception:
            ignore = None
    return sparse, ignore


# --- export_tflite's check ------------------------------------------------

#: Inputs the export check runs on when check_data is not given: enough that
#: a few top-1 flips of a healthy quantized model (near-tied logits) move
#: the agreement by tenths of a point, not by the whole tolerance.
CHECK_EXAMPLES = 256
#: Default tolerances, see `export_tflite`.
MAX_REL_DIFF = 1e-3
MAX_ACCURACY_DROP = 0.05
MIN_TOP1_AGREEMENT = 0.9


def export_arrays(data, name):
    """(x, y or None) from an array, an (x, y) pair or a batched tf.data
    dataset (its first 256 examples)."""
    if data is None:
        return None, None
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return np.asarray(data[0]), np.asarray(data[1])
    if hasattr(data, "as_numpy_iterator"):
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


def same_length(name, x, y):
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


def class_labels(name, y, output_shape):
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


def input_dtype(model):
    return np.dtype(keras.backend.standardize_dtype(model.inputs[0].dtype))


def random_inputs(model, count, layers):
    """`count` random inputs of the model's shape and dtype: uniform in
    [0, 1) for float inputs; for integer inputs, token ids below the
    input_dim of the Embedding layers among `layers`."""
    rng = np.random.default_rng(0)
    shape = (count,) + tuple(model.inputs[0].shape)[1:]
    if None in shape:
        raise ValueError(
            f"Model '{model.name}' takes inputs of shape {shape[1:]}, with a "
            "dimension of any size: pass check_data (and representative_data) "
            "of the shape you will run."
        )
    dtype = input_dtype(model)
    if not np.issubdtype(dtype, np.integer):
        return rng.random(shape).astype(dtype)
    sizes = [layer.input_dim for layer in layers
             if isinstance(layer, keras.layers.Embedding)]
    if not sizes:
        raise ValueError(
            f"Model '{model.name}' takes {dtype} inputs and has no Embedding layer "
            "that says which values are valid: pass check_data, a few hundred "
            "typical inputs (or an (x, y) pair)."
        )
    return rng.integers(0, min(sizes), shape).astype(dtype)


def check_inputs(model, check_data, representative, layers):
    """(inputs, class labels or None) of the export check: `check_data`,
    else the first CHECK_EXAMPLES representative inputs, else random ones."""
    x, y = export_arrays(check_data, "check_data")
    if x is None:
        x = (representative[:CHECK_EXAMPLES] if representative is not None
             else random_inputs(model, CHECK_EXAMPLES, layers))
    want = tuple(model.inputs[0].shape)[1:]
    if len(x.shape) != len(want) + 1 or any(
            w is not None and int(g) != int(w) for g, w in zip(x.shape[1:], want)):
        raise ValueError(
            f"check_data has examples of shape {tuple(x.shape[1:])}, the "
            f"model takes {want}."
        )
    if y is None:
        return x, None
    same_length("check_data", x, y)
    return x, class_labels("check_data", y, tuple(model.outputs[0].shape)[1:])


# Fewer flips than this within the accuracy bound is sampling noise: a
# failure then says how many labelled inputs the bound needs.
NOISE_FLIPS = 5


class Measured:
    """TFLite's outputs against Keras' on the check inputs (and labels)."""

    def __init__(self, keras_out, lite_out, labels):
        self.examples = len(keras_out)
        self.abs_diff = float(np.max(np.abs(lite_out - keras_out)))
        self.scale = float(np.max(np.abs(keras_out)))
        if self.scale > 0:
            self.rel_diff = self.abs_diff / self.scale
        else:  # a model that outputs zeros: any difference is all of it
            self.rel_diff = 0.0 if self.abs_diff == 0 else float("inf")
        lite_top1, keras_top1 = lite_out.argmax(-1), keras_out.argmax(-1)
        self.agreement = float(np.mean(lite_top1 == keras_top1))
        self.keras_accuracy = self.accuracy = None
        if labels is not None:
            self.keras_accuracy = float(np.mean(keras_top1 == labels))
            self.accuracy = float(np.mean(lite_top1 == labels))

    def report_fields(self):
        """The figures, named as `ExportReport` names them."""
        return dict(max_abs_diff=self.abs_diff, top1_agreement=self.agreement,
                    accuracy=self.accuracy, check_examples=self.examples,
                    max_rel_diff=self.rel_diff, output_scale=self.scale,
                    keras_accuracy=self.keras_accuracy)

    def judge(self, quantize, max_rel_diff, max_abs_diff, max_accuracy_drop,
              min_top1_agreement):
        """(passed, one sentence: what was measured against what)."""
        m, parts, passed = self, [], True
        largest = f"of the largest Keras output {m.scale:.3g}"
        if quantize == "none":
            allowed = f"allowed {max_rel_diff:g} of it"
            passed = m.rel_diff <= max_rel_diff
            if max_abs_diff is not None:
                allowed += f" and {max_abs_diff:g} absolute"
                passed = passed and m.abs_diff <= max_abs_diff
            parts.append(f"the float32 TFLite model differs from Keras by up to "
                         f"{m.abs_diff:.3g}, {m.rel_diff:.2g} {largest} ({allowed})")
            parts.append(f"top-1 agreement {m.agreement:.1%}")
            if m.accuracy is not None:
                parts.append(f"TFLite accuracy {m.accuracy:.1%}, Keras {m.keras_accuracy:.1%}")
        else:
            required = min_top1_agreement
            if m.accuracy is not None:
                drop = m.keras_accuracy - m.accuracy
                passed = drop <= max_accuracy_drop + 1e-9
                parts.append(
                    f"TFLite accuracy {m.accuracy:.1%} against Keras' {m.keras_accuracy:.1%} "
                    f"on the labelled inputs (a drop of {100 * drop:.1f} points, allowed "
                    f"{100 * max_accuracy_drop:.1f})")
                if not passed and max_accuracy_drop * m.examples < NOISE_FLIPS:
                    parts.append(
                        f"on {m.examples} labelled inputs one input moves the accuracy by "
                        f"{100 / m.examples:.1f} points, so the bound allows "
                        f"{int(max_accuracy_drop * m.examples + 1e-9)} flips: pass a few "
                        "hundred labelled inputs as check_data to tell a bad file from "
                        "sampling noise")
            elif required is None:
                required = MIN_TOP1_AGREEMENT
            agrees = (f"the {quantize} TFLite model agrees with Keras on the top-1 "
                      f"class for {m.agreement:.1%} of {m.examples} inputs")
            if required is not None:
                passed = passed and m.agreement >= required
                agrees += f" (required {required:.1%})"
            parts.append(agrees)
            parts.append(f"max |TFLite - Keras| {m.abs_diff:.3g}, {m.rel_diff:.2g} {largest}")
        name = "float32" if quantize == "none" else quantize
        verdict = "passed" if passed else "FAILED"
        return passed, (f"{name} check {verdict} on {m.examples} inputs: "
                        + "; ".join(parts) + ".")
