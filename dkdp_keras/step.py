"""DKDPModel's forward pass and its logged values, shared by its training
and test steps: the outputs and losses of teacher and student on a batch,
and the metrics that record them."""

from keras import ops

from dkdp_keras import continual, distribute
from dkdp_keras.distillation import kd_value
from dkdp_keras.training import batch_head, logged_values


def forward_losses(model, x, y, sample_weight, training):
    """Outputs and each replica's share of the three losses, and the
    labels and sample weights the student's output is read against.

    In training the student reads the first `student_batch_fraction`
    of the batch (`batch_head`); the teacher always reads all of it.

    Under a distribution strategy each loss is the replica's share of
    the global batch's value (`dkdp_keras.training`): a Keras loss with
    a mean reduction divides itself by the replica count, a loss
    function (a string in a DistillationLoss) is divided here.
    """
    t_out, t_feat = model._teacher_forward(x, training=training)
    teacher_loss = model._loss_fn(y, t_out, sample_weight=sample_weight)
    xs, ys, ws = x, y, sample_weight
    if training and model.student_batch_fraction < 1.0:
        xs, ys, ws, t_feat = batch_head(
            (x, y, sample_weight, t_feat), model.student_batch_fraction
        )
    s_out, s_feat = model._student_forward(xs, training=training)
    student_loss = model._loss_fn(ys, s_out, sample_weight=ws)
    target = t_feat if model.mutual else ops.stop_gradient(t_feat)
    if model.previous is not None:  # continual: as aligning will leave them
        target = continual.aligned_logits(model, target)
    kd = kd_value(model._kd, target, s_feat)
    if not distribute.divides_itself(model._kd):
        kd = kd / distribute.replicas()
    return t_out, s_out, teacher_loss, student_loss, kd, (ys, ws)


def update_metrics(model, y, t_out, s_out, sample_weight, teacher_loss,
                   student_loss, kd, student_truth=None):
    """The logged losses (`logged_values`) and each network's metrics."""
    values = logged_values(teacher_loss, student_loss, kd, model.lambda_kd,
                           distribute.replicas())
    for tracker, value in zip(model._trackers, values):
        tracker.update_state(value)
    for metric in model._teacher_metrics:
        metric.update_state(y, t_out, sample_weight=sample_weight)
    ys, ws = student_truth or (y, sample_weight)
    for metric in model._student_metrics:
        metric.update_state(ys, s_out, sample_weight=ws)
