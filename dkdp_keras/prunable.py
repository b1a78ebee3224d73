"""Model-level masking: make a model prunable, strip masks, measure sparsity."""

import warnings

import keras
import numpy as np
from keras import ops

from dkdp_keras import _validation
from dkdp_keras.graph import (  # noqa: F401  (names of this module's API)
    _clone,
    _is_graph_model,
    _twin_of,
    batchnorm_after,
    check_graph_model,
    is_kernel_layer,
    is_masked,
    is_strippable,
    iter_layers,
)
from dkdp_keras.layers import MASKED_TWINS, MaskedBatchNormalization

#: Layers with weights that need no mask: normalisation and the like. A layer
#: with weights outside this list and outside MASKED_TWINS is reported.
_PASSIVE_LAYERS = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
    keras.layers.Normalization,
    keras.layers.PReLU,
)


def masked_layers(model):
    """The masked layers of `model` (nested models included), in order."""
    _validation.keras_model("model", model)
    return [layer for layer in iter_layers(model) if is_masked(layer)]



def prunable(
    model,
    layers=None,
    learnable_mask=False,
    gate_l1=0.0,
    track_statistics=False,
):
    """A copy of `model` with every supported layer replaced by its masked twin.

    Dense, Conv1D/2D/3D and DepthwiseConv1D/2D layers become MaskedDense,
    MaskedConv1D/2D/3D and MaskedDepthwiseConv1D/2D with the same weights and
    all-ones masks, so the copy computes exactly what `model` computes.
    Layers with weights that cannot be masked (LSTM, Embedding, ...) are
    kept as they are and named in one warning. Layers that are already
    masked are copied with their masks.

    Args:
        model: a built Sequential or Functional Keras model.
        layers: optional restriction: a list of layer names, or a callable
            `layer -> bool`. Only the selected layers are masked.
        learnable_mask: give every masked layer trainable unit gates.
        gate_l1: L1 penalty on those gates.
        track_statistics: keep running activation/gradient statistics for
            the gradient- and activation-based importance criteria.

    Returns:
        A new Keras model of the same kind as `model`.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> masked = prunable(model)
    >>> type(masked.layers[0]).__name__
    'MaskedDense'
    """
    check_graph_model(model)
    for name, flag in (("learnable_mask", learnable_mask),
                       ("track_statistics", track_statistics)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}.")
    _validation.number("gate_l1", gate_l1, low=0.0)
    if layers is None:
        selected = lambda layer: True  # noqa: E731
    elif callable(layers):
        selected = layers
    elif isinstance(layers, (list, tuple, set)) and all(
        isinstance(name, str) for name in layers
    ):
        names = set(layers)
        known = {layer.name for layer in iter_layers(model)}
        unknown = sorted(names - known)
        if unknown:
            raise ValueError(
                f"layers names {unknown} that model '{model.name}' does not "
                f"have; its layers are {sorted(known)}."
            )
        selected = lambda layer: layer.name in names  # noqa: E731
    else:
        raise TypeError(
            "layers must be None, a list of layer names or a callable "
            f"layer -> bool, got {layers!r}."
        )

    # BatchNormalization layers reading a layer that will be masked get a
    # channel mask, so that removed units are exact zeros after them too.
    masked_bn = {
        bn.name
        for bn in batchnorm_after(
            model, lambda l: is_masked(l) or (_twin_of(l) is not None and selected(l))
        ).values()
        if type(bn) is keras.layers.BatchNormalization
    }
    skipped = []
    extra = dict(
        learnable_mask=learnable_mask,
        gate_l1=gate_l1,
        track_statistics=track_statistics,
    )

    def clone_function(layer):
        twin = _twin_of(layer)
        if is_strippable(layer):
            return type(layer).from_config(layer.get_config())
        if layer.name in masked_bn:
            return MaskedBatchNormalization.from_config(layer.get_config())
        if twin is not None and selected(layer):
            return twin.from_config({**layer.get_config(), **extra})
        if (
            layer.weights
            and twin is None
            and not isinstance(layer, _PASSIVE_LAYERS)
            and selected(layer)
        ):
            skipped.append(f"{layer.name} ({type(layer).__name__})")
        return layer.__class__.from_config(layer.get_config())

    clone, pairs = _clone(model, clone_function)
    for old, new in pairs:
        if is_masked(new) and not is_masked(old):
            new.kernel.assign(old.kernel)
            if old.bias is not None:
                new.bias.assign(old.bias)
        else:
            _copy_by_name(old, new)
    if skipped:
        warnings.warn(
            "prunable: these layers have weights but no masked twin and are "
            f"left unpruned: {', '.join(skipped)}. Supported: "
            f"{', '.join(sorted(c.__name__ for c in MASKED_TWINS))}.",
            stacklevel=2,
        )
    return clone


def _copy_by_name(old, new):
    """Copy weights between two layers of the same class and config (a
    MaskedBatchNormalization has its channel mask beyond BN's weights)."""
    if isinstance(new, MaskedBatchNormalization) and not isinstance(
        old, MaskedBatchNormalization
    ):
        for source, target in zip(old.weights, new.weights):
            target.assign(source)
        return
    if len(old.weights) != len(new.weights):
        raise ValueError(
            f"Cannot copy weights of layer '{old.name}': the copy has "
            f"{len(new.weights)} weights, the original {len(old.weights)}."
        )
    for source, target in zip(old.weights, new.weights):
        target.assign(source)


def strip(model):
    """The same model with plain Keras layers: masks and gates baked in.

    Every masked layer becomes its Keras base layer with kernel
    ``kernel * mask * gate`` and bias ``bias * unit_mask * gate``; the
    outputs are unchanged. Pruned entries are exact zeros in the result.

    Args:
        model: a built Sequential or Functional model (masked or not).

    Returns:
        A new Keras model with no dkdp_keras layer in it.
    """
    check_graph_model(model)

    def clone_function(layer):
        if is_strippable(layer):
            return layer.base_class.from_config(layer.base_config())
        return layer.__class__.from_config(layer.get_config())

    clone, pairs = _clone(model, clone_function)
    for old, new in pairs:
        if is_strippable(old):
            new.set_weights(old.stripped_weights())
        else:
            _copy_by_name(old, new)
    return clone


def effective_kernel(layer):
    """The kernel a layer computes with: ``kernel * mask`` for masked layers,
    the kernel itself for plain Dense/Conv/DepthwiseConv layers, else None."""
    if is_masked(layer):
        return layer.effective_kernel()
    if is_kernel_layer(layer):
        return layer.kernel
    return None


def plain_weights(layer):
    """The weights of the plain Keras layer `layer` stands for, as numpy:
    masks and gates baked in for library layers, as they are otherwise."""
    if is_strippable(layer):
        return layer.stripped_weights()
    return [ops.convert_to_numpy(w) for w in layer.weights]


def effective_kernels(model):
    """`(layer, kernel as numpy)` for every prunable kernel of `model`, the
    masks applied (see `effective_kernel`)."""
    for layer in iter_layers(model):
        kernel = effective_kernel(layer)
        if kernel is not None:
            yield layer, ops.convert_to_numpy(kernel)


def sparsity(model):
    """Fraction of zero entries over all prunable kernels of `model`.

    Works on masked models (zeros of ``kernel * mask``) and on stripped or
    plain models (zeros of the Dense/Conv/DepthwiseConv kernels).

    Returns:
        A Python float in [0, 1].
    """
    _validation.keras_model("model", model)
    zeros = 0
    total = 0
    for _, values in effective_kernels(model):
        zeros += int(np.count_nonzero(values == 0))
        total += values.size
    if total == 0:
        raise ValueError(
            f"Model '{model.name}' has no prunable kernel (Dense, Conv or "
            "DepthwiseConv layer)."
        )
    return zeros / total


def sync_batchnorm(model):
    """Set the channel mask of every MaskedBatchNormalization that reads a
    masked layer to that layer's unit mask (call after changing masks)."""
    for name, bn in batchnorm_after(model).items():
        if isinstance(bn, MaskedBatchNormalization):
            source = next(l for l in iter_layers(model) if l.name == name)
            bn.channel_mask.assign(source.unit_mask())
