"""The parts of DKDPModel's training step that are not the model: the task
loss L as a Loss object, the views that give a model's output and the
features a distillation loss reads in one pass, the head of the batch the
student trains on, the two objectives and their gradients, the running
statistics the step feeds, the two optimizers of `compile`, and what `fit`
is given (its validation data, the inputs' shape).

Under a distribution strategy the losses handed to `objectives` are each
replica's share of the global batch's value (as in Keras' own training
step), so that the optimizers' sum over replicas is the global gradient."""

import inspect
import math

import keras
import numpy as np
from keras import ops

from dkdp_keras.layers.base import GRADIENT_STATISTICS
from dkdp_keras.prunable import masked_layers


def task_loss(loss):
    """The task loss L(M(x), y) of `compile(loss=...)` as a
    `keras.losses.Loss`: a Loss as it is, a Keras loss name or a function
    `loss(y_true, y_pred)` wrapped. Raises on None, several losses or an
    unknown name."""
    if loss is None:
        raise ValueError(
            "compile() needs loss=, the task loss L(M_t(x), y), for example "
            "keras.losses.SparseCategoricalCrossentropy(from_logits=True)."
        )
    if isinstance(loss, (dict, list, tuple)):
        raise TypeError(
            "loss must be one loss (DKDPModel trains single-output models), "
            f"got {loss!r}."
        )
    try:
        fn = keras.losses.get(loss) if isinstance(loss, str) else loss
    except ValueError:
        fn = None
    if fn is None or not callable(fn):
        raise ValueError(
            f"Unknown loss {loss!r}: pass a keras.losses.Loss, a Keras loss "
            "name such as 'sparse_categorical_crossentropy', or a function "
            "loss(y_true, y_pred)."
        )
    if isinstance(fn, keras.losses.Loss):
        return fn
    return _FunctionLoss(fn)


class _FunctionLoss(keras.losses.Loss):
    """A loss function `fn(y_true, y_pred)` as a Loss object (sample
    weights and reduction handled by `keras.losses.Loss`)."""

    def __init__(self, fn):
        super().__init__(name=getattr(fn, "__name__", "loss"))
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


class Forward:
    """Holds the functional views that return a model's output and the
    features a distillation loss reads, in one forward pass. A plain object,
    so that Keras neither tracks nor saves these views twice.

    `Forward(model, feature_layer)(x, training)` returns `(output,
    features)`: the output twice when `feature_layer` is None, else the
    output and that layer's output."""

    def __init__(self, model, feature_layer):
        self.model = model
        self.features = None
        if feature_layer is not None:
            try:
                layer = model.get_layer(feature_layer)
            except ValueError as error:
                raise ValueError(
                    f"The distillation loss reads layer '{feature_layer}', "
                    f"which model '{model.name}' does not have: {error}"
                ) from None
            inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
            self.features = keras.Model(
                inputs, [model.outputs[0], layer.output]
            )

    def __call__(self, x, training):
        if self.features is None:
            out = self.model(x, training=training)
            return out, out
        out, feat = self.features(x, training=training)
        return out, feat


def untrack(model, sub_model):
    """Keras tracks sub-models (and optimizers) assigned as attributes and
    never forgets them; a replaced one must leave `model`'s tracker, or
    `layers`, the weights and `.keras` files would still carry it."""
    tracker = getattr(model, "_tracker", None)
    if tracker is not None and hasattr(tracker, "untrack"):
        tracker.untrack(sub_model)


def batch_head(tree, fraction):
    """The first ceil(fraction · batch) examples (at least one) of every
    tensor in `tree` (None entries stay None): what the student trains on
    with `student_batch_fraction`."""
    first = next(t for t in keras.tree.flatten(tree) if t is not None)
    batch = ops.shape(first)[0]
    count = ops.maximum(
        1, ops.cast(ops.ceil(ops.cast(batch, "float32") * fraction), "int32")
    )
    return keras.tree.map_structure(
        lambda t: None if t is None else t[:count], tree, none_is_leaf=True
    )


def objectives(teacher_loss, student_loss, kd, lambda_kd,
               student_hard_loss_weight, mutual, teacher_losses,
               student_losses, replicas):
    """The teacher's and the student's objectives.

    The teacher descends L(M_t(x), y), plus λ·L_KD when `mutual`; the
    student λ·L_KD plus `student_hard_loss_weight`·L(M_s(x), y). Each adds
    its model's regularisation losses (`model.losses`), which are whole on
    every replica and so divided by `replicas`."""
    teacher_total = teacher_loss
    if teacher_losses:
        teacher_total = teacher_total + ops.sum(teacher_losses) / replicas
    if mutual:
        teacher_total = teacher_total + lambda_kd * kd
    student_total = lambda_kd * kd
    if student_hard_loss_weight:
        student_total = student_total + student_hard_loss_weight * student_loss
    if student_losses:
        student_total = student_total + ops.sum(student_losses) / replicas
    return teacher_total, student_total


def two_gradients(tape, teacher_total, student_total, both, teacher_vars,
                  student_vars, mutual):
    """The gradients of the teacher's objective for `teacher_vars` and of
    the student's for `student_vars`, from `tape` (persistent when
    `mutual`); `both` is their sum, recorded by the tape."""
    if mutual:
        return (tape.gradient(teacher_total, teacher_vars),
                tape.gradient(student_total, student_vars))
    # L_KD reaches the teacher through a stop_gradient, so the two
    # objectives touch disjoint variables: one backward pass of their sum
    # gives both gradients, and costs less than two.
    grads = tape.gradient(both, teacher_vars + student_vars)
    return grads[: len(teacher_vars)], grads[len(teacher_vars):]


def apply_gradients(optimizer, grads, variables):
    """`optimizer` applies the gradients that exist (None: no gradient)."""
    optimizer.apply_gradients(
        [(g, v) for g, v in zip(grads, variables) if g is not None]
    )


def logged_values(teacher_loss, student_loss, kd, lambda_kd, replicas):
    """The logged `loss` (L_DKDP = L + λ·L_KD), `teacher_loss`, `kd_loss`
    and `student_loss`: the replica's shares back to the global batch's
    values, as Keras logs them."""
    teacher_loss, student_loss, kd = (
        teacher_loss * replicas, student_loss * replicas, kd * replicas
    )
    return teacher_loss + lambda_kd * kd, teacher_loss, kd, student_loss


def clone_optimizer(optimizer):
    """A new optimizer of `optimizer`'s configuration, with a fresh state."""
    return optimizer.__class__.from_config(optimizer.get_config())


def compile_optimizers(teacher_optimizer, student_optimizer, optimizer,
                       kwargs):
    """The teacher's and the student's optimizers of a `compile` call: one
    `optimizer` copied for both, or the two given (the student's a copy of
    the teacher's when left out or the same object). Raises on a `compile`
    argument in `kwargs` that DKDPModel does not take."""
    if optimizer is not None:
        if teacher_optimizer is not None or student_optimizer is not None:
            raise ValueError(
                "Pass either optimizer= (copied for teacher and student) "
                "or teacher_optimizer=/student_optimizer=, not both."
            )
        teacher_optimizer = optimizer
    teacher_optimizer = keras.optimizers.get(teacher_optimizer or "adam")
    if student_optimizer is None or student_optimizer is teacher_optimizer:
        student_optimizer = clone_optimizer(teacher_optimizer)
    student_optimizer = keras.optimizers.get(student_optimizer)
    for name in ("loss_weights", "weighted_metrics"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"DKDPModel.compile does not take {name}: weigh the "
                "losses with lambda_kd and student_hard_loss_weight."
            )
    return teacher_optimizer, student_optimizer


#: The running statistics a training step can feed (`select_statistics`).
STATISTICS = ("gradient", "activation")


def select_statistics(teacher, kinds, gradient_statistics=None):
    """Make `teacher`'s masked layers collect only the statistics in
    `kinds` ("gradient" and/or "activation") and, of the gradient running
    means, only `gradient_statistics` (None: all of GRADIENT_STATISTICS).

    Returns True when a layer's setting changed (a traced training step
    must then be traced again). Raises ValueError on an unknown name,
    before changing anything."""
    kinds = set(kinds)
    unknown = kinds - set(STATISTICS)
    if unknown:
        raise ValueError(
            f"Unknown statistics {sorted(unknown)}: use 'gradient' and/or "
            "'activation'."
        )
    if gradient_statistics is not None:
        gradient_statistics = tuple(gradient_statistics)
        unknown = set(gradient_statistics) - set(GRADIENT_STATISTICS)
        if unknown:
            raise ValueError(
                f"Unknown gradient statistics {sorted(unknown)}: use "
                f"{', '.join(map(repr, GRADIENT_STATISTICS))}."
            )
    changed = False
    for layer in masked_layers(teacher):
        want = layer.track_statistics and "activation" in kinds
        changed |= layer.collect_activations != want
        layer.collect_activations = want
        changed |= layer.gradient_statistics != gradient_statistics
        layer.gradient_statistics = gradient_statistics
    return changed


def fold_gradients(teacher, variables, grads):
    """Fold the gradients `grads` of `variables` (the teacher's trainable
    variables, in that order) into the running statistics of the teacher's
    masked layers that track statistics. None: nothing to fold."""
    if grads is None:
        return
    index = {id(v): i for i, v in enumerate(variables)}
    for layer in masked_layers(teacher):
        if not layer.track_statistics:
            continue
        i = index.get(id(layer.kernel))
        if i is not None and grads[i] is not None:
            layer.update_gradient_statistics(grads[i])


def fit_validation(*args, **kwargs):
    """The validation data of a `fit(*args, **kwargs)` call, as keyword
    arguments of `evaluate` (`x`, `y`, `batch_size`, `steps`), or None.

    `validation_data` as given; with `validation_split` and array inputs,
    the last fraction of the arrays, as Keras' `fit` takes it."""
    try:
        bound = inspect.signature(keras.Model.fit).bind(None, *args, **kwargs)
    except TypeError:
        return None  # fit itself will say what is wrong
    given = bound.arguments
    batch_size = given.get("validation_batch_size") or given.get("batch_size")
    data = given.get("validation_data")
    if data is not None:
        if isinstance(data, (tuple, list)):
            if len(data) not in (2, 3):
                return None
            return {"x": data[0], "y": data[1], "batch_size": batch_size,
                    "steps": given.get("validation_steps")}
        return {"x": data, "y": None, "batch_size": None,
                "steps": given.get("validation_steps")}
    split = given.get("validation_split") or 0.0
    x, y = given.get("x"), given.get("y")
    if not split or y is None or not hasattr(x, "shape") or not hasattr(y, "shape"):
        return None
    start = int(math.floor(int(np.shape(x)[0]) * (1.0 - split)))
    return {"x": x[start:], "y": y[start:], "batch_size": batch_size, "steps": None}


def fit_input_shape(*args, **kwargs):
    """The shape of one example of a `fit(*args, **kwargs)` call's inputs
    (arrays, tensors, or a tf.data.Dataset whose first element is a
    tensor of known shape), or None."""
    try:
        x = inspect.signature(keras.Model.fit).bind(None, *args, **kwargs).arguments.get("x")
    except TypeError:
        return None
    spec = getattr(x, "element_spec", None)
    if spec is not None:  # a tf.data.Dataset of (x, y, ...) or x
        spec = spec[0] if isinstance(spec, (tuple, list)) else spec
        shape = getattr(spec, "shape", None)
        shape = None if shape is None else tuple(shape)[1:]
    else:
        shape = tuple(np.shape(x))[1:] if hasattr(x, "shape") else None
    if not shape or any(d is None for d in shape):
        return None
    return tuple(int(d) for d in shape)


def check_inputs(teacher, x):
    """Raise unless the examples of the batch inputs `x` have `teacher`'s
    input shape (unknown dimensions match anything; dict inputs pass).
    Called at trace time, before any step runs."""
    if isinstance(x, dict):
        return
    given = list(x) if isinstance(x, (list, tuple)) else [x]
    wanted = teacher.inputs
    shapes = [tuple(t.shape)[1:] for t in given]
    expected = [tuple(t.shape)[1:] for t in wanted]
    fits = len(shapes) == len(expected) and all(
        len(s) == len(e) and all(
            a is None or b is None or int(a) == int(b) for a, b in zip(s, e)
        )
        for s, e in zip(shapes, expected)
    )
    if not fits:
        raise ValueError(
            f"The data's inputs have shape {shapes[0] if len(shapes) == 1 else shapes} "
            f"per example, but the teacher '{teacher.name}' takes "
            f"{expected[0] if len(expected) == 1 else expected}: x must "
            "hold examples of the teacher's input shape."
        )
