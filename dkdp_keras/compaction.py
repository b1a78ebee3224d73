"""Structural compaction: remove pruned units for real.

`compact(model)` returns a plain Keras model in which every unit whose
output is exactly zero for every input is gone, together with what only
carried it: its kernel column and bias, its BatchNormalization channel, its
positions after Flatten, and the matching input rows of the next Dense or
Conv layer. The outputs are unchanged (up to float rounding).

How it decides, channel by channel, from the layer graph (public
`layer.input`/`layer.output` only):

1. A Dense/Conv unit is zero when its mask column is empty (a removed unit's
   bias is masked too) or, in a plain layer, its kernel column and bias are
   zero, and its activation maps 0 to 0. Units of the layers that produce the
   model's outputs never go.
2. Channel-preserving layers (activations, Dropout, pooling, global pooling,
   BatchNormalization) keep a channel zero when they map 0 to 0, which is
   checked numerically per channel (a MaskedBatchNormalization does for a
   removed channel; a plain one with beta != 0 does not, and keeps it).
   Flatten spreads a channel over its positions (channels_last).
3. Tensors joined by Add/Subtract/Multiply/Average/Maximum/Minimum (a
   residual block) form one group: a channel goes only if it is zero in every
   member. Concatenate (on the channel axis) lays its inputs' channels side
   by side. A DepthwiseConv with depth multiplier 1 carries channels through.
4. A channel goes when it is zero all along its chain or group, from the
   producing layers to the layers that consume it. A chain that reaches a
   layer this version cannot see through (Reshape,
   LayerNormalization, depthwise with a multiplier > 1, nested models,
   channels_first layers, ...) or a model output or input keeps all its
   channels; such layers are named in one warning when they stopped a
   removal.
"""

import warnings

import keras
import numpy as np
from keras import ops

from dkdp_keras.counting import Snapshot, count_macs, count_params, positions
from dkdp_keras.graph import (
    _clone,
    _single,
    batchnorm_after,
    check_graph_model,
    is_kernel_layer,
    is_masked,
    is_strippable,
    iter_layers,
    output_unit_layers,
    rewired,
)
from dkdp_keras.layers import MaskedBatchNormalization
from dkdp_keras.prunable import plain_weights, strip

_CHANNEL_PRESERVING = (
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.Identity,
    keras.layers.BatchNormalization,
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D,
    keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D,
    keras.layers.AveragePooling3D,
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D,
)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
#: Element-wise merges: zero in every input gives zero out, so their inputs'
#: channels form one coupled group (a residual block's channels).
_MERGING = (
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.Average,
    keras.layers.Maximum,
    keras.layers.Minimum,
)


def _channels_last(layer):
    return getattr(layer, "data_format", "channels_last") != "channels_first"


def _kind(layer):
    if isinstance(layer, keras.layers.InputLayer):
        return "input"
    if isinstance(layer, keras.Model) or not _channels_last(layer):
        return "barrier"
    if isinstance(layer, _DEPTHWISE):
        # With one output channel per input channel, a depthwise layer
        # carries channels through like an activation does.
        return "preserve" if layer.depth_multiplier == 1 else "barrier"
    if is_kernel_layer(layer):
        return "kernel"
    if isinstance(layer, keras.layers.BatchNormalization):
        axis = layer.axis if isinstance(layer.axis, int) else None
        return "preserve" if axis in (-1, len(layer.input.shape) - 1) else "barrier"
    if isinstance(layer, _CHANNEL_PRESERVING):
        return "preserve"
    if isinstance(layer, keras.layers.Flatten):
        return "flatten" if _channels_last(layer) else "barrier"
    if isinstance(layer, _MERGING):
        return "merge"
    if isinstance(layer, keras.layers.Concatenate):
        axis = layer.axis
        return "concat" if axis in (-1, len(layer.output.shape) - 1) else "barrier"
    return "barrier"


def _zero_units(layer, protected, plain=plain_weights):
    weights = plain(layer)
    kernel = weights[0].reshape(-1, weights[0].shape[-1])
    zero = np.all(kernel == 0, axis=0)
    if len(weights) > 1:
        zero &= weights[1] == 0
    if not _zero_to_zero(layer.activation or keras.activations.linear):
        zero[:] = False
    if layer.name in protected:
        zero[:] = False
    return zero


_ACTIVATION_AT_ZERO = {}


def _zero_to_zero(activation):
    """activation(0) == 0, remembered per activation function."""
    try:
        return _ACTIVATION_AT_ZERO[activation]
    except (KeyError, TypeError):
        pass
    value = float(ops.convert_to_numpy(activation(ops.zeros((1,))))[0]) == 0.0
    try:
        _ACTIVATION_AT_ZERO[activation] = value
    except TypeError:  # an unhashable callable
        pass
    return value


def _maps_zero_to_zero(layer, in_shape, snapshot=None):
    if snapshot is not None:
        key = ("maps zero to zero", layer.name)
        if key not in snapshot.memo:
            snapshot.memo[key] = _maps_zero_to_zero(layer, in_shape)
        return snapshot.memo[key]
    shape = (1,) + tuple(1 if d is None else d for d in in_shape[1:])
    out = ops.convert_to_numpy(layer(ops.zeros(shape), training=False))
    channels = out.shape[-1]
    return np.all(out.reshape(-1, channels) == 0, axis=0)


def compact(model):
    """A physically smaller plain Keras model with the same outputs.

    Args:
        model: a built Sequential or Functional model, masked (from
            `prunable`) or plain (pruned units are then all-zero columns).

    Returns:
        A new Keras model with no dkdp_keras layer, masks and gates baked
        in, removed units gone.

    Example:

    ```python
    small = dkdp_keras.compact(dkdp_keras_model.teacher)
    small.count_params()  # fewer than the masked teacher's
    ```
    """
    check_graph_model(model)
    plan = _plan(model)
    if isinstance(plan, str):
        warnings.warn(
            f"compact: layer '{plan}' is used at several places; this "
            "version compacts only graphs where each layer is used once. "
            "Returning the stripped model (masks baked in).",
            stacklevel=2,
        )
        return strip(model)
    if plan.blocked:
        warnings.warn(
            "compact: these layers cannot be seen through yet, so removed "
            "units feeding them were kept: " + ", ".join(sorted(plan.blocked))
            + ".",
            stacklevel=2,
        )

    def clone_function(layer):
        cls = layer.base_class if is_strippable(layer) else layer.__class__
        config = layer.base_config() if is_strippable(layer) else layer.get_config()
        if plan.kinds.get(layer.name) == "kernel":
            out_keep = plan.kept_outputs(layer)
            if out_keep is not None:
                key = "units" if "units" in config else "filters"
                config[key] = int(out_keep.size)
        return cls.from_config(config)

    clone, pairs = _clone(plan.model, clone_function)
    for old, new in pairs:
        if new.weights:
            new.set_weights(plan.weights(old))
    return clone


class _Plan:
    """What `compact` keeps of each layer, decided from the graph."""

    def __init__(self, model, kinds, kept_inputs, kept_outputs, blocked,
                 plain=plain_weights):
        self.model = model
        self.plain = plain
        self.kinds = kinds
        self.kept_inputs = kept_inputs
        self.kept_outputs = kept_outputs
        self.blocked = blocked

    def weights(self, layer):
        """`layer`'s plain weights as the compacted model holds them."""
        kind = self.kinds.get(layer.name)
        weights = self.plain(layer)
        if kind == "kernel":
            in_keep = self.kept_inputs(_single(layer.input))
            out_keep = self.kept_outputs(layer)
            if in_keep is not None:
                weights[0] = np.take(weights[0], in_keep, axis=-2)
            if out_keep is not None:
                weights = [np.take(w, out_keep, axis=-1) for w in weights]
            return weights
        if kind != "preserve" or not weights:
            return weights
        channels = self.kept_inputs(_single(layer.input))
        if channels is None:
            return weights
        if isinstance(layer, _DEPTHWISE):
            # kernel (..., channels, 1) and bias (channels,)
            return [np.take(w, channels, axis=-2 if w.ndim > 1 else -1)
                    for w in weights]
        return [np.take(w, channels, axis=-1) for w in weights]


def deployed_counts(model, masks=None, snapshot=None):
    """`(non-zero parameters, multiply-accumulates per example)` of
    `compact(model)`, computed from the same plan without building it (a
    budget check runs this many times per pruning event).

    `masks` (layer name -> kernel mask): count what `compact` would ship if
    those masked layers had these masks (and the BatchNormalization after
    each followed its units, as `sync_batchnorm` makes it), without
    assigning anything to the model. `snapshot` (a `counting.Snapshot` of
    the model's current weights) reads them once for many counts."""
    check_graph_model(model)
    plan = _plan(model, masks, snapshot)
    if isinstance(plan, str):
        small = strip(model)
        return count_params(small), count_macs(small)
    params = macs = 0
    for layer in plan.model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):  # left whole: a barrier
            params += count_params(layer)
            macs += count_macs(layer)
            continue
        weights = plan.weights(layer)
        params += sum(int(np.count_nonzero(w)) for w in weights)
        if is_kernel_layer(layer):
            macs += int(np.count_nonzero(weights[0])) * positions(layer)
    return params, macs


def _with_masks(model, masks, snapshot=None):
    """`(plain, channels)`: the plain weights of a layer as they would be
    with `masks` in place of the masked layers' own (`plain_weights`
    otherwise, or the `snapshot`'s), and the channel mask each
    MaskedBatchNormalization reading a masked layer of `masks` would have."""
    plain_of = plain_weights if snapshot is None else snapshot.plain_weights
    read = ops.convert_to_numpy if snapshot is None else snapshot.read
    if not masks:
        return plain_of, {}
    layers = {layer.name: layer for layer in iter_layers(model)}
    channels = {}
    for name, bn in batchnorm_after(model).items():
        if name in masks and isinstance(bn, MaskedBatchNormalization):
            units = layers[name].num_units
            channels[bn.name] = np.asarray(masks[name]).reshape(-1, units).max(axis=0)

    def plain(layer):
        if is_masked(layer) and layer.name in masks:
            return layer.stripped_weights(masks[layer.name], read=read)
        if layer.name in channels:
            return layer.stripped_weights(channels[layer.name], read=read)
        return plain_of(layer)

    return plain, channels


def _zero_preserved(layer, in_shape, channel=None, snapshot=None):
    """`_maps_zero_to_zero`, for a MaskedBatchNormalization with `channel`
    in place of its own channel mask: a channel that the layer's own mask
    zeroes but `channel` keeps passes what the plain layer gives for 0
    (beta - gamma * mean / sqrt(var + eps))."""
    passes = _maps_zero_to_zero(layer, in_shape, snapshot)
    if channel is None:
        return passes
    read = ops.convert_to_numpy if snapshot is None else snapshot.read
    own = read(layer.channel_mask)
    gamma, beta = (read(w) if w is not None else None
                   for w in (getattr(layer, "gamma", None), getattr(layer, "beta", None)))
    mean = read(layer.moving_mean)
    var = read(layer.moving_variance)
    at_zero = -mean / np.sqrt(var + layer.epsilon)
    if gamma is not None:
        at_zero = at_zero * gamma
    if beta is not None:
        at_zero = at_zero + beta
    revived = (own == 0) & (channel != 0)
    passes = passes.copy()
    passes[revived] = at_zero[revived] == 0
    passes[channel == 0] = True
    return passes


def _plan(model, masks=None, snapshot=None):
    """The `_Plan` of `model` (with `masks` in place of its masked layers'
    own, and its weights from `snapshot`: see `deployed_counts`), or the
    name of a layer used at several places (then nothing can be compacted)."""
    if snapshot is None:
        model = rewired(model)
    else:
        key = ("rewired", id(model))
        if key not in snapshot.memo:
            snapshot.memo[key] = (model, rewired(model))
        model = snapshot.memo[key][1]
    plain, channels = _with_masks(model, masks, snapshot)
    for layer in model.layers:
        try:
            layer.input, layer.output
        except (AttributeError, ValueError):
            return layer.name
    protected = output_unit_layers(model)
    # Every tensor's last axis is a list of segments, each a run of channels
    # of one group (union-find over chains); Concatenate joins segment lists.
    segments = {}  # id(tensor) -> [group key, ...] in channel order
    flat = {}  # id(tensor) -> positions, for Flatten outputs
    parent = {}  # group key -> group key it was merged into
    zero = {}  # group key -> bool array: channel zero everywhere so far
    pinned = {}  # group key -> layer names that keep the group whole
    owners = {}  # group key -> kernel layers whose units are the channels
    kinds = {}

    def find(key):
        while parent[key] != key:
            key = parent[key]
        return key

    def groups(tensor):
        return [find(k) for k in segments[id(tensor)]]

    def start_chain(tensor, values, layer=None, why=None):
        key = id(tensor)
        segments[key], parent[key] = [key], key
        zero[key] = values
        # A chain that no kernel layer produces (a model input, a barrier's
        # output) cannot lose channels.
        pinned[key] = [] if layer is not None else [why or "fixed"]
        owners[key] = [layer] if layer is not None else []

    def join(keys):
        keys = list(dict.fromkeys(find(k) for k in keys))
        first = keys[0]
        for other in keys[1:]:
            parent[other] = first
            zero[first] = zero[first] & zero[other]
            pinned[first] += pinned[other]
            owners[first] += owners[other]
        return first

    def pin(tensor, name):
        for key in groups(tensor):
            pinned[key].append(name)

    for tensor in model.inputs:
        start_chain(tensor, np.zeros(tensor.shape[-1], bool), why="model input")

    for layer in model.layers:
        kind = kinds[layer.name] = _kind(layer)
        if kind == "input":
            continue
        inputs = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
        outputs = layer.output if isinstance(layer.output, (list, tuple)) else [layer.output]
        known = all(id(t) in segments for t in inputs)
        channel_inputs = known and not any(id(t) in flat for t in inputs)
        out = outputs[0]
        if kind == "merge" and channel_inputs:
            structures = [[len(zero[k]) for k in groups(t)] for t in inputs]
            if all(st == structures[0] for st in structures):
                segments[id(out)] = [
                    join(list(keys)) for keys in zip(*(groups(t) for t in inputs))
                ]
                continue
        if kind == "concat" and channel_inputs:
            segments[id(out)] = [k for t in inputs for k in groups(t)]
            continue
        if kind in ("barrier", "merge", "concat") or len(inputs) != 1:
            for tensor in inputs:
                if id(tensor) in segments:
                    pin(tensor, layer.name)
            for tensor in outputs:
                start_chain(tensor, np.zeros(tensor.shape[-1], bool))
            continue
        source = inputs[0]
        if kind == "kernel":
            start_chain(out, _zero_units(layer, protected, plain), layer)
            continue
        if not channel_inputs:
            if known:
                pin(source, layer.name)
            start_chain(out, np.zeros(out.shape[-1], bool))
            continue
        if kind == "flatten":
            segments[id(out)] = groups(source)
            flat[id(out)] = (
                int(np.prod(source.shape[1:-1])) if len(source.shape) > 2 else 1
            )
            continue
        passes = _zero_preserved(layer, source.shape, channels.get(layer.name), snapshot)
        start = 0
        for key in groups(source):
            size = len(zero[key])
            zero[key] = zero[key] & passes[start : start + size]
            start += size
        segments[id(out)] = groups(source)

    for tensor in model.outputs:
        if id(tensor) in segments:
            pin(tensor, "model output")

    keep = {}
    blocked = set()
    for key, values in zero.items():
        if find(key) != key or not owners[key]:
            continue
        if pinned[key]:
            if values.any():
                blocked.update(
                    n for n in pinned[key]
                    if n not in ("model output", "model input", "fixed")
                )
            continue
        if values.any():
            kept = np.flatnonzero(~values)
            if kept.size == 0:  # keep one channel so the graph stays valid
                kept = np.array([0])
            keep[key] = kept

    def kept_inputs(tensor):
        """Indices of the input features a layer keeps, or None for all."""
        if id(tensor) not in segments:
            return None
        keys = groups(tensor)
        if not any(k in keep for k in keys):
            return None
        channels, offset = [], 0
        for key in keys:
            size = len(zero[key])
            channels.append(offset + keep.get(key, np.arange(size)))
            offset += size
        channels = np.concatenate(channels)
        if id(tensor) not in flat:
            return channels
        positions = flat[id(tensor)]
        return (np.arange(positions)[:, None] * offset + channels[None, :]).reshape(-1)

    def kept_outputs(layer):
        out = _single(layer.output)
        if out is None or id(out) not in segments:
            return None
        return keep.get(groups(out)[0])

    return _Plan(model, kinds, kept_inputs, kept_outputs, blocked, plain)
