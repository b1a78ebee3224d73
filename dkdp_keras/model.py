"""DKDPModel: teacher and student trained together, L + λ·L_KD, in one step."""

import keras
import tensorflow as tf
from keras import ops

from dkdp_keras import _data_checks, _validation, distribute
from dkdp_keras import continual as _continual
from dkdp_keras.compaction import ALIGN, compact
from dkdp_keras.counting import set_reference
from dkdp_keras.distillation import (
    check_hyperparameters,
    check_refresh_strategy,
    feature_layer_names,
    get_kd_loss,
    make_metrics,
    make_student,
    prunable_teacher,
)
from dkdp_keras.graph import rewired
from dkdp_keras.state import pruning_state
from dkdp_keras.step import forward_losses, update_metrics
from dkdp_keras.training import (
    Forward,
    apply_gradients,
    check_inputs,
    clone_optimizer,
    compile_optimizers,
    fit_input_shape,
    fit_validation,
    fold_gradients,
    objectives,
    select_statistics,
    task_loss,
    two_gradients,
    untrack,
)

SERVE = ("student", "teacher")
ON_NONFINITE = ("raise", "skip")
#: DKDPModel's arguments that its config holds as they are.
_ARGUMENTS = ("lambda_kd", "temperature", "kd_loss", "student_hard_loss_weight",
              "mutual", "student_width", "student_batch_fraction", "serve",
              "on_nonfinite")
#: Marks the in-graph assertion that `fit` turns into a FloatingPointError.
_NONFINITE = "DKDP_NONFINITE_STEP"


def _trackers(on_nonfinite):
    """The logged losses (`logged_values`, in order), and the
    count of `skipped_steps` when `on_nonfinite` is "skip"."""
    trackers = [
        keras.metrics.Mean(name=name)
        for name in ("loss", "teacher_loss", "kd_loss", "student_loss")
    ]
    if on_nonfinite == "skip":
        trackers.append(keras.metrics.Sum(name="skipped_steps"))
    return trackers


def _nonfinite_error(step):
    """What `fit` raises when training step `step` was refused."""
    return FloatingPointError(
        f"DKDPModel: the losses or gradients of training step {step} "
        "hold NaN or Inf (NaN/Inf in the batch, or a diverging run). "
        "The step applied no update: weights, masks and optimizer "
        "states are those of the last good step. Check the data for "
        "NaN/Inf, lower the learning rate or clip gradients "
        "(optimizer clipnorm=1.0), or pass on_nonfinite='skip' to "
        "DKDPModel to skip such steps."
    )


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
            on the labels (1.0 with λ=1: `keras.distillation.Distiller`'s
            even mix). With 0 the student learns from the teacher alone,
            which is being pruned and, early on, untrained.
        mutual: if True, the distillation loss also trains the teacher
            (deep mutual learning); otherwise the target is a stop-gradient.
        student_width: width factor of the "auto" student, in (0, 1]:
            the share of units its narrowed layers keep. Wider students
            can learn more and make each step dearer.
        student_batch_fraction: the student trains on the first
            ceil(fraction · batch) examples of each (shuffled) batch, in
            (0, 1]; the teacher always on all of it. Below 1 the step is
            cheaper (a small student costs more than its FLOPs on CPU), at
            a small cost in the student's accuracy. Under a distribution
            strategy, of each replica's share (other examples than on one
            device).
        serve: "student" (default) or "teacher": what `call` and `predict`
            return. `model.teacher.predict(x)` always serves the teacher.
        on_nonfinite: what a training step whose losses or gradients hold
            NaN or Inf does. It applies no update either way (weights, masks,
            optimizer states and statistics stay those of the last good
            step); "raise" (default) then stops `fit` with a
            `FloatingPointError` (with `jit_compile=True`, which drops
            assertions, the NaN loss shows in the logs instead), "skip" goes
            on and counts such steps in the `skipped_steps` log.

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
            student_width, student_batch_fraction,
        )
        _validation.choice("serve", serve, SERVE)
        _validation.choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
        teacher = prunable_teacher(teacher)
        self.lambda_kd = float(lambda_kd)
        self.temperature = float(temperature)
        self.kd_loss = kd_loss
        self.student_hard_loss_weight = float(student_hard_loss_weight)
        self.mutual = mutual
        self.student_width = float(student_width)
        self.student_batch_fraction = float(student_batch_fraction)
        self.serve = serve
        self.on_nonfinite = on_nonfinite
        self._kd = get_kd_loss(kd_loss, temperature)
        self.teacher = teacher
        self.student = self._make_student(student)
        self._trackers = _trackers(on_nonfinite)
        if on_nonfinite == "skip":
            self._skipped = self._trackers[-1]
        self._teacher_metrics = []
        self._student_metrics = []
        self._compile_args = None
        self._collect_gradients = True
        # DKDPCallback's state (events, τ, the adaptive controller): in
        # `.keras` files and checkpoints with the weights (dkdp_keras.state).
        pruning_state(self)
        # The continual mode's frozen copy and settings (`next_task`).
        self.previous, self.continual, self._seen_labels, self._old_kd = None, None, None, None
        self._anchors = None  # the EWC penalty's (next_task(ewc=...))
        self.built = True

    # -------------------------------------------------------------- student
    def _make_student(self, student):
        made = make_student(self.teacher, student, self.student_width)
        teacher_layer, student_layer = feature_layer_names(self._kd)
        self._teacher_forward = Forward(self.teacher, teacher_layer)
        self._student_forward = Forward(made, student_layer)
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
        configuration, fresh state) and the student's metrics start afresh;
        the teacher and its optimizer are untouched.
        """
        check_refresh_strategy(strategy)
        new = strategy
        if isinstance(strategy, str):
            new = "auto" if strategy == "width" else compact
        student = self._make_student(new)
        untrack(self, self.student)
        self.student = student
        if self.compiled:
            optimizer = clone_optimizer(self.student_optimizer)
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
        changed = select_statistics(self.teacher, kinds, gradient_statistics)
        changed |= self._collect_gradients != ("gradient" in kinds)
        self._collect_gradients = "gradient" in kinds
        if changed and self.compiled:
            self.make_train_function(force=True)

    def next_task(self, x, y, buffer_size=500, lambda_old=3.0, temperature=2.0,
                  align=True, replay=None, seed=0, ewc=100.0, fisher_samples=1000,
                  regrow=None):
        """Move on to new classes without forgetting those of `(x, y)`, the
        task just learnt (`dkdp_keras.continual`): freezes the teacher as it
        is, and from now on both networks also distil its outputs on the
        old classes (weight `lambda_old`, temperature `temperature`), and
        each `fit` ends by aligning the new classes' output weights
        (`align`: True, False, or a strength in [0, 1], the share of the
        way to the old classes' mean norm, in log scale: lower keeps more
        of the new classes and less of the old; the student distils the
        teacher's logits aligned as far). `ewc` > 0 also pulls each weight back to its value now,
        in proportion to its Fisher information on `fisher_samples`
        examples of `(x, y)` (EWC; 0 turns it off; the defaults were
        chosen on validation images in benchmarks/continual.py). `replay`:
        the buffer of the tasks before, which the new one is drawn from
        too. Returns a class-balanced `continual.ReplayBuffer` of
        `buffer_size` examples: train the next task on
        `buffer.mix(x_new, y_new, batch_size)`. `regrow`: a
        `dkdp_keras.Budget` (the one DKDPCallback holds next): pruned units
        of the teacher come back with fresh weights, as many as it allows,
        before it is compacted (`dkdp_keras.regrowth`; the outputs do not
        change)."""
        return _continual.start(self, x, y, buffer_size, lambda_old, temperature,
                                align, seed, replay, ewc, fisher_samples, regrow)

    def compact_teacher(self, align=ALIGN):
        """The pruned teacher as a plain, physically smaller Keras model
        (`dkdp_keras.compact`, widths aligned to multiples of `align`):
        removed units are gone, masks baked in."""
        return compact(self.teacher, align=align)

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
        distribute.refuse_several_workers(self.distribute_strategy)
        teacher_optimizer, student_optimizer = compile_optimizers(
            teacher_optimizer, student_optimizer, optimizer, kwargs
        )
        self._loss_fn = task_loss(loss)
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
        return (list(self._trackers) + list(self._teacher_metrics)
                + list(self._student_metrics) + [m for m in [self._old_kd] if m])

    # ----------------------------------------------------------------- call
    def call(self, inputs, training=False):
        model = self.student if self.serve == "student" else self.teacher
        return model(inputs, training=training)

    # ---------------------------------------------------------------- steps
    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        check_inputs(self.teacher, x)
        teacher_vars = self.teacher.trainable_variables
        student_vars = self.student.trainable_variables
        with tf.GradientTape(persistent=self.mutual) as tape:
            (t_out, s_out, teacher_loss, student_loss, kd,
             student_truth) = forward_losses(self, x, y, sample_weight, training=True)
            replicas = distribute.replicas()
            teacher_total, student_total = objectives(
                teacher_loss, student_loss, kd, self.lambda_kd,
                self.student_hard_loss_weight, self.mutual,
                self.teacher.losses, self.student.losses, replicas,
            )
            if self.previous is not None:  # continual: the old classes' outputs
                teacher_total, student_total = _continual.add_terms(
                    self, x, y, t_out, s_out, teacher_total, student_total)
            both = teacher_total + student_total
        teacher_grads, student_grads = two_gradients(
            tape, teacher_total, student_total, both, teacher_vars,
            student_vars, self.mutual,
        )
        del tape
        finite = distribute.all_finite(
            [teacher_total, student_total] + teacher_grads + student_grads
        )

        # Statistics read the global batch's gradient, all-reduced here,
        # outside any branch (a collective cannot sit in one).
        statistics = (distribute.global_gradients(teacher_grads)
                      if self._collect_gradients else None)

        skip = self.on_nonfinite == "skip"
        metric_args = (y, t_out, s_out, sample_weight, teacher_loss,
                       student_loss, kd, student_truth)

        def update(teacher_grads, student_grads, statistics, metric_args):
            fold_gradients(self.teacher, teacher_vars, statistics)
            apply_gradients(self.optimizer, teacher_grads, teacher_vars)
            apply_gradients(self.student_optimizer, student_grads, student_vars)
            if skip:
                update_metrics(self, *metric_args)
            return tf.constant(True)

        # A step whose losses or gradients are not finite applies nothing.
        distribute.maybe_update(finite, update,
                                 (teacher_grads, student_grads, statistics,
                                  metric_args))
        if skip:
            self._skipped.update_state(
                (1.0 - ops.cast(finite, "float32")) / replicas
            )
        else:
            # `fit` turns the failed check into a FloatingPointError. (XLA
            # drops assertions: with jit_compile=True the step is refused
            # all the same, and its NaN loss shows in the logs.)
            tf.debugging.Assert(finite, [_NONFINITE])
            update_metrics(self, *metric_args)
        return {m.name: m.result() for m in self.metrics}

    def fit(self, *args, **kwargs):
        # Bad labels and validation data, before the first step.
        _data_checks.check_fit(self, args, kwargs)
        # DKDPCallback validates the weight average on the data fit
        # validates on (a plain object attribute: Keras tracks none of it).
        object.__setattr__(self, "_fit_validation", fit_validation(*args, **kwargs))
        shape = fit_input_shape(*args, **kwargs)
        if shape is not None:  # MACs of layers with None dimensions
            for network in (self.teacher, self.student):
                set_reference(network, shape)
        try:
            history = super().fit(*args, **kwargs)
        except tf.errors.InvalidArgumentError as error:
            if _NONFINITE not in str(error):
                raise
            step = int(ops.convert_to_numpy(self.optimizer.iterations))
            raise _nonfinite_error(step) from None
        _continual.finish_fit(self)
        return history

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        check_inputs(self.teacher, x)
        t_out, s_out, teacher_loss, student_loss, kd, _ = forward_losses(
            self, x, y, sample_weight, training=False
        )
        update_metrics(self, y, t_out, s_out, sample_weight, teacher_loss,
                       student_loss, kd)
        return {m.name: m.result() for m in self.metrics}

    # --------------------------------------------------------------- config
    def get_config(self):
        config = {
            "name": self.name,
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "student": keras.saving.serialize_keras_object(self.student),
            **{key: getattr(self, key) for key in _ARGUMENTS},
        }
        if not isinstance(self.kd_loss, str):
            config["kd_loss"] = keras.saving.serialize_keras_object(self.kd_loss)
        if self.previous is not None:
            config["continual"] = _continual.get_config(self)
        return config

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
        continual = config.pop("continual", None)
        model = cls(**config)
        if continual is not None:
            _continual.from_config(model, continual)
        return model
