"""Continual learning for `DKDPModel`: learning new classes under the same
budget without forgetting the old ones (class-incremental: one output
layer, no task id at test time).

`DKDPModel.next_task(x, y)` is called between tasks with the data of the
task just learnt. It freezes a copy of the teacher as it is (`previous`:
the compacted teacher, the same outputs), replaces the masked teacher by
its compacted copy (the units it pruned are gone: the next task trains
the network the budget kept), adds the labels of `y` to the old classes,
and keeps a class-balanced random replay buffer of `x`. While the
next task trains, both networks also match `previous`'s outputs on the old
classes, on every example of the batch, new or replayed (Learning without
Forgetting, Li & Hoiem 2016, with iCaRL's exemplar replay, Rebuffi et al.
2017):

    L_old = T² · KL(softmax(z_p[:, O] / T) ‖ softmax(z[:, O] / T))

added with weight `lambda_old` to the teacher's and the student's
objectives. At the end of each `fit`, the output weights of the classes
trained since `next_task` are scaled to the old classes' mean norm
(Weight Aligning, Zhao et al. 2020): a head trained mostly on new classes
has larger weights for them, and calls old images new. `align` below 1
scales them part of the way (by g**align): how far sets the balance
between old and new classes, a point on one curve (measured for every
strength by benchmarks/continual_frontier.py). The budget is held
by DKDPCallback as in any fit; the masks keep their values.
"""

import keras
import numpy as np
from keras import ops

from dkdp_keras import _validation, distribute, regrowth
from dkdp_keras.compaction import compact
from dkdp_keras.distillation import feature_layer_names, prunable_teacher
from dkdp_keras.graph import rewired
from dkdp_keras.training import Forward, batch_head, clone_optimizer, untrack

#: What `DKDPModel.get_config` keeps of the continual mode, besides the
#: frozen previous model.
SETTINGS = ("old_classes", "lambda_old", "temperature", "align", "ewc")


class ReplayBuffer:
    """A class-balanced sample of earlier tasks' examples, and the data of
    the next task mixed with it.

    Attributes:
        x, y: the buffer's examples and labels (numpy).
        classes: the classes it holds, sorted.
    """

    def __init__(self, x, y):
        self.x, self.y = np.asarray(x), np.asarray(y)
        self.classes = sorted(int(c) for c in np.unique(_class_ids(self.y)))

    @classmethod
    def select(cls, x, y, size, seed=0):
        """`size` examples of `(x, y)`, ⌊size / classes⌋ drawn at random from
        each class (a class with fewer gives all it has), the remainder from
        the first classes in order."""
        x, y = np.asarray(x), np.asarray(y)
        ids = _class_ids(y)
        classes = np.unique(ids)
        rng = np.random.default_rng(seed)
        share, extra = divmod(int(size), len(classes))
        keep = []
        for i, c in enumerate(classes):
            members = np.flatnonzero(ids == c)
            take = min(len(members), share + (i < extra))
            keep.append(np.sort(rng.choice(members, take, replace=False)))
        keep = np.concatenate(keep)
        return cls(x[keep], y[keep])

    def __len__(self):
        return len(self.y)

    def mix(self, x, y, batch_size=32, seed=0):
        """A repeated, shuffled `tf.data` pipeline of `(x, y)` and the buffer
        together, reshuffled every epoch; pass `steps_per_epoch=
        buffer.steps(x, batch_size)` to `fit`."""
        import tensorflow as tf

        x_all = np.concatenate([np.asarray(x), self.x])
        y_all = np.concatenate([np.asarray(y), self.y])
        ds = tf.data.Dataset.from_tensor_slices((x_all, y_all))
        ds = ds.shuffle(len(y_all), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size).repeat().prefetch(tf.data.AUTOTUNE)

    def steps(self, x, batch_size=32):
        """Steps of one epoch over `x` and the buffer."""
        return int(np.ceil((len(x) + len(self)) / batch_size))


def _class_ids(y):
    """Class indices of sparse or one-hot labels."""
    y = np.asarray(y)
    if y.ndim > 1 and y.shape[-1] > 1:
        return y.argmax(-1)
    return y.reshape(len(y)).astype("int64")


def old_class_distillation(previous_logits, logits, classes, temperature):
    """T²·KL(softmax(z_p[:, O]/T) ‖ softmax(z[:, O]/T)), the mean over the
    batch; under a distribution strategy the replica's share."""
    p = ops.take(previous_logits, classes, axis=1) / temperature
    z = ops.take(logits, classes, axis=1) / temperature
    target = ops.softmax(p, axis=-1)
    kl = ops.sum(target * (ops.log_softmax(p, axis=-1) - ops.log_softmax(z, axis=-1)), axis=-1)
    return temperature ** 2 * ops.mean(kl) / distribute.replicas()


class Anchors(keras.layers.Layer):
    """What the EWC penalty reads: each trainable variable's value at the
    end of the task before (`anchors`) and its diagonal Fisher information
    there (`fisher`), for the teacher's variables then the student's. A
    layer, so that a `.keras` file keeps them."""

    def __init__(self, shapes, **kwargs):
        super().__init__(**kwargs)
        self.anchors = [self.add_weight(shape=shape, initializer="zeros", trainable=False,
                                        name=f"anchor_{i}") for i, shape in enumerate(shapes)]
        self.fisher = [self.add_weight(shape=shape, initializer="zeros", trainable=False,
                                       name=f"fisher_{i}") for i, shape in enumerate(shapes)]
        self.built = True


def fisher_information(network, loss_fn, x, y, samples, seed=0):
    """The diagonal empirical Fisher information of `network`'s trainable
    variables: the mean, over `samples` examples of `(x, y)` drawn at
    random, of each squared per-example gradient of `loss_fn`."""
    import tensorflow as tf

    x, y = np.asarray(x), np.asarray(y)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(y), min(int(samples), len(y)), replace=False))
    variables = network.trainable_variables
    totals = [tf.Variable(tf.zeros(v.shape, "float32"), trainable=False) for v in variables]

    @tf.function
    def add(xi, yi):
        with tf.GradientTape() as tape:
            loss = loss_fn(yi, network(xi, training=False))
        for total, grad in zip(totals, tape.gradient(loss, variables)):
            if grad is not None:
                total.assign_add(ops.square(ops.cast(grad, "float32")))

    for i in pick:
        add(x[i:i + 1], y[i:i + 1])
    return [ops.convert_to_numpy(t) / len(pick) for t in totals]


def ewc_penalty(model, part):
    """(ewc / 2) · Σ F·(θ - θ*)² over the trainable variables of `part`
    ("teacher" or "student"), whose anchors follow the teacher's in
    `model._anchors`; the replica's share under a distribution strategy."""
    variables = getattr(model, part).trainable_variables
    start = 0 if part == "teacher" else len(model.teacher.trainable_variables)
    anchors = model._anchors.anchors[start:start + len(variables)]
    fisher = model._anchors.fisher[start:start + len(variables)]
    total = 0.0
    for variable, anchor, weight in zip(variables, anchors, fisher):
        total = total + ops.sum(weight * ops.square(variable - anchor))
    return 0.5 * model.continual["ewc"] * total / distribute.replicas()


def check_settings(lambda_old, temperature, align, buffer_size, ewc=0.0, fisher_samples=1):
    _validation.number("lambda_old", lambda_old, low=0.0)
    _validation.number("ewc", ewc, low=0.0)
    _validation.number("fisher_samples", fisher_samples, low=1, integer=True)
    _validation.number("temperature", temperature, low=0.0, low_open=True)
    if not isinstance(align, bool):
        _validation.number("align (True, False or a strength in [0, 1])", align,
                           low=0.0, high=1.0)
    _validation.number("buffer_size", buffer_size, low=0, integer=True)


def start(model, x, y, buffer_size, lambda_old, temperature, align, seed, replay,
          ewc=100.0, fisher_samples=1000, regrow=None):
    """What `DKDPModel.next_task` does; returns the new replay buffer."""
    check_settings(lambda_old, temperature, align, buffer_size, ewc, fisher_samples)
    if regrow is not None:
        regrowth.check_budget(regrow, "next_task(regrow=...)")
    if ewc and getattr(model, "_loss_fn", None) is None:
        raise ValueError(
            "next_task(ewc=...) measures the Fisher information with the "
            "model's loss: compile the DKDPModel before calling next_task.")
    outputs = int(model.teacher.outputs[0].shape[-1])
    seen = np.unique(_class_ids(y))
    if len(y) == 0 or seen.min() < 0 or seen.max() >= outputs:
        raise ValueError(
            f"next_task(x, y): y must hold class labels in 0..{outputs - 1} (the "
            f"teacher has {outputs} outputs), got {seen.tolist()[:10]}."
        )
    before = model.continual["old_classes"] if model.continual else []
    old = sorted(set(before) | {int(c) for c in seen})
    if len(old) == outputs:
        raise ValueError(
            f"next_task: after this task every one of the {outputs} classes is "
            "old, and no output is left for a new class: class-incremental "
            "learning needs an output layer with room for the new classes."
        )
    if replay is not None:
        x = np.concatenate([np.asarray(x), replay.x])
        y = np.concatenate([np.asarray(y), replay.y])
    buffer = ReplayBuffer.select(x, y, buffer_size, seed=seed)
    previous = compact(model.teacher)
    if regrow is not None:
        regrowth.regrow(model.teacher, regrow, seed=seed)
    compact_teacher(model)
    previous.trainable = False
    set_state(model, previous, {"old_classes": old, "lambda_old": float(lambda_old),
                                "temperature": float(temperature), "align": align,
                                "ewc": float(ewc)})
    if ewc:
        # On the task just learnt and the earlier tasks' buffer (`x` holds
        # both): the anchors replace those of the task before.
        anchors, fisher = [], []
        for network in (model.teacher, model.student):
            anchors += [ops.convert_to_numpy(v) for v in network.trainable_variables]
            fisher += fisher_information(network, model._loss_fn, x, y, fisher_samples, seed)
        for variable, value in zip(model._anchors.anchors + model._anchors.fisher,
                                   anchors + fisher):
            variable.assign(value)
    return buffer


def compact_teacher(model):
    """Replace `model`'s masked teacher by its compacted copy, made
    prunable again (every mask one), with a teacher optimizer for its
    variables (fresh state, same configuration). The next task trains
    exactly the network the budget kept. Measured (seed 0 of
    benchmarks/continual.py, LwF on the teacher alone): training the
    masked teacher kept 39.7% of the old classes, its compacted copy 58.3%;
    DKDP's continual mode 36.6% against 53.3%."""
    # Compacted again, not `previous` made prunable: `prunable` keeps the
    # layers it cannot mask, so the two would share their weights.
    teacher = prunable_teacher(compact(model.teacher))
    untrack(model, model.teacher)
    model.teacher = teacher
    model._teacher_forward = Forward(teacher, feature_layer_names(model._kd)[0])
    if model.compiled:
        optimizer = clone_optimizer(model.optimizer)
        optimizer.build(teacher.trainable_variables)
        untrack(model, model.optimizer)
        model.optimizer = optimizer
        model._compile_args["teacher_optimizer"] = optimizer


def set_state(model, previous, settings):
    """Install `previous` (frozen) and the settings on `model`, with the
    count of labels seen since (for the aligning) and the `old_kd_loss`
    log; rebuild its steps."""
    # Keras saves sub-models in the order they were tracked, and
    # `from_config` tracks teacher, student, previous: so must we.
    for network in (model.teacher, model.student, model.previous,
                    getattr(model, "_anchors", None)):
        if network is not None:
            untrack(model, network)
    model.teacher, model.student = model.teacher, model.student
    model.previous = previous
    settings = {"ewc": 0.0, **settings}  # files written before EWC have none
    settings["align"] = float(settings["align"])  # a strength; once True/False
    model.continual = dict(settings)
    model._anchors = None
    if settings["ewc"]:
        shapes = [tuple(v.shape) for network in (model.teacher, model.student)
                  for v in network.trainable_variables]
        model._anchors = Anchors(shapes, name="ewc_anchors")
    outputs = int(model.teacher.outputs[0].shape[-1])
    if getattr(model, "_seen_labels", None) is None:
        model._seen_labels = model.add_weight(shape=(outputs,), initializer="zeros",
                                              trainable=False, name="seen_labels")
    model._seen_labels.assign(np.zeros(outputs, "float32"))
    if model._old_kd is None:
        model._old_kd = keras.metrics.Mean(name="old_kd_loss")
    if model.compiled:
        model.make_train_function(force=True)


def add_terms(model, x, y, t_out, s_out, teacher_total, student_total):
    """The objectives with `lambda_old`·L_old added: the teacher's on the
    batch, the student's on its head of the batch; counts the labels and
    logs the teacher's L_old as `old_kd_loss`."""
    settings = model.continual
    classes = np.asarray(settings["old_classes"], "int32")
    temperature, weight = settings["temperature"], settings["lambda_old"]
    target = model.previous(x, training=False)
    teacher_old = old_class_distillation(target, t_out, classes, temperature)
    if model.student_batch_fraction < 1.0:
        target = batch_head(target, model.student_batch_fraction)
    student_old = old_class_distillation(target, s_out, classes, temperature)
    outputs = model._seen_labels.shape[0]
    if len(y.shape) > 1 and y.shape[-1] == outputs and outputs > 1:
        counts = ops.sum(ops.cast(y, "float32"), axis=0)
    else:
        labels = ops.reshape(ops.cast(y, "int32"), (-1,))
        counts = ops.sum(ops.one_hot(labels, outputs), axis=0)
    model._seen_labels.assign_add(counts)
    model._old_kd.update_state(teacher_old * distribute.replicas())
    teacher_total = teacher_total + weight * teacher_old
    student_total = student_total + weight * student_old
    if model._anchors is not None:
        teacher_total = teacher_total + ewc_penalty(model, "teacher")
        student_total = student_total + ewc_penalty(model, "student")
    return teacher_total, student_total


def get_config(model):
    """The continual mode's part of `DKDPModel.get_config`."""
    return {**{key: model.continual[key] for key in SETTINGS},
            "previous": keras.saving.serialize_keras_object(model.previous)}


def from_config(model, config):
    """Restore the continual mode of `get_config` on a rebuilt model."""
    config = dict(config)
    previous = rewired(keras.saving.deserialize_keras_object(config.pop("previous")))
    previous.trainable = False
    set_state(model, previous, config)


def output_layer(network):
    """The last layer of `network` with a 2-D kernel as wide as its output."""
    outputs = int(network.outputs[0].shape[-1])
    for layer in reversed(network.layers):
        kernel = getattr(layer, "kernel", None)
        if kernel is not None and len(kernel.shape) == 2 and kernel.shape[-1] == outputs:
            return layer
    raise ValueError(
        f"continual align: {network.name} has no Dense output layer with "
        f"{outputs} units to align; pass align=False to next_task."
    )


def alignment_gain(layer, old, new):
    """The factor that brings the mean norm of the output kernel's columns
    weighted by `new` (0/1 per class) to that of the columns weighted by
    `old`, with the layer's mask applied; 1 when the new columns are all
    zero."""
    kernel = layer.kernel
    mask = getattr(layer, "kernel_mask", None)
    if mask is not None:
        kernel = kernel * mask
    norms = ops.sqrt(ops.sum(ops.square(kernel), axis=0))
    old_norm = ops.sum(norms * old) / ops.maximum(ops.sum(old), 1.0)
    new_norm = ops.sum(norms * new) / ops.maximum(ops.sum(new), 1.0)
    return ops.where(new_norm > 0, old_norm / ops.maximum(new_norm, 1e-12), 1.0)


def _indicator(classes, outputs):
    weights = np.zeros(outputs, "float32")
    weights[np.asarray(classes, "int64")] = 1.0
    return weights


def align_classes(network, old, new, strength=1.0):
    """Scale the output kernel's columns of the classes `new` by g**strength,
    g the factor that brings their mean norm to that of `old` (zeros stay
    zeros: masks and budget are untouched): 1 aligns them fully, 0 leaves
    them. Returns the factor applied."""
    layer = output_layer(network)
    outputs = int(layer.kernel.shape[-1])
    gain = float(ops.convert_to_numpy(
        alignment_gain(layer, _indicator(old, outputs), _indicator(new, outputs)))) ** strength
    kernel = ops.convert_to_numpy(layer.kernel)
    kernel[:, new] *= gain
    layer.kernel.assign(kernel)
    return gain


def aligned_logits(model, logits):
    """The teacher's `logits` as aligning would leave them at this step:
    z_c + (g - 1)(z_c - b_c) for each class c trained since `next_task`,
    g the factor `align_classes` would apply now (at the mode's `align`
    strength), b_c the output bias.

    The student distils these in continual mode. The teacher learns the
    new classes mostly from their own examples, its new logits run high,
    and a student copying them calls old images new; aligning the
    student afterwards does not undo it (measured, seed 0 of
    benchmarks/continual.py: all-class 62.7% with the teacher's own
    logits, 71.5% with these). Exact when the teacher's last layer is its
    linear Dense output and the distillation reads that output; otherwise
    (or with `align=False`) `logits` are returned as they are."""
    layer = output_layer(model.teacher)
    linear = getattr(layer, "activation", None) in (None, keras.activations.linear)
    if (not model.continual["align"] or model.teacher.layers[-1] is not layer
            or not linear or feature_layer_names(model._kd)[0] is not None):
        return logits
    old = _indicator(model.continual["old_classes"], int(logits.shape[-1]))
    new = ops.cast(model._seen_labels > 0, "float32") * (1.0 - old)
    gain = alignment_gain(layer, old, new) ** model.continual["align"]
    bias = layer.bias if getattr(layer, "bias", None) is not None else 0.0
    # The student's loss must not reach the teacher through the gain or
    # the bias (only through `logits`, and only when they carry a gradient).
    gain, bias = ops.stop_gradient(gain), ops.stop_gradient(bias)
    return logits + new * (gain - 1.0) * (logits - bias)


def finish_fit(model):
    """After a continual fit: align the classes trained since `next_task`."""
    if model.previous is None or not model.continual["align"]:
        return
    seen = ops.convert_to_numpy(model._seen_labels) > 0
    old = np.asarray(model.continual["old_classes"])
    new = np.setdiff1d(np.flatnonzero(seen), old)
    if len(new):
        for network in (model.teacher, model.student):
            align_classes(network, old, new, model.continual["align"])
