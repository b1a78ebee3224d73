"""Counting what a model holds and computes: parameters (all or non-zero)
and multiply-accumulates per example, of a model as it is.

Counting rules (masked or plain Sequential/Functional models):

- parameters: every weight of the model as Keras counts it (BatchNorm moving
  statistics included), except masks, gates and statistics; with
  `nonzero=True` only entries that are non-zero in the computation
  (``kernel * mask``; the bias of a removed unit counts as removed).
- multiply-accumulates per example: Dense ``nonzero(kernel) * positions``,
  convolutions ``nonzero(kernel) * output positions`` (depthwise likewise);
  other layers count 0.

`budget.deployed_counts` counts a masked model as `compact` would ship it.
"""

import numpy as np
from keras import ops

from dkdp_keras import _validation
from dkdp_keras.graph import is_strippable
from dkdp_keras.prunable import effective_kernels, iter_layers, plain_weights


def count_params_of_layer(layer, nonzero=False):
    """Parameters of one layer; with `nonzero=True`, only non-zero ones."""
    return sum(
        int(np.count_nonzero(values)) if nonzero else values.size
        for values in plain_weights(layer)
    )


def count_params(model, nonzero=True):
    """Parameters of `model`; with `nonzero=True`, only non-zero ones."""
    _validation.keras_model("model", model)
    return sum(
        count_params_of_layer(layer, nonzero) for layer in iter_layers(model)
    )


def positions(layer):
    """Output positions per example (product of non-batch, non-channel dims)."""
    shape = tuple(layer.output.shape)[1:-1]
    data_format = getattr(layer, "data_format", "channels_last")
    if data_format == "channels_first":
        shape = tuple(layer.output.shape)[2:]
    return int(np.prod([d for d in shape])) if shape else 1


def count_macs(model, nonzero=True):
    """Multiply-accumulates per example; with `nonzero=True`, pruned kernel
    entries cost nothing."""
    _validation.keras_model("model", model)
    total = 0
    for layer, kernel in effective_kernels(model):
        count = int(np.count_nonzero(kernel)) if nonzero else kernel.size
        total += count * positions(layer)
    return total


_positions = positions  # the name compaction and budget used


class Snapshot:
    """A model's variables read once, as numpy, for many counts of one state
    of its weights: a budget search counts some twenty candidate masks
    between two writes. Valid only while no variable changes; the arrays it
    hands out are shared, not to be written to.

    `memo` holds what callers derive from the weights (per layer name)."""

    def __init__(self):
        self._values = {}  # id(variable) -> (variable, numpy value)
        self.memo = {}

    def read(self, variable):
        """`ops.convert_to_numpy(variable)`, read on first use only."""
        entry = self._values.get(id(variable))
        if entry is None:
            entry = self._values[id(variable)] = (
                variable, ops.convert_to_numpy(variable))
        return entry[1]

    def plain_weights(self, layer):
        """`prunable.plain_weights(layer)` from the snapshot."""
        if is_strippable(layer):
            return layer.stripped_weights(read=self.read)
        return [self.read(w) for w in layer.weights]
