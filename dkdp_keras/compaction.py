"""Structural compaction: remove pruned units for real.

`compact(model)` returns a plain Keras model in which every unit whose
output is exactly zero for every input is gone, together with what only
carried it: its kernel column and bias, its BatchNormalization channel, its
positions after Flatten, and the matching input rows of the next Dense or
Conv layer. The outputs are unchanged (up to float rounding).

How it decides, channel by channel, from the model's `depgraph.DepGraph`
(built once per model; nested models and `keras.ops` calls included):

1. A Dense/Conv unit is zero when its mask column is empty (a removed unit's
   bias is masked too) or, in a plain layer, its kernel column and bias are
   zero, and its activation maps 0 to 0. Units of the layers that produce the
   model's outputs never go.
2. Zeros are followed tensor by tensor: a channel-wise layer or call keeps a
   channel zero where it maps 0 to 0, checked numerically per channel (a
   MaskedBatchNormalization does for a removed channel; a plain one with
   beta != 0 does not; `x + 3.0` does not). A sum of tensors (a residual Add)
   is zero where all its inputs are, a product (a squeeze-and-excite gate)
   where any is.
3. A channel of a group goes when every Dense/Conv layer that reads the group
   sees it as zero, and no model output, model input or layer the graph
   cannot see through (LayerNormalization, Reshape that moves the channel
   axis, depthwise with a multiplier > 1, channels_first layers, ...) reads
   the group; such layers are named in one warning when they stopped a
   removal.
4. Widths are aligned: a group of at least 4 x `ALIGN` channels keeps a
   multiple of `ALIGN` (or all of them), by keeping the first few removable
   channels as zero channels, whose readers' input rows are zeroed. XNNPACK,
   LiteRT's CPU path, runs its kernels 16 outputs at a time and switches a
   fully-connected layer of N outputs with N mod 16 in 1..8 to a narrower
   kernel, about 1.8x slower at batch 1 (LeNet-300-100 compacted to 280
   units ran 1.55x slower than dense); the zeros cost no non-zero parameter
   and no output changes.
"""

import warnings

import keras
import numpy as np
from keras import ops

from dkdp_keras import _validation, depgraph
from dkdp_keras.counting import count_macs, count_params, positions, warn_guessed
from dkdp_keras.graph import (
    _clone,
    batchnorm_after,
    check_graph_model,
    is_kernel_layer,
    is_masked,
    is_operation,
    is_strippable,
    iter_layers,
    output_unit_layers,
)
from dkdp_keras.layers import MaskedBatchNormalization
from dkdp_keras.prunable import plain_weights, strip

ALIGN = 16  # what a compacted group's width is a multiple of (rule 4 above)


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
    if is_operation(layer):  # a keras.ops call, with its constants
        call = keras.Model(layer.input, layer.output)
        out = ops.convert_to_numpy(call(ops.zeros(shape)))
    else:
        out = ops.convert_to_numpy(layer(ops.zeros(shape), training=False))
    channels = out.shape[-1]
    return np.all(out.reshape(-1, channels) == 0, axis=0)


def compact(model, align=ALIGN):
    """A physically smaller plain Keras model with the same outputs.

    Args:
        model: a built Sequential or Functional model, masked (from
            `prunable`) or plain (pruned units are then all-zero columns).
        align: a group of at least 4 x `align` channels keeps a multiple
            of `align` of them, some as zero channels (rule 4 of this
            module: XNNPACK's float32 kernels run 16 outputs at a time).
            1 keeps no zero channel: the smallest file, for a size budget
            (a full-int8 file of tens of kB, where 16 channels of a layer
            that feeds a Flatten are thousands of bytes).

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
    align = _validation.number("align", align, low=1, integer=True)
    plan = _plan(model, align=align)
    if isinstance(plan, str):
        warnings.warn(
            f"compact: {plan}; this version compacts only graphs that it can "
            "read whole, where each layer is used once. Returning the "
            "stripped model (masks baked in).",
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
        node = plan.graph.node_of.get(id(layer))
        if node is not None and node.kind == "kernel":
            out_keep = plan.kept_outputs(layer)
            if out_keep is not None:
                key = "units" if "units" in config else "filters"
                config[key] = int(out_keep.size)
        elif node is not None and isinstance(layer, keras.layers.Reshape):
            channels = plan.kept_inputs(node.inputs[0])
            if channels is not None:
                config["target_shape"] = tuple(config["target_shape"][:-1]) + (
                    int(channels.size),)
        return cls.from_config(config)

    clone, pairs = _clone(model, clone_function)
    for old, new in pairs:
        if new.weights:
            new.set_weights(plan.weights(old))
    return clone


class _Plan:
    """What `compact` keeps of each layer, decided from the `DepGraph`."""

    def __init__(self, graph, kept_inputs, kept_outputs, blocked, plain=plain_weights,
                 padded_inputs=lambda key: None):
        self.graph = graph
        self.plain = plain
        self.kept_inputs = kept_inputs
        self.kept_outputs = kept_outputs
        self.padded_inputs = padded_inputs
        self.blocked = blocked

    def weights(self, layer):
        """`layer`'s plain weights as the compacted model holds them."""
        node = self.graph.node_of.get(id(layer))
        weights = self.plain(layer)
        if node is None or not weights:
            return weights
        if node.kind == "kernel":
            in_keep = self.kept_inputs(node.inputs[0])
            out_keep = self.kept_outputs(layer)
            if in_keep is not None:
                weights[0] = np.take(weights[0], in_keep, axis=-2)
                padded = self.padded_inputs(node.inputs[0])
                if padded is not None:  # zero channels kept for alignment
                    weights[0][..., padded, :] = 0
            if out_keep is not None:
                weights = [np.take(w, out_keep, axis=-1) for w in weights]
            return weights
        if node.kind != "carry":
            return weights
        channels = self.kept_inputs(node.inputs[0])
        if channels is None:
            return weights
        if isinstance(layer, depgraph.DEPTHWISE):
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
        return Counts.of(strip(model))
    params = macs = shape_params = shape_macs = 0
    for node in plan.graph.nodes:
        layer = node.op
        if is_operation(layer) or isinstance(layer, keras.layers.InputLayer):
            continue
        weights = plan.weights(layer)
        params += sum(int(np.count_nonzero(w)) for w in weights)
        shape_params += sum(int(w.size) for w in weights)
        if is_kernel_layer(layer):
            macs += int(np.count_nonzero(weights[0])) * positions(layer)
            shape_macs += int(weights[0].size) * positions(layer)
    warn_guessed(model)
    return Counts(params, macs, (shape_params, shape_macs))


class Counts(tuple):
    """`(non-zero parameters, MACs per example)` of a compacted model, and in
    `computed` the same of its shapes, zeros included: what a runtime stores
    and computes (the zero channels `compact` keeps for alignment, the zeros
    of a pruned kernel), which a latency estimate needs."""

    def __new__(cls, params, macs, computed=None):
        counts = super().__new__(cls, (params, macs))
        counts.computed = (params, macs) if computed is None else tuple(computed)
        return counts

    @classmethod
    def of(cls, model):
        """The counts of a plain (or masked, uncompacted) model as it is."""
        return cls(count_params(model), count_macs(model),
                   (count_params(model, nonzero=False), count_macs(model, nonzero=False)))


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


def _zero_channels(graph, plain, channels, protected, snapshot, structural=False):
    """Group -> which of its channels every layer that reads them sees as
    exact zeros (then removing them changes no output).

    Zeros are followed tensor by tensor: a Dense/Conv unit is zero when
    its mask column and bias are (and its activation keeps 0); a
    channel-wise layer keeps a zero where it maps 0 to 0; a sum (Add, ...)
    is zero where all its inputs are, a product where any is (a
    squeeze-and-excite gate of 0.5 times a removed channel is 0). With
    `structural`, a plain BatchNormalization never keeps a zero, whatever
    its weights are now (training moves them)."""
    at = {}  # tensor key -> bool per channel of its last axis

    def width(key):
        return sum(graph.size[g] for g in graph.groups(key))

    for node in graph.nodes:
        ins = [at.get(k) for k in node.inputs]
        if node.kind == "kernel":
            out = _zero_units(node.op, protected, plain)
        elif node.kind in ("carry", "flatten") and ins[0] is not None:
            out = ins[0]
            if node.kind == "carry" and structural and type(node.op) is (
                    keras.layers.BatchNormalization):
                out = np.zeros_like(out)  # its offsets are trained away from 0
            elif node.kind == "carry":
                out = out & _zero_preserved(node.op, graph.shapes[node.inputs[0]],
                                            channels.get(node.name), snapshot)
        elif node.kind == "concat" and all(z is not None for z in ins):
            out = np.concatenate(ins)
        elif node.kind == "merge" and all(z is not None for z in ins):
            wide = [z for z in ins if z.size == max(v.size for v in ins)]
            product = type(node.op).__name__ == "Multiply"
            out = np.logical_or.reduce(wide) if product else np.logical_and.reduce(wide)
        else:
            out = None
        for key in node.outputs:
            at[key] = out if out is not None else np.zeros(width(key), bool)

    zero = {g: np.ones(graph.size[g], bool) for g in graph.roots()}
    for node in graph.nodes:
        if node.kind != "kernel" or node.inputs[0] not in at:
            continue
        offset = 0
        for group in graph.groups(node.inputs[0]):
            size = graph.size[group]
            if group in zero:
                zero[group] &= at[node.inputs[0]][offset : offset + size]
            offset += size
    return zero


def removable_groups(model):
    """The `depgraph` groups of `model` whose channels would all be exact
    zeros wherever they are read if every masked layer removed every unit:
    those a structured prune can remove (a group read through a plain
    BatchNormalization, which turns a removed channel into a constant, or
    by a model output or a layer the graph cannot see through, is not)."""
    graph = depgraph.of(model)
    if graph.unsupported is not None:
        return set()
    masks = {layer.name: np.zeros(tuple(layer.kernel_mask.shape), "float32")
             for layer in iter_layers(model) if is_masked(layer)}
    plain, channels = _with_masks(model, masks)
    zero = _zero_channels(graph, plain, channels, set(), None, structural=True)
    return {g for g, z in zero.items() if z.all() and not graph.pinned[g]}


def zero_channels(model):
    """Group of `depgraph.of(model)` -> which of its channels are exact
    zeros wherever they are read (what `compact` removes, before it keeps
    some as zeros to align widths)."""
    graph = depgraph.of(model)
    plain, channels = _with_masks(model, None)
    return _zero_channels(graph, plain, channels, output_unit_layers(model), None)


def _plan(model, masks=None, snapshot=None, align=ALIGN):
    """The `_Plan` of `model` (with `masks` in place of its masked layers'
    own, and its weights from `snapshot`: see `deployed_counts`), widths
    aligned to multiples of `align` (1: not aligned), or why its graph
    cannot be read (then nothing can be compacted)."""
    graph = depgraph.of(model)
    if graph.unsupported is not None:
        return graph.unsupported
    plain, channels = _with_masks(model, masks, snapshot)
    if "protected" not in graph.memo:
        graph.memo["protected"] = output_unit_layers(model)
    protected = graph.memo["protected"]
    zero = _zero_channels(graph, plain, channels, protected, snapshot)
    keep, padding = {}, {}
    blocked = set()
    for group in graph.roots():
        values = zero[group]
        if not values.any():
            continue
        if graph.pinned[group]:
            blocked.update(n for n in graph.pinned[group]
                           if n not in ("model output", "model input", "fixed"))
            continue
        kept = np.flatnonzero(~values)
        if align > 1 and values.size >= 4 * align and kept.size % align:
            # Rule 4: the first removable channels stay, as zeros (all of
            # them when the aligned width is not below the group's).
            aligned = min(-(-kept.size // align) * align, values.size)
            padding[group] = np.flatnonzero(values)[: aligned - kept.size]
            kept = np.sort(np.concatenate([kept, padding[group]]))
        keep[group] = kept if kept.size else np.array([0])  # the graph stays valid

    def kept_inputs(key):
        """Indices of the features tensor `key` keeps, or None for all."""
        groups = graph.groups(key)
        if not any(g in keep for g in groups):
            return None
        channels, offset = [], 0
        for group in groups:
            size = graph.size[group]
            channels.append(offset + keep.get(group, np.arange(size)))
            offset += size
        channels = np.concatenate(channels)
        if key not in graph.flat:
            return channels
        positions = graph.flat[key]
        return (np.arange(positions)[:, None] * offset + channels[None, :]).reshape(-1)

    def padded_inputs(key):
        """Which of `kept_inputs(key)` are zero channels kept for alignment
        (a boolean per kept input), or None when there are none."""
        groups = graph.groups(key)
        if not any(g in padding for g in groups):
            return None
        flags = np.concatenate([
            np.isin(keep.get(g, np.arange(graph.size[g])), padding.get(g, ()))
            for g in groups])
        return np.tile(flags, graph.flat.get(key, 1))

    def kept_outputs(layer):
        groups = graph.groups(graph.output_of(layer))
        return keep.get(groups[0]) if len(groups) == 1 else None

    return _Plan(graph, kept_inputs, kept_outputs, blocked, plain, padded_inputs)
