"""Checks of the data given to `DKDPModel.fit`, run before the first step:
mistakes that TensorFlow would otherwise report as a graph trace in the
first step (labels out of range), after it (NaN labels), or after the
first epoch (a bad `validation_data`), each named with the fix.

They are cheap: arrays are checked whole (one pass over the labels); a
tf.data dataset is read for its first batch only; a Python generator or
a `keras.utils.PyDataset` is never read (reading it would consume what
the user gave `fit`)."""

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
