"""DKDPModel: teacher and student trained together, L + λ·L_KD, in one step."""

import keras
import tensorflow as tf
from keras import ops

from dkdp_keras import _data_checks, _validation
from dkdp_keras.distillation import (
    check_hyperparameters,
    feature_layer_names,
    get_kd_loss,
    kd_value,
    make_metrics,
    same_signature,
)
from dkdp_keras.compaction import compact
from dkdp_keras.layers.base import GRADIENT_STATISTICS
from dkdp_keras.graph import rewired, width_copy
from dkdp_keras.prunable import check_graph_model, masked_layers, prunable
from dkdp_keras.state import pruning_state

SERVE = ("student", "teacher")
REFRESH = ("width", "compact_teacher")
ON_NONFINITE = ("raise", "skip")
#: Marks the in-graph assertion that `fit` turns into a FloatingPointError.
_NONFINITE = "DKDP_NONFINITE_STEP"


class _Forward:
    """Holds the functional views that return a model's output and the
    features a distillation loss reads, in one forward pass. A plain object,
    so that Keras neither tracks nor saves these views twice."""

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


def _replicas():
    """Replicas training in sync (1 outside a distribution strategy)."""
    context = tf.distribute.get_replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def _refuse_several_workers(strategy):
    """Raise when `strategy` spans several workers (machines or processes).

    Keras 3's own `fit` and `evaluate` fail there before the first step,
    with any model (keras-team/keras#20585, open as of Keras 3.15/3.16-dev):
    `TensorFlowTrainer._maybe_symbolic_build` hands the nested first batch
    to `Strategy.reduce`, which the collective strategy cannot convert
    ("Attempt to convert a value (PerReplica...) to a Tensor"), and
    `reduce_per_replica` then reduces the step's scalar logs along axis 0
    (tensorflow/tensorflow#72388). The first is a private part of `fit`
    that runs before any method a model can override, so DKDPModel refuses
    up front instead. One worker (no TF_CONFIG) trains as MirroredStrategy.
    Drop this check once Keras reduces both per tensor with axis=None."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    local = len(strategy.extended.worker_devices)
    if strategy.num_replicas_in_sync <= local:
        return  # a single worker
    raise NotImplementedError(
        "DKDPModel cannot train under tf.distribute.MultiWorkerMirroredStrategy "
        f"across several workers ({strategy.num_replicas_in_sync} replicas, "
        f"{local} on this worker): Keras {keras.__version__}'s own fit() and "
        "evaluate() fail there before the first step, with any model "
        "(https://github.com/keras-team/keras/issues/20585, open: 'ValueError: "
        "Attempt to convert a value (PerReplica:...) to a Tensor'). Train on "
        "one machine with tf.distribute.MirroredStrategy() (all its GPUs)."
    )


_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


def _divides_itself(loss):
    """True when `loss` returns its replica's share under a distribution
    strategy: a Keras Loss with a mean reduction (Keras divides it by the
    replica count), or a DistillationLoss made of such losses only."""
    if isinstance(loss, keras.losses.Loss):
        return getattr(loss, "reduction", None) in _MEAN_REDUCTIONS
    parts = [p for p in keras.tree.flatten(getattr(loss, "loss", None))
             if p is not None]
    return bool(parts) and all(_divides_itself(p) for p in parts)


def _all_finite(tensors):
    """A scalar bool: every value of every tensor is finite, on every
    replica (so that all replicas take the same branch)."""
    # One test of one sum: NaN and Inf propagate through it (Inf - Inf is
    # NaN), and a sum that overflows float32 is a diverged step anyway. Per
    # tensor tests cost a noticeable part of a small model's step.
    sums = [ops.sum(ops.cast(t, "float32")) for t in tensors if t is not None]
    finite = ops.isfinite(ops.sum(ops.stack(sums)))
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        bad = context.all_reduce(
            tf.distribute.ReduceOp.SUM, 1.0 - ops.cast(finite, "float32")
        )
        finite = bad < 0.5
    return finite


def _maybe_update(finite, update, args):
    """`update(*args)` when `finite`, else nothing, on every replica.

    Without a strategy a `tf.cond`. Under a distribution strategy the
    optimizers and the assignments to mirrored variables synchronise
    replicas (merge_call), which cannot happen inside a branch taken in
    replica context; the branch is then taken in cross-replica context and
    runs the update on each replica, as Keras' LossScaleOptimizer does. That
    holds for one replica too (`MirroredStrategy()` on a machine with one
    GPU or only a CPU, a single-worker `MultiWorkerMirroredStrategy`)."""
    context = tf.distribute.get_replica_context()
    if context is None or not tf.distribute.has_strategy():
        tf.cond(finite, lambda: update(*args), lambda: tf.constant(False))
        return

    def cross_replica(strategy, finite, args):
        # `finite` was all-reduced: every replica holds the same value.
        ok = strategy.experimental_local_results(finite)[0]

        def apply():
            strategy.extended.call_for_each_replica(update, args=args)
            return tf.constant(True)

        tf.cond(ok, apply, lambda: tf.constant(False))

    context.merge_call(cross_replica, args=(finite, args))


def _head(tree, fraction):
    """The first ceil(fraction · batch) examples (at least one) of every
    tensor in `tree` (None entries stay None)."""
    first = next(t for t in keras.tree.flatten(tree) if t is not None)
    batch = ops.shape(first)[0]
    count = ops.maximum(
        1, ops.cast(ops.ceil(ops.cast(batch, "float32") * fraction), "int32")
    )
    return keras.tree.map_structure(
        lambda t: None if t is None else t[:count], tree, none_is_leaf=True
    )


def fit_validation(*args, **kwargs):
    """The validation data of a `fit(*args, **kwargs)` call, as keyword
    arguments of `evaluate` (`x`, `y`, `batch_size`, `steps`), or None.

    `validation_data` as given; with `validation_split` and array inputs,
    the last fraction of the arrays, as Keras' `fit` takes it."""
    import inspect
    import math

    import numpy as np

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


def _clone_optimizer(optimizer):
    return optimizer.__class__.from_config(optimizer.get_config())


def _loss_object(loss):
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


@keras.saving.register_keras_serializable(package="dkdp_keras")
class DKDPModel(keras.Model):
    """Teacher and student trained together in one `train_step`.

    Each step runs the teacher once; its output serves both its own loss
    L(M_t(x), y) and the distillation target. The teacher descends L (plus
    λ·L_KD when `mutual`), the student descends λ·L_KD (plus
    `student_hard_loss_weight`·L(M_s(x), y)), each with its own optimizer
    (learning rates α and β of the method):

        θ_t ← θ_t − α ∇_θt L(M_t(x), y)
        θ_s ← θ_s − β ∇_θs L_KD(M_t(x), M_s(x))

    The logged `loss` is L_DKDP = L + λ·L_KD. The teacher is made prunable
    (masked layers with running statistics) on the way in, and the training
    step feeds the gradients it computes into those statistics, so that
    gradient-based importance criteria cost no extra pass.

    Args:
        teacher: a Sequential or Functional Keras model with one output.
        student: "auto" (a width-`student_width` copy of the teacher, every
            Dense/Conv layer but the output narrower), a Keras model with the
            teacher's input and output shapes, or a callable
            `teacher -> student`.
        lambda_kd: λ >= 0, weight of the distillation loss.
        temperature: T > 0 for the "kl" distillation loss.
        kd_loss: "kl" (T²·KL of softened distributions, as
            `keras.distillation.LogitsDistillation`), "mse" (on logits) or a
            `keras.distillation.DistillationLoss` (`FeatureDistillation` with
            layer names distils intermediate features).
        student_hard_loss_weight: weight of the student's own task loss
            on the labels (default 1.0, λ=1: the even mix of
            `keras.distillation.Distiller`'s default). With 0 the student
            learns from the teacher alone, which is pruned and, early on,
            untrained: on the benchmark's 58 kB structured run its
            width-0.25 student reached 89.36% test accuracy with 1.0 and
            88.92% with 0.
        mutual: if True, the distillation loss also trains the teacher
            (deep mutual learning); otherwise the target is a stop-gradient.
        student_width: width factor of the "auto" student, in (0, 1]; a
            width-0.5 student costs about half the teacher's step on CPU,
            the default 0.25 about 0.3 of it.
        student_batch_fraction: the student trains on the first
            ceil(fraction · batch) examples of each (shuffled) batch, in
            (0, 1]; the teacher always on all of it. On CPU a small
            student's step costs far more than its FLOPs (per-op costs):
            the width-0.25 reference CNN student's forward and backward
            take 13 ms at batch 128 and 8 ms at 64, against the teacher's
            43 ms. With the default 0.5 a DKDP step of that CNN took 1.21x
            a plain one instead of 1.31x (one process, Taylor statistics
            on), and a controlled epoch (`benchmarks/epoch_cost.py`) 1.21x
            instead of 1.29-1.35x. The student sees as many batches, each
            half as large; on the benchmark's 58 kB run its test accuracy
            went from 89.53% to 89.35% (1.0: the whole batch, as before).
            Under a distribution strategy each replica's student reads the
            head of that replica's share: the same fraction of the global
            batch, other examples than on one device.
        serve: "student" (default) or "teacher": what `call` and `predict`
            return. `model.teacher.predict(x)` always serves the teacher.
        on_nonfinite: what a training step whose losses or gradients hold
            NaN or Inf does. Either way it applies no update (weights,
            masks, optimizer states and gradient statistics stay those of
            the last good step); "raise" (default) then stops `fit` with a
            `FloatingPointError` (with `jit_compile=True`, which drops
            assertions, the NaN loss shows in the logs instead), "skip" goes
            on with the next batch and counts such steps in the
            `skipped_steps` log.

    Example:

    ```python
    model = DKDPModel(dkdp_keras.zoo.reference_cnn(), lambda_kd=1.0)
    model.compile(
        teacher_optimizer=keras.optimizers.Adam(1e-3),
        student_optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=1)  # logs teacher_accuracy, ...
    ```
    """

    def __init__(self, teacher, student="auto", lambda_kd=1.0, temperature=4.0,
                 kd_loss="kl", student_hard_loss_weight=1.0, mutual=False,
                 student_width=0.25, student_batch_fraction=0.5,
                 serve="student", on_nonfinite="raise", **kwargs):
        super().__init__(**kwargs)
        check_hyperparameters(
            lambda_kd, temperature, student_hard_loss_weight, mutual,
            student_width,
        )
        _validation.choice("serve", serve, SERVE)
        _validation.choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
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
        self.lambda_kd = float(lambda_kd)
        self.temperature = float(temperature)
        self.kd_loss = kd_loss
        self.student_hard_loss_weight = float(student_hard_loss_weight)
        self.mutual = mutual
        self.student_width = float(student_width)
        self.student_batch_fraction = float(_validation.number(
            "student_batch_fraction", student_batch_fraction, low=0.0,
            high=1.0, low_open=True,
        ))
        self.serve = serve
        self.on_nonfinite = on_nonfinite
        self._kd = get_kd_loss(kd_loss, temperature)
        self.teacher = teacher
        self.student = self._make_student(student)
        self._trackers = [
            keras.metrics.Mean(name=name)
            for name in ("loss", "teacher_loss", "kd_loss", "student_loss")
        ]
        if on_nonfinite == "skip":
            self._skipped = keras.metrics.Sum(name="skipped_steps")
            self._trackers.append(self._skipped)
        self._teacher_metrics = []
        self._student_metrics = []
        self._compile_args = None
        self._collect_gradients = True
        # DKDPCallback's state (events, τ, the adaptive controller): in
        # `.keras` files and checkpoints with the weights (dkdp_keras.state).
        pruning_state(self)
        self.built = True

    # -------------------------------------------------------------- student
    def _make_student(self, student):
        if isinstance(student, str):
            if student != "auto":
                raise ValueError(
                    "student must be 'auto', a Keras model or a callable "
                    f"teacher -> student, got {student!r}."
                )
            made = width_copy(self.teacher, self.student_width, name="student")
        elif isinstance(student, keras.Model):
            made = student
        elif callable(student):
            made = student(self.teacher)
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
        check_graph_model(made, "student")
        same_signature(self.teacher, made)
        teacher_layer, student_layer = feature_layer_names(self._kd)
        self._teacher_forward = _Forward(self.teacher, teacher_layer)
        self._student_forward = _Forward(made, student_layer)
        return made

    def refresh_student(self, strategy="width"):
        """Replace the student by a new one built from the current teacher.

        Args:
            strategy: "width" (a fresh width-`student_width` copy of the
                teacher), "compact_teacher" (the structurally compacted
                teacher, a plain model inheriting its weights, so the
                student starts where the pruned teacher is) or a callable
                `teacher -> student`.

        The student optimizer is rebuilt for the new variables (same
        configuration, fresh state); the teacher, its optimizer and the
        metrics are untouched.
        """
        if isinstance(strategy, str):
            _validation.choice("strategy", strategy, REFRESH)
            new = "auto" if strategy == "width" else compact
        elif callable(strategy):
            new = strategy
        else:
            raise TypeError(
                "strategy must be 'width', 'compact_teacher' or a callable "
                f"teacher -> student, got {strategy!r}."
            )
        old = self.student
        student = self._make_student(new)
        # Keras tracks sub-models assigned as attributes and never forgets
        # them; the old student must leave the tracker, or `layers`, the
        # weights and `.keras` files would still carry it.
        tracker = getattr(self, "_tracker", None)
        if tracker is not None and hasattr(tracker, "untrack"):
            tracker.untrack(old)
        self.student = student
        if self.compiled:
            optimizer = _clone_optimizer(self.student_optimizer)
            optimizer.build(self.student.trainable_variables)
            self.student_optimizer = optimizer
            for metric in self._student_metrics:
                metric.reset_state()
            self.make_train_function(force=True)
            self.make_test_function(force=True)
            self.make_predict_function(force=True)
        return self.student

    def request_statistics(self, kinds, gradient_statistics=None):
        """Collect only the running statistics that will be read.

        Args:
            kinds: a set of "gradient" and/or "activation" (what the
                importance criterion's `requires` names). Until this is
                called, both are collected; `DKDPCallback` calls it at the
                start of training so that a magnitude criterion costs no
                statistics at all.
            gradient_statistics: which gradient running means to keep, of
                "gradient_abs", "taylor" and "taylor_unit" (what the
                criterion's `gradient_statistics(granularity)` names);
                None keeps all three. Taylor scores of units need only
                "taylor_unit", which costs a fraction of the entry-wise ones.
        """
        kinds = set(kinds)
        unknown = kinds - {"gradient", "activation"}
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
        changed = self._collect_gradients != ("gradient" in kinds)
        self._collect_gradients = "gradient" in kinds
        for layer in masked_layers(self.teacher):
            want = layer.track_statistics and "activation" in kinds
            changed |= layer.collect_activations != want
            layer.collect_activations = want
            changed |= layer.gradient_statistics != gradient_statistics
            layer.gradient_statistics = gradient_statistics
        if changed and self.compiled:
            self.make_train_function(force=True)

    def compact_teacher(self):
        """The pruned teacher as a plain, physically smaller Keras model
        (`dkdp_keras.compact`): removed units are gone, masks baked in."""
        return compact(self.teacher)

    def compact_student(self):
        """The student as a plain, physically smaller Keras model."""
        return compact(self.student)

    # -------------------------------------------------------------- compile
    def compile(self, teacher_optimizer=None, student_optimizer=None,
                loss=None, metrics=None, optimizer=None, jit_compile=False,
                **kwargs):
        """Configure training with two optimizers.

        Args:
            teacher_optimizer: optimizer of the teacher (learning rate α).
            student_optimizer: optimizer of the student (learning rate β);
                default: a copy of the teacher's.
            loss: the task loss L, one Keras loss.
            metrics: a list of metrics, each tracked for teacher and student
                (`teacher_accuracy`, `student_accuracy`, ...). "accuracy"
                works with class labels and one-hot labels.
            optimizer: instead of the two above: one optimizer, copied for
                both models.
            jit_compile: XLA compilation (off: it slows Keras 3 on CPU).
            **kwargs: other `keras.Model.compile` arguments
                (`steps_per_execution`, `run_eagerly`, ...).
        """
        # Before anything else: Keras 3 cannot fit across workers.
        _refuse_several_workers(self.distribute_strategy)
        if optimizer is not None:
            if teacher_optimizer is not None or student_optimizer is not None:
                raise ValueError(
                    "Pass either optimizer= (copied for teacher and student) "
                    "or teacher_optimizer=/student_optimizer=, not both."
                )
            teacher_optimizer = optimizer
        teacher_optimizer = keras.optimizers.get(teacher_optimizer or "adam")
        if student_optimizer is None or student_optimizer is teacher_optimizer:
            student_optimizer = _clone_optimizer(teacher_optimizer)
        student_optimizer = keras.optimizers.get(student_optimizer)
        for name in ("loss_weights", "weighted_metrics"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"DKDPModel.compile does not take {name}: weigh the "
                    "losses with lambda_kd and student_hard_loss_weight."
                )
        self._loss_fn = _loss_object(loss)
        self._teacher_metrics = make_metrics(metrics, "teacher")
        self._student_metrics = make_metrics(metrics, "student")
        super().compile(optimizer=teacher_optimizer, jit_compile=jit_compile,
                        **kwargs)
        self.student_optimizer = student_optimizer
        teacher_optimizer.build(self.teacher.trainable_variables)
        student_optimizer.build(self.student.trainable_variables)
        self._compile_args = {
            "teacher_optimizer": teacher_optimizer,
            "student_optimizer": student_optimizer,
            "loss": loss,
            "metrics": metrics,
        }

    @property
    def teacher_optimizer(self):
        return self.optimizer

    def get_compile_config(self):
        if self._compile_args is None:
            return None
        return keras.saving.serialize_keras_object(self._compile_args)

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)

    @property
    def metrics(self):
        return (
            list(self._trackers)
            + list(self._teacher_metrics)
            + list(self._student_metrics)
        )

    # ----------------------------------------------------------------- call
    def call(self, inputs, training=False):
        model = self.student if self.serve == "student" else self.teacher
        return model(inputs, training=training)

    # ---------------------------------------------------------------- steps
    def _check_inputs(self, x):
        """At trace time, before any step runs: the data's examples must
        have the teacher's input shape."""
        if isinstance(x, dict):
            return
        given = list(x) if isinstance(x, (list, tuple)) else [x]
        wanted = self.teacher.inputs
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
                f"per example, but the teacher '{self.teacher.name}' takes "
                f"{expected[0] if len(expected) == 1 else expected}: x must "
                "hold examples of the teacher's input shape."
            )

    def _forward_losses(self, x, y, sample_weight, training):
        """Outputs and each replica's share of the three losses, and the
        labels and sample weights the student's output is read against.

        In training the student reads the first `student_batch_fraction`
        of the batch (`_head`); the teacher always reads all of it.

        Under a distribution strategy the optimizers sum the replicas'
        gradients. As in Keras' own training step, each loss is the
        replica's share of the global batch's value: a Keras loss with a
        mean reduction divides itself by the replica count, and a loss
        function (a string in a DistillationLoss) is divided here. One
        device: shares are the values.
        """
        t_out, t_feat = self._teacher_forward(x, training=training)
        teacher_loss = self._loss_fn(y, t_out, sample_weight=sample_weight)
        xs, ys, ws = x, y, sample_weight
        if training and self.student_batch_fraction < 1.0:
            xs, ys, ws, t_feat = _head(
                (x, y, sample_weight, t_feat), self.student_batch_fraction
            )
        s_out, s_feat = self._student_forward(xs, training=training)
        student_loss = self._loss_fn(ys, s_out, sample_weight=ws)
        target = t_feat if self.mutual else ops.stop_gradient(t_feat)
        kd = kd_value(self._kd, target, s_feat)
        if not _divides_itself(self._kd):
            kd = kd / _replicas()
        return t_out, s_out, teacher_loss, student_loss, kd, (ys, ws)

    def _update_metrics(self, y, t_out, s_out, sample_weight, teacher_loss,
                        student_loss, kd, student_truth=None):
        # Shares back to values, as Keras logs them.
        replicas = _replicas()
        teacher_loss, student_loss, kd = (
            teacher_loss * replicas, student_loss * replicas, kd * replicas
        )
        values = (teacher_loss + self.lambda_kd * kd, teacher_loss, kd,
                  student_loss)
        for tracker, value in zip(self._trackers, values):
            tracker.update_state(value)
        for metric in self._teacher_metrics:
            metric.update_state(y, t_out, sample_weight=sample_weight)
        ys, ws = student_truth or (y, sample_weight)
        for metric in self._student_metrics:
            metric.update_state(ys, s_out, sample_weight=ws)

    def _record(self, *args):
        self._update_metrics(*args)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        self._check_inputs(x)
        teacher_vars = self.teacher.trainable_variables
        student_vars = self.student.trainable_variables
        with tf.GradientTape(persistent=self.mutual) as tape:
            (t_out, s_out, teacher_loss, student_loss, kd,
             student_truth) = self._forward_losses(
                x, y, sample_weight, training=True
            )
            # Shares of the replica (see _forward_losses); regularisation
            # losses are whole on every replica, so they are divided too.
            replicas = _replicas()
            teacher_total = teacher_loss
            if self.teacher.losses:
                teacher_total = (
                    teacher_total + ops.sum(self.teacher.losses) / replicas
                )
            if self.mutual:
                teacher_total = teacher_total + self.lambda_kd * kd
            student_total = self.lambda_kd * kd
            if self.student_hard_loss_weight:
                student_total = (
                    student_total + self.student_hard_loss_weight * student_loss
                )
            if self.student.losses:
                student_total = (
                    student_total + ops.sum(self.student.losses) / replicas
                )
            both = teacher_total + student_total
        if self.mutual:
            teacher_grads = tape.gradient(teacher_total, teacher_vars)
            student_grads = tape.gradient(student_total, student_vars)
        else:
            # L_KD reaches the teacher through a stop_gradient, so the two
            # objectives touch disjoint variables: one backward pass of
            # their sum gives both gradients, and costs less than two.
            grads = tape.gradient(both, teacher_vars + student_vars)
            teacher_grads = grads[: len(teacher_vars)]
            student_grads = grads[len(teacher_vars):]
        del tape
        finite = _all_finite(
            [teacher_total, student_total] + teacher_grads + student_grads
        )

        # Statistics read the global batch's gradient, all-reduced here,
        # outside any branch (a collective cannot sit in one).
        statistics = self._statistics_gradients(teacher_grads)

        skip = self.on_nonfinite == "skip"
        metric_args = (y, t_out, s_out, sample_weight, teacher_loss,
                       student_loss, kd, student_truth)

        def update(teacher_grads, student_grads, statistics, metric_args):
            self._update_gradient_statistics(teacher_vars, statistics)
            self.optimizer.apply_gradients(
                [(g, v) for g, v in zip(teacher_grads, teacher_vars)
                 if g is not None]
            )
            self.student_optimizer.apply_gradients(
                [(g, v) for g, v in zip(student_grads, student_vars)
                 if g is not None]
            )
            if skip:
                self._update_metrics(*metric_args)
            return tf.constant(True)

        # A step whose losses or gradients are not finite applies nothing.
        _maybe_update(finite, update,
                      (teacher_grads, student_grads, statistics, metric_args))
        if skip:
            self._skipped.update_state(
                (1.0 - ops.cast(finite, "float32")) / replicas
            )
        else:
            # `fit` turns the failed check into a FloatingPointError. (XLA
            # drops assertions: with jit_compile=True the step is refused
            # all the same, and its NaN loss shows in the logs.)
            tf.debugging.Assert(finite, [_NONFINITE])
            self._update_metrics(*metric_args)
        return {m.name: m.result() for m in self.metrics}

    def fit(self, *args, **kwargs):
        # Bad labels and validation data, before the first step.
        _data_checks.check_fit(self, args, kwargs)
        # DKDPCallback validates the weight average on the data fit
        # validates on (a plain object attribute: Keras tracks none of it).
        object.__setattr__(self, "_fit_validation", fit_validation(*args, **kwargs))
        try:
            return super().fit(*args, **kwargs)
        except tf.errors.InvalidArgumentError as error:
            if _NONFINITE not in str(error):
                raise
            step = int(ops.convert_to_numpy(self.optimizer.iterations))
            raise FloatingPointError(
                f"DKDPModel: the losses or gradients of training step {step} "
                "hold NaN or Inf (NaN/Inf in the batch, or a diverging run). "
                "The step applied no update: weights, masks and optimizer "
                "states are those of the last good step. Check the data for "
                "NaN/Inf, lower the learning rate or clip gradients "
                "(optimizer clipnorm=1.0), or pass on_nonfinite='skip' to "
                "DKDPModel to skip such steps."
            ) from None

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        self._check_inputs(x)
        t_out, s_out, teacher_loss, student_loss, kd, _ = self._forward_losses(
            x, y, sample_weight, training=False
        )
        return self._record(y, t_out, s_out, sample_weight, teacher_loss,
                            student_loss, kd)

    def _statistics_gradients(self, grads):
        """The gradients the statistics read: under a distribution strategy
        the global batch's (the replicas' shares summed), the same on every
        replica, so the statistics are those of single-device training."""
        if not self._collect_gradients:
            return None
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return grads
        present = [i for i, g in enumerate(grads) if g is not None]
        summed = context.all_reduce(
            tf.distribute.ReduceOp.SUM, [grads[i] for i in present]
        )
        grads = list(grads)
        for i, g in zip(present, summed):
            grads[i] = g
        return grads

    def _update_gradient_statistics(self, variables, grads):
        """Fold the teacher's kernel gradients of L into its layers' running
        statistics (read by GradientMagnitude and Taylor)."""
        if not self._collect_gradients or grads is None:
            return
        index = {id(v): i for i, v in enumerate(variables)}
        for layer in masked_layers(self.teacher):
            if not layer.track_statistics:
                continue
            i = index.get(id(layer.kernel))
            if i is not None and grads[i] is not None:
                layer.update_gradient_statistics(grads[i])

    # --------------------------------------------------------------- config
    def get_config(self):
        kd_loss = self.kd_loss
        if not isinstance(kd_loss, str):
            kd_loss = keras.saving.serialize_keras_object(kd_loss)
        return {
            "name": self.name,
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "student": keras.saving.serialize_keras_object(self.student),
            "lambda_kd": self.lambda_kd,
            "temperature": self.temperature,
            "kd_loss": kd_loss,
            "student_hard_loss_weight": self.student_hard_loss_weight,
            "mutual": self.mutual,
            "student_width": self.student_width,
            "student_batch_fraction": self.student_batch_fraction,
            "serve": self.serve,
            "on_nonfinite": self.on_nonfinite,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("teacher", "student"):
            # A Sequential rebuilt from its config calls its first layers
            # once per layer added; a rewired copy has one graph, which the
            # graph readers (compaction, output units) need.
            config[key] = rewired(
                keras.saving.deserialize_keras_object(config[key])
            )
        if isinstance(config.get("kd_loss"), dict):
            config["kd_loss"] = keras.saving.deserialize_keras_object(
                config["kd_loss"]
            )
        return cls(**config)
