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

import warnings
import weakref

import keras
import numpy as np
from keras import ops

from dkdp_keras import _validation, depgraph
from dkdp_keras.graph import is_kernel_layer, is_strippable
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


#: layer -> its output positions at a reference input shape (`set_reference`).
_POSITIONS = weakref.WeakKeyDictionary()
_GUESSED = []  # layers counted per position since the last `warn_guessed`
_WARNED = weakref.WeakSet()  # models warned about


def _positions_of(shape, data_format):
    shape = tuple(shape)[2:] if data_format == "channels_first" else tuple(shape)[1:-1]
    if any(d is None for d in shape):
        return None
    return int(np.prod(shape)) if shape else 1


def positions(layer):
    """Output positions per example (product of non-batch, non-channel dims).

    An output of unknown size (a `None` dimension: variable images or
    sequences) is counted at the model's reference input shape
    (`set_reference`); without one, per position of the unknown
    dimensions (each taken as 1), which `warn_guessed` then says once
    per model."""
    data_format = getattr(layer, "data_format", "channels_last")
    known = _positions_of(layer.output.shape, data_format)
    if known is not None:
        return known
    try:
        return _POSITIONS[layer]
    except (KeyError, TypeError):
        pass
    _GUESSED.append(layer.name)
    shape = [1 if d is None else d for d in layer.output.shape]
    return _positions_of(shape, data_format)


def warn_guessed(model):
    """Warn (once per model) if layers were just counted per position."""
    if not _GUESSED:
        return
    first, more = _GUESSED[0], len(set(_GUESSED)) - 1
    _GUESSED.clear()
    try:
        if model in _WARNED:
            return
        _WARNED.add(model)
    except TypeError:
        pass
    warnings.warn(
        f"Model '{model.name}': layer '{first}'"
        + (f" and {more} more have outputs" if more else " has an output")
        + " of unknown size (None dimensions): their multiply-accumulates are "
        "counted as if each unknown dimension were 1. Give the input shape the "
        "model will run at: dkdp_keras.Budget(input_shape=...) (a DKDPModel "
        "takes it from the data fit is given).",
        stacklevel=3,
    )


def _unknown_size_layers(model):
    """The kernel layers of `model` whose outputs have a `None` dimension
    (read from the graph: no kernel is converted)."""
    return [layer for layer in iter_layers(model) if is_kernel_layer(layer)
            and _positions_of(layer.output.shape,
                              getattr(layer, "data_format", "channels_last")) is None]


def has_unknown_positions(model):
    """True when a kernel layer of `model` has an output of unknown size and
    no reference shape gives it one."""
    return any(layer not in _POSITIONS for layer in _unknown_size_layers(model))


def set_reference(model, input_shape):
    """Count `model`'s MACs at inputs of `input_shape` (one example, no
    batch axis): the output sizes its layers have there, for the layers
    whose outputs have a `None` dimension, from each layer's
    `compute_output_shape` along the `depgraph`. Nothing in `model`
    changes."""
    shape = tuple(int(d) for d in input_shape)
    unknown = _unknown_size_layers(model)
    if not unknown:
        return
    found = depgraph.of(model).shapes_at((1,) + shape)
    for layer in unknown:
        node = depgraph.of(model).node_of.get(id(layer))
        there = found.get(node.outputs[0]) if node is not None else None
        if there is not None:
            _POSITIONS[layer] = _positions_of(
                there, getattr(layer, "data_format", "channels_last"))


def count_macs(model, nonzero=True):
    """Multiply-accumulates per example; with `nonzero=True`, pruned kernel
    entries cost nothing."""
    _validation.keras_model("model", model)
    total = 0
    for layer, kernel in effective_kernels(model):
        count = int(np.count_nonzero(kernel)) if nonzero else kernel.size
        total += count * positions(layer)
    warn_guessed(model)
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
