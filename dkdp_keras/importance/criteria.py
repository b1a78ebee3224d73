"""Importance criteria I(θ_i) = f(θ_i), each a small class named after what
it computes. Scores are non-negative; larger means more important."""

import numpy as np
from keras import ops

from dkdp_keras import _validation
from dkdp_keras.importance.base import Criterion
from dkdp_keras.prunable import masked_layers


class Magnitude(Criterion):
    """|w|: the absolute value of each kept kernel entry (Han et al. 2015).

    Per unit: the L1 norm of the unit's kernel slice (Li et al. 2017,
    "Pruning Filters for Efficient ConvNets").

    Example:

    >>> layer = dkdp_keras.MaskedDense(2); _ = layer(keras.ops.ones((1, 3)))
    >>> tuple(Magnitude().score(layer, "unit").shape)
    (2,)
    """

    def _weight_scores(self, layer):
        return ops.abs(layer.effective_kernel())


class GradientMagnitude(Criterion):
    """Running mean of |∂L/∂w| over training steps.

    Per unit: the sum over the unit's kernel slice. Reads the gradient
    statistics that the DKDP training step (or `collect_gradients`) keeps.
    """

    requires = ("gradient",)

    def gradient_statistics(self, granularity):
        return ("gradient_abs",)

    def _weight_scores(self, layer):
        return layer.gradient_abs


class Taylor(Criterion):
    """First-order Taylor estimate of the loss change when θ is removed
    (Molchanov et al. 2017, 2019).

    Per weight: the running mean of |w · g|. Per unit: the running mean of
    (Σ_{i in unit} w_i · g_i)², the squared sum over the unit's weights
    (Molchanov et al. 2019, eq. 7 for a whole filter).
    """

    requires = ("gradient",)

    def gradient_statistics(self, granularity):
        return ("taylor",) if granularity == "weight" else ("taylor_unit",)

    def _weight_scores(self, layer):
        return layer.taylor

    def _unit_scores(self, layer):
        return layer.taylor_unit


class ActivationFrequency(Criterion):
    """How active each unit's output is over the training data.

    Args:
        statistic: "nonzero" (default): the fraction of the unit's outputs
            that are non-zero after its activation, i.e. 1 − APoZ
            (Hu et al. 2016, "Network Trimming"). For a layer with a linear
            activation (such as a convolution followed by BatchNorm and ReLU)
            it is the fraction of positive outputs, what a following ReLU
            would pass. "mean_abs": the mean absolute output instead.

    Per weight: each entry gets its unit's score.
    """

    requires = ("activation",)

    def __init__(self, statistic="nonzero"):
        if statistic not in ("nonzero", "mean_abs"):
            raise ValueError(
                "statistic must be 'nonzero' or 'mean_abs', got "
                f"{statistic!r}."
            )
        self.statistic = statistic

    def _unit_scores(self, layer):
        if self.statistic == "nonzero":
            return layer.activation_nonzero
        return layer.activation_abs

    def get_config(self):
        return {"statistic": self.statistic}


class LearnedMask(Criterion):
    """|gate|: the magnitude of each unit's trainable gate (Network Slimming,
    Liu et al. 2017). Needs masked layers with `learnable_mask=True`; an L1
    penalty on the gates (`gate_l1`) makes unimportant gates shrink.

    Per weight: each entry gets its unit's score.
    """

    def _unit_scores(self, layer):
        if getattr(layer, "gate", None) is None:
            raise ValueError(
                f"LearnedMask reads unit gates, and layer '{layer.name}' has "
                "none: make the model with dkdp_keras.prunable(model, "
                "learnable_mask=True, gate_l1=1e-4)."
            )
        return ops.abs(layer.gate)


class OutputContribution(Criterion):
    """How much the model's output (or loss) changes when a unit is removed,
    measured by removing each unit in turn on a calibration batch.

    I(unit) = mean over the batch of |f(x) − f_{without unit}(x)| (target
    "output", averaged over output entries), or |L(f_{without unit}) − L(f)|
    (target "loss"). Per weight: each entry gets its unit's score. Costs one
    forward pass of the batch per unit, at each pruning event only.

    Args:
        x: calibration inputs (a numpy array or tensor; 64-256 examples).
        y: targets, needed for target "loss".
        target: "output" or "loss".
        loss: a Keras loss (callable `loss(y_true, y_pred)`), for "loss".
    """

    def __init__(self, x, y=None, target="output", loss=None):
        if target not in ("output", "loss"):
            raise ValueError(
                f"target must be 'output' or 'loss', got {target!r}."
            )
        if target == "loss" and (y is None or loss is None):
            raise ValueError(
                "OutputContribution(target='loss') needs both y and loss."
            )
        x = _validation.examples("x", x, y=y)
        self.x = x
        self.y = y
        self.target = target
        self.loss = loss
        self._scores = {}

    def prepare(self, model):
        _validation.examples("OutputContribution x", self.x, model=model)
        self._scores = {}
        baseline = model(self.x, training=False)
        base_loss = self._loss(baseline)
        for layer in masked_layers(model):
            mask = ops.convert_to_numpy(layer.kernel_mask)
            units = mask.reshape(-1, layer.num_units)
            scores = np.zeros(layer.num_units, dtype="float32")
            try:
                for u in np.flatnonzero(units.max(axis=0) > 0):
                    ablated = units.copy()
                    ablated[:, u] = 0.0
                    layer.kernel_mask.assign(ablated.reshape(mask.shape))
                    out = model(self.x, training=False)
                    if self.target == "output":
                        change = ops.mean(ops.abs(out - baseline))
                    else:
                        change = ops.abs(self._loss(out) - base_loss)
                    scores[u] = float(ops.convert_to_numpy(change))
            finally:
                layer.kernel_mask.assign(mask)
            self._scores[id(layer)] = scores

    def _loss(self, out):
        if self.target != "loss":
            return None
        return self.loss(self.y, out)

    def _unit_scores(self, layer):
        if id(layer) not in self._scores:
            raise ValueError(
                f"OutputContribution has no scores for layer '{layer.name}': "
                "call criterion.prepare(model) with the model that holds it "
                "(DKDPCallback does this at each pruning event)."
            )
        return ops.convert_to_tensor(self._scores[id(layer)])

    def get_config(self):
        return {"target": self.target}


class Wanda(Criterion):
    """|w| times the root-mean-square of the input the weight multiplies
    (Sun et al., ICLR 2024, "A Simple and Effective Pruning Approach for
    Large Language Models"): a weight on an input that is mostly zero moves
    the output little, whatever its size. The input of a Dense kernel's row
    is its input feature; of a convolution's, its input channel.

    The inputs' root-mean-squares are measured on `x` at each pruning event
    (`prepare`, one forward pass in inference mode). Per unit: the sum over
    the unit's kernel slice.

    Args:
        x: calibration inputs (a numpy array or tensor; a few thousand
            training examples for a small model).
        batch_size: examples per forward pass.
    """

    def __init__(self, x, batch_size=256):
        self.x = _validation.examples("x", x)
        self.batch_size = int(batch_size)
        self._rms = {}

    def prepare(self, model):
        _validation.examples("Wanda x", self.x, model=model)
        layers = masked_layers(model)
        probes = {id(layer): [] for layer in layers}
        for layer in layers:
            layer.input_probe = probes[id(layer)].append
        try:
            for start in range(0, int(self.x.shape[0]), self.batch_size):
                model(self.x[start:start + self.batch_size], training=False)
        finally:
            for layer in layers:
                layer.input_probe = None
        self._rms = {}
        for layer in layers:
            seen = probes[id(layer)]
            if seen:  # a layer the forward pass does not reach keeps no scores
                total = sum(count for _, count in seen)
                mean_square = sum(ms * count for ms, count in seen) / total
                self._rms[id(layer)] = np.sqrt(mean_square).astype("float32")

    def _weight_scores(self, layer):
        rms = self._rms.get(id(layer))
        if rms is None:
            raise ValueError(
                f"Wanda has no input norms for layer '{layer.name}': call "
                "criterion.prepare(model) with the model that holds it "
                "(DKDPCallback does this at each pruning event)."
            )
        kernel = layer.effective_kernel()
        fan_in = int(kernel.shape[-2])
        if rms.shape[0] != fan_in:
            raise ValueError(
                f"Wanda scores a kernel row by its input channel, and layer "
                f"'{layer.name}' has {rms.shape[0]} input channels for "
                f"{fan_in} kernel rows (a grouped convolution): score it with "
                "another criterion, such as importance='magnitude'."
            )
        shape = (1,) * (len(kernel.shape) - 2) + (fan_in, 1)
        return ops.multiply(ops.abs(kernel), ops.reshape(rms, shape))

    def get_config(self):
        return {"batch_size": self.batch_size}
