"""What DKDPModel's training step needs under a `tf.distribute` strategy:
the replica count, each replica's share of a loss, a finiteness test and an
update that every replica takes or skips together, the global batch's
gradients, and the refusal of several workers. Outside a strategy each of
these is the single-device computation."""

import keras
import tensorflow as tf
from keras import ops

#: Reductions with which a Keras loss divides itself by the replica count.
MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


def replicas():
    """Replicas training in sync (1 outside a distribution strategy)."""
    context = tf.distribute.get_replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def refuse_several_workers(strategy):
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


def divides_itself(loss):
    """True when `loss` returns its replica's share under a distribution
    strategy: a Keras Loss with a mean reduction (Keras divides it by the
    replica count), or a DistillationLoss made of such losses only."""
    if isinstance(loss, keras.losses.Loss):
        return getattr(loss, "reduction", None) in MEAN_REDUCTIONS
    parts = [p for p in keras.tree.flatten(getattr(loss, "loss", None))
             if p is not None]
    return bool(parts) and all(divides_itself(p) for p in parts)


def all_finite(tensors):
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


def maybe_update(finite, update, args):
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


def global_gradients(grads):
    """The global batch's gradients: under a distribution strategy the
    replicas' shares summed, the same on every replica (so that statistics
    read from them are those of single-device training); else `grads`.
    None entries stay None."""
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
