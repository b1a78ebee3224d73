"""Argument checks shared by constructors: each error names the argument,
the value and what is allowed."""

import math
import os
import pathlib


def number(name, value, low=None, high=None, low_open=False, high_open=False,
           integer=False):
    """Check that `value` is a real (or integer) number within the bounds."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        try:
            import numpy as np

            ok = isinstance(value, np.integer if integer else (np.integer, np.floating))
        except ImportError:  # pragma: no cover
            ok = False
        if not ok:
            what = "an integer" if integer else "a number"
            raise TypeError(f"{name} must be {what}, got {value!r}.")
    if not integer and not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(
            f"{name} must be in {left}{lo}, {hi}{right}, got {value!r}."
        )
    return int(value) if integer else float(value)


def sparsity(name, value):
    """A target sparsity: a number in [0, 1)."""
    return number(name, value, low=0.0, high=1.0, high_open=True)


def keras_model(name, value):
    """Check that `value` is a Keras model (a path is not one)."""
    import os

    import keras

    if not isinstance(value, keras.Model):
        hint = (
            " Load a saved model with keras.saving.load_model(path) first."
            if isinstance(value, (str, os.PathLike)) else ""
        )
        raise TypeError(
            f"{name} must be a keras.Model, got {type(value).__name__}: "
            f"{value!r:.80}.{hint}"
        )
    return value


def shape(name, value):
    """An input shape: a tuple of positive integers (None for any size)."""
    if not isinstance(value, (tuple, list)) or not value or not all(
        d is None or (isinstance(d, int) and not isinstance(d, bool) and d > 0)
        for d in value
    ):
        raise ValueError(
            f"{name} must be a non-empty tuple of positive integers (the shape "
            f"of one example, without the batch axis), got {value!r}."
        )
    return tuple(value)


def examples(name, x, model=None, y=None):
    """Check a batch of examples: its per-example shape is `model`'s input
    shape and, with `y`, it has as many examples as `y`. Returns x."""
    import numpy as np

    if not hasattr(x, "shape"):
        try:
            x = np.asarray(x, dtype="float32")
        except (TypeError, ValueError):
            raise TypeError(
                f"{name} must be an array of examples, got {type(x).__name__}."
            ) from None
    if len(x.shape) < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one example, got shape {tuple(x.shape)}.")
    if y is not None and hasattr(y, "shape") and len(y.shape) and y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{name} has {x.shape[0]} inputs but {y.shape[0]} targets."
        )
    if model is not None and len(model.inputs) == 1:
        want = tuple(model.inputs[0].shape)[1:]
        got = tuple(x.shape)[1:]
        if len(got) != len(want) or any(
            w is not None and g is not None and int(g) != int(w)
            for g, w in zip(got, want)
        ):
            raise ValueError(
                f"{name} has examples of shape {tuple(int(d) for d in got)}, "
                f"but model '{model.name}' takes {want}."
            )
    return x


def choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}.")
    return value


def boolean(name, value):
    """`value` if it is True or False, else a TypeError naming `name`."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return value


def instance(name, value, cls, what):
    """`value` if it is None or a `cls`, else a TypeError saying `what`."""
    if value is not None and not isinstance(value, cls):
        raise TypeError(f"{name} must be {what}, got {value!r}.")
    return value


def tflite_path(path):
    """`path` as a pathlib.Path of a `.tflite` file that can be written."""
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
