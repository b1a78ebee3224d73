"""The importance interface: I(θ) = f(θ) at three granularities.

A criterion computes scores natively either per kernel entry ("weight") or
per unit ("unit"); the base class derives the other granularities:

- weight -> unit: the sum of the unit's weight scores (for |w| this is the
  L1 norm of the filter, Li et al. 2017); criteria may override it.
- unit -> weight: every entry of a unit gets its unit's score.
- layer: the mean unit score over the layer's kept units, one number that
  says how much the layer as a whole matters (used to share a budget).

Entries and units that are already pruned always score 0, so that a pruning
step never brings them back by itself.
"""

import keras
from keras import ops

from dkdp_keras import _validation
from dkdp_keras.prunable import masked_layers

GRANULARITIES = ("weight", "unit", "layer")


def check_granularity(granularity):
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"granularity must be one of {GRANULARITIES}, got {granularity!r}."
        )
    return granularity


def expected_shape(layer, granularity):
    """Shape of the scores of `layer` at `granularity`."""
    if granularity == "weight":
        return tuple(int(d) for d in layer.kernel.shape)
    if granularity == "unit":
        return (layer.num_units,)
    return ()


def check_scores(scores, layer, granularity, source):
    """Raise a clear error unless `scores` has the shape `granularity` needs."""
    shape = tuple(int(d) for d in ops.shape(scores))
    expected = expected_shape(layer, granularity)
    if shape != expected:
        raise ValueError(
            f"{source} returned scores of shape {shape} for layer "
            f"'{layer.name}' at granularity '{granularity}'; expected "
            f"{expected} (kernel shape for 'weight', (num_units,) for 'unit', "
            "a scalar for 'layer')."
        )
    return scores


class Criterion:
    """Base class of importance criteria.

    Subclasses implement `_weight_scores(layer)` or `_unit_scores(layer)`
    (or both) in `keras.ops`; `score` is the one public scoring method.
    `requires` names the running statistics the criterion reads
    ("gradient" or "activation"; None for "unknown, collect all"). `prepare(model)` is called once before a
    round of scoring, for criteria that need the whole model.
    """

    requires = ()

    def gradient_statistics(self, granularity):
        """Names of the running gradient statistics `score` reads at
        `granularity` (of "gradient_abs", "taylor", "taylor_unit"); None
        when unknown (then all are kept)."""
        if self.requires is None:
            return None
        return None if "gradient" in self.requires else ()

    def prepare(self, model):
        """Hook called with the model before its layers are scored."""

    def score(self, layer, granularity="weight"):
        """Importance scores of a masked layer.

        Args:
            layer: a masked layer (MaskedDense, MaskedConv2D, ...).
            granularity: "weight" (kernel-shaped scores), "unit"
                (`(num_units,)`) or "layer" (a scalar).

        Returns:
            A float32 tensor of non-negative scores; pruned entries are 0.
        """
        check_granularity(granularity)
        self._check_statistics(layer, granularity)
        if granularity == "layer":
            units = self._scores_at(layer, "unit")
            kept = layer.unit_mask()
            count = ops.sum(kept)
            return ops.where(
                count > 0, ops.sum(units * kept) / ops.maximum(count, 1.0), 0.0
            )
        scores = self._scores_at(layer, granularity)
        return check_scores(scores, layer, granularity, type(self).__name__)

    def _scores_at(self, layer, granularity):
        if granularity == "weight":
            scores = self._weight_scores(layer)
            mask = layer.kernel_mask
        else:
            scores = self._unit_scores(layer)
            mask = layer.unit_mask()
        return ops.multiply(ops.cast(scores, "float32"), mask)

    def _weight_scores(self, layer):
        return layer.from_units(self._unit_scores(layer))

    def _unit_scores(self, layer):
        if type(self)._weight_scores is Criterion._weight_scores:
            raise NotImplementedError(
                f"{type(self).__name__} must implement _weight_scores or "
                "_unit_scores."
            )
        return ops.sum(layer.as_units(self._weight_scores(layer)), axis=0)

    def _check_statistics(self, layer, granularity="weight"):
        kept = getattr(layer, "gradient_statistics", None)
        wanted = self.gradient_statistics(granularity)
        missing = [n for n in wanted or () if kept is not None and n not in kept]
        if missing:
            raise ValueError(
                f"{type(self).__name__} at granularity {granularity!r} reads "
                f"the {', '.join(missing)} statistics, which layer "
                f"'{layer.name}' does not keep (it keeps {', '.join(kept) or 'none'}, "
                "as a DKDPCallback with another criterion or granularity "
                "asked). Call model.request_statistics({'gradient'}) to keep "
                "them all, and train before scoring."
            )
        for kind in self.requires or ():
            if not getattr(layer, "track_statistics", False):
                raise ValueError(
                    f"{type(self).__name__} reads {kind} statistics, which "
                    f"layer '{layer.name}' does not keep. Make the model with "
                    "dkdp_keras.prunable(model, track_statistics=True) (a "
                    "DKDPModel does this for its teacher)."
                )
            steps = getattr(layer, f"{kind}_steps")
            if kind == "gradient" and not layer.trainable:
                raise ValueError(
                    f"{type(self).__name__} reads gradient statistics, and "
                    f"layer '{layer.name}' is frozen (trainable=False): it "
                    "gets no gradients to collect. Unfreeze it "
                    "(layer.trainable = True, or the model containing it), "
                    "or score it with a criterion that needs none, such as "
                    "importance='magnitude'."
                )
            if float(ops.convert_to_numpy(steps)) == 0:
                how = (
                    "train it with DKDPModel, or call "
                    "dkdp_keras.importance.collect_gradients(model, x, y, loss)"
                    if kind == "gradient"
                    else "train it (model.fit) for at least one step"
                )
                raise ValueError(
                    f"{type(self).__name__} reads {kind} statistics, and layer "
                    f"'{layer.name}' has collected none yet: {how} before "
                    "scoring."
                )

    def get_config(self):
        return {}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class FunctionCriterion(Criterion):
    """A criterion made from a callable `fn(layer, granularity) -> scores`.

    What statistics it reads is unknown, so all are collected for it."""

    requires = None

    def __init__(self, fn):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}.")
        self.fn = fn

    def score(self, layer, granularity="weight"):
        check_granularity(granularity)
        scores = ops.convert_to_tensor(self.fn(layer, granularity), "float32")
        name = getattr(self.fn, "__name__", repr(self.fn))
        return check_scores(scores, layer, granularity, f"criterion {name}")

    def get_config(self):
        return {"fn": self.fn}


def collect_gradients(model, x, y, loss, batch_size=32):
    """Fold the gradients of `loss` on `(x, y)` into the running gradient
    statistics of `model`'s masked layers, one step per batch.

    For users who prune a plain model (not a DKDPModel, whose training step
    does this for free) with a gradient-based criterion. The forward pass
    runs with `training=False`, so BatchNormalization statistics and dropout
    are untouched.

    Args:
        model: a model made with `prunable(model, track_statistics=True)`.
        x, y: numpy arrays or tensors of inputs and targets.
        loss: a Keras loss object or callable `loss(y_true, y_pred)`.
        batch_size: examples per step.
    """
    import tensorflow as tf  # the gradient tape is backend-specific

    _validation.examples("x", x, model=model, y=y)
    _validation.number("batch_size", batch_size, low=1, integer=True)
    layers = [layer for layer in masked_layers(model) if layer.track_statistics]
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no masked layer that tracks statistics: "
            "make it with dkdp_keras.prunable(model, track_statistics=True)."
        )
    loss = keras.losses.get(loss) if isinstance(loss, str) else loss
    n = int(ops.shape(x)[0])
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        with tf.GradientTape() as tape:
            value = loss(yb, model(xb, training=False))
        grads = tape.gradient(value, [layer.kernel for layer in layers])
        for layer, grad in zip(layers, grads):
            if grad is None:
                grad = ops.zeros(layer.kernel.shape)
            layer.update_gradient_statistics(grad)
