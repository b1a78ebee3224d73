"""Knowledge distillation in DKDP: the distillation losses L_KD =
D(M_t(x), M_s(x)), the metrics of teacher and student, the teacher (made
prunable) and the student (auto or given), and when the student is
rebuilt."""

import re

import keras
from keras import ops

from dkdp_keras import _validation
from dkdp_keras.narrowing import width_copy
from dkdp_keras.prunable import check_graph_model, masked_layers, prunable

KD_LOSSES = ("kl", "mse")
REFRESH_STRATEGIES = ("width", "compact_teacher")


def get_kd_loss(kd_loss, temperature):
    """A `keras.distillation.DistillationLoss` for `kd_loss`.

    - "kl": `keras.distillation.LogitsDistillation(temperature)`, i.e.
      T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)), averaged over the batch
      (Hinton et al. 2015), exactly as keras.distillation computes it.
    - "mse": the mean squared difference of the logits (Ba & Caruana 2014).
    - a `keras.distillation.DistillationLoss` instance, used as it is
      (`FeatureDistillation` with layer names included).
    """
    if isinstance(kd_loss, keras.distillation.DistillationLoss):
        return kd_loss
    if kd_loss == "kl":
        # A KLDivergence *instance*: with the default loss="kl_divergence"
        # string, Keras 3.15 resolves a plain function, misses its softmax
        # branch and computes KL on raw logits.
        return keras.distillation.LogitsDistillation(
            temperature=temperature, loss=keras.losses.KLDivergence()
        )
    if kd_loss == "mse":
        return keras.distillation.LogitsDistillation(
            temperature=1.0, loss="mean_squared_error"
        )
    raise ValueError(
        f"kd_loss must be one of {KD_LOSSES} or a "
        f"keras.distillation.DistillationLoss, got {kd_loss!r}."
    )


def feature_layer_names(kd_loss):
    """(teacher_layer_name, student_layer_name) a loss distils from, if any."""
    return (
        getattr(kd_loss, "teacher_layer_name", None),
        getattr(kd_loss, "student_layer_name", None),
    )


def auto_accuracy(y_true, y_pred):
    """Accuracy for class labels or one-hot labels, decided from the static
    shapes as `compile(metrics=["accuracy"])` does: one-hot labels when
    `y_true` has the shape of `y_pred`, binary when there is one output,
    class indices otherwise."""
    classes = y_pred.shape[-1]
    if classes == 1:
        return keras.metrics.binary_accuracy(y_true, y_pred)
    if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == classes:
        return keras.metrics.categorical_accuracy(y_true, y_pred)
    return keras.metrics.sparse_categorical_accuracy(y_true, y_pred)


def make_metrics(metrics, prefix):
    """Fresh metric objects named `<prefix>_<name>` for each identifier."""
    if metrics is None:
        return []
    if not isinstance(metrics, (list, tuple)):
        raise TypeError(
            "metrics must be a list such as ['accuracy'], got "
            f"{metrics!r}. (Per-output dicts are for multi-output models, "
            "which DKDPModel does not support.)"
        )
    made = []
    for metric in metrics:
        if isinstance(metric, str) and metric in ("accuracy", "acc"):
            made.append(
                keras.metrics.MeanMetricWrapper(
                    auto_accuracy, name=f"{prefix}_accuracy"
                )
            )
        elif isinstance(metric, keras.metrics.Metric):
            config = metric.get_config()
            config["name"] = f"{prefix}_{metric.name}"
            made.append(type(metric).from_config(config))
        else:
            fn = keras.metrics.get(metric)
            if isinstance(fn, keras.metrics.Metric):
                config = fn.get_config()
                config["name"] = f"{prefix}_{fn.name}"
                made.append(type(fn).from_config(config))
            else:
                name = metric if isinstance(metric, str) else fn.__name__
                made.append(
                    keras.metrics.MeanMetricWrapper(fn, name=f"{prefix}_{name}")
                )
    return made


def check_hyperparameters(lambda_kd, temperature, student_hard_loss_weight,
                          mutual, student_width, student_batch_fraction):
    """Raise unless DKDPModel's numeric and boolean arguments are in range."""
    _validation.number("lambda_kd", lambda_kd, low=0.0)
    _validation.number("temperature", temperature, low=0.0, low_open=True)
    _validation.number(
        "student_hard_loss_weight", student_hard_loss_weight, low=0.0
    )
    if not isinstance(mutual, bool):
        raise TypeError(f"mutual must be True or False, got {mutual!r}.")
    _validation.number(
        "student_width", student_width, low=0.0, high=1.0, low_open=True
    )
    _validation.number(
        "student_batch_fraction", student_batch_fraction, low=0.0, high=1.0,
        low_open=True,
    )


def same_signature(teacher, student):
    """Raise unless student and teacher take and give tensors of one shape."""
    def shapes(tensors):
        return [tuple(t.shape)[1:] for t in tensors]

    if shapes(teacher.inputs) != shapes(student.inputs):
        raise ValueError(
            f"The student takes inputs of shape {shapes(student.inputs)} but "
            f"the teacher takes {shapes(teacher.inputs)} (batch dimension "
            "left out): both must read the same data."
        )
    if shapes(teacher.outputs) != shapes(student.outputs):
        raise ValueError(
            f"The student outputs shape {shapes(student.outputs)} but the "
            f"teacher outputs {shapes(teacher.outputs)}: the student must "
            "predict the same targets (same number of classes)."
        )


def kd_value(kd, teacher_out, student_out):
    """The distillation loss as a float32 scalar."""
    return ops.cast(kd.compute_loss(teacher_out, student_out), "float32")


def _subclassed(model):
    """A subclassed keras.Model (as `pruner.is_subclassed`, which this
    module, beside it in the layers, does not import)."""
    names = {cls.__name__ for cls in type(model).__mro__}
    return isinstance(model, keras.Model) and not names & {"Sequential", "Functional"}


def prunable_teacher(teacher):
    """`teacher`, checked to be a one-output graph model, with masked
    layers that track statistics (made prunable if it has none)."""
    if _subclassed(teacher):
        raise TypeError(
            f"teacher is a subclassed keras.Model ({type(teacher).__name__}), "
            "and DKDPModel reads its teacher's graph (its inputs and outputs, "
            "the layers the student is built from and distils from), which a "
            "subclass does not have. Build the teacher as a Sequential or "
            "Functional model (keras.Model(inputs, outputs)) to distil it; to "
            "prune the subclass itself, build its layers as "
            "dkdp_keras.MaskedDense, MaskedConv2D, ... and train it with "
            "model.fit(..., callbacks=[dkdp_keras.DKDPCallback("
            "granularity='weight', threshold=dkdp_keras.thresholds."
            "ConstantSparsity(0.5))]) (weight pruning with a schedule)."
        )
    check_graph_model(teacher, "teacher")
    if len(teacher.outputs) != 1:
        raise ValueError(
            f"teacher '{teacher.name}' has {len(teacher.outputs)} outputs; "
            "DKDPModel trains single-output models. Distil each head "
            "with its own DKDPModel, or concatenate the heads."
        )
    if not masked_layers(teacher):
        teacher = prunable(teacher, track_statistics=True)
    if not masked_layers(teacher):
        raise ValueError(
            f"teacher '{teacher.name}' has no prunable layer (Dense, "
            "Conv1D/2D/3D, DepthwiseConv1D/2D): there is nothing to prune."
        )
    return teacher


def make_student(teacher, student, width):
    """The student of `teacher`, checked to read and predict what it does.

    Args:
        teacher: the (prunable) teacher.
        student: "auto" (a width-`width` copy of the teacher,
            `dkdp_keras.narrowing.width_copy`), a Keras model, or a callable
            `teacher -> student` that returns one.
        width: the width factor of the "auto" student, in (0, 1].
    """
    if isinstance(student, str):
        if student != "auto":
            raise ValueError(
                "student must be 'auto', a Keras model or a callable "
                f"teacher -> student, got {student!r}."
            )
        made = auto_student(teacher, width)
    elif isinstance(student, keras.Model):
        made = student
    elif callable(student):
        made = student(teacher)
        if not isinstance(made, keras.Model):
            raise TypeError(
                "the student callable must return a keras.Model, got "
                f"{type(made).__name__}."
            )
    else:
        raise TypeError(
            "student must be 'auto', a Keras model or a callable "
            f"teacher -> student, got {student!r}."
        )
    if _subclassed(made):
        raise TypeError(
            f"student is a subclassed keras.Model ({type(made).__name__}); "
            "DKDPModel checks and reads its student through its inputs and "
            "outputs, which a subclass does not have. Build the student as a "
            "Sequential or Functional model (keras.Model(inputs, outputs))."
        )
    check_graph_model(made, "student")
    same_signature(teacher, made)
    return made


def auto_student(teacher, width):
    """`width_copy(teacher, width)`, checked to read and predict what the
    teacher does; else a `ValueError` that says the narrower copy could not
    be built, at which layer, and that `student=` avoids it (Keras' own
    error, raised while the narrower layers are wired, names neither)."""
    avoid = ("Pass student= a Keras model of your own with the teacher's "
             "input and output shapes, or a callable teacher -> student that "
             "builds one.")
    try:
        made = width_copy(teacher, width, name="student")
    except (ValueError, TypeError) as error:
        if "student=" in str(error):  # width_copy's own refusal says it all
            raise
        layer = _failing_layer(error)
        where = ("a layer Keras did not name" if layer is None else
                 f"layer '{layer.name}' ({type(layer).__name__})")
        raise ValueError(
            f"student='auto' could not build a narrower copy of teacher "
            f"'{teacher.name}': with its Dense/Conv layers {width:g} times as "
            f"wide, {where} cannot take its narrowed input (Keras: "
            f"{_first_line(error)}). A layer that holds a width of its own (a "
            "Reshape's target shape, a squeeze-and-excite gate, an Add of "
            f"branches narrowed differently) stops the narrower copy. {avoid}"
        ) from error
    try:
        same_signature(teacher, made)
    except ValueError as error:
        raise ValueError(
            f"student='auto' built a narrower copy of teacher '{teacher.name}' "
            f"that does not fit it: {error} (a layer after the output units "
            f"was narrowed). {avoid}"
        ) from None
    return made


def _failing_layer(error):
    """The innermost layer (not a model) the traceback of `error` ran,
    which is where wiring the copy failed; None when none is found."""
    found, tb = None, error.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, keras.layers.Layer) and not isinstance(
                    value, keras.Model):
                found = value
        tb = tb.tb_next
    return found


def _first_line(error):
    """The first line of `error` that says what went wrong: Keras wraps it
    in a 'calling <Layer>.call()' line and the arguments, in ANSI bold."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", l).strip() for l in str(error).splitlines()]
    said = [l for l in lines if l and not l.startswith("Exception encountered")]
    return said[0] if said else type(error).__name__


def check_refresh_strategy(strategy):
    """Raise unless `strategy` is "width", "compact_teacher" or a callable
    `teacher -> student` (what `DKDPModel.refresh_student` takes)."""
    if isinstance(strategy, str):
        _validation.choice("strategy", strategy, REFRESH_STRATEGIES)
    elif not callable(strategy):
        raise TypeError(
            "strategy must be 'width', 'compact_teacher' or a callable "
            f"teacher -> student, got {strategy!r}."
        )


class StudentRefresh:
    """When a DKDPModel's student is rebuilt from the pruned teacher.

    Args:
        every: rebuild after every `every` pruning events.
        shrink: rebuild when the teacher's non-zero parameters have fallen
            by this factor (> 1) since the last rebuild.
        strategy: passed to `DKDPModel.refresh_student` ("width",
            "compact_teacher" or a callable).

    "compact_teacher" and callables change the student's architecture, so
    weights saved after a rebuild (`BackupAndRestore`) no longer fit a model
    built as at the start: resume such runs from a `.keras` checkpoint
    (`ModelCheckpoint`, then `keras.saving.load_model` and
    `fit(initial_epoch=...)`), which stores the student's architecture too.
    """

    def __init__(self, every=None, shrink=None, strategy="width"):
        if every is None and shrink is None:
            raise ValueError("StudentRefresh needs every= or shrink=.")
        self.every = (
            None if every is None
            else _validation.number("every", every, low=1, integer=True)
        )
        self.shrink = (
            None if shrink is None
            else _validation.number("shrink", shrink, low=1.0, low_open=True)
        )
        check_refresh_strategy(strategy)
        self.strategy = strategy

    @classmethod
    def get(cls, value):
        """None, a `StudentRefresh`, or an int k for `StudentRefresh(every=k)`."""
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(every=value)
        return _validation.instance(
            "student_refresh", value, cls, "None, an int or a StudentRefresh")

    def due(self, events, kept_params, params_at_last):
        """True when the student is to be rebuilt after pruning event number
        `events`, the teacher now keeping `kept_params` non-zero parameters
        and `params_at_last` at the last rebuild."""
        return (self.every is not None and events % self.every == 0) or (
            self.shrink is not None and kept_params * self.shrink <= params_at_last
        )

    def __repr__(self):
        return (f"StudentRefresh(every={self.every}, shrink={self.shrink}, "
                f"strategy={self.strategy!r})")
