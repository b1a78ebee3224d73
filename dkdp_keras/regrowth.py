"""Regrowth: give a pruned network back units, within a budget, without
changing what it computes (for the next task of the continual mode).

`regrow(model, budget)` revives pruned channels of a masked model: the
same share of each channel group's pruned channels (drawn at random), the
largest share whose compacted model still fits `budget`. A revived
channel gets fresh incoming weights (its layer's kernel initializer, bias
zero; a depthwise convolution in its group likewise), BatchNormalization
reset to the identity (gamma 1, beta 0, mean 0, variance 1), and the rows
of every layer that reads it set to zero: its output reaches nothing yet,
so the model's outputs are exactly those before, and training grows the
outgoing weights from zero where the new data needs them (as in
function-preserving growth, Chen et al. 2016's Net2Net; Evci et al.
2022's GradMax starts new units the same way).

The budget is counted with the revived channels' outgoing rows as they
were before they were pruned, so that the network can grow them back
without going over it; DKDPCallback holds the budget while it trains.
Only channels removed in every layer that writes them are revived; the
groups of the model's outputs and inputs are never touched.
"""

import keras
import numpy as np
from keras import ops

from dkdp_keras import depgraph
from dkdp_keras.budget import Budget, deployed_counts
from dkdp_keras.compaction import zero_channels
from dkdp_keras.graph import batchnorm_after, check_graph_model, is_masked, iter_layers
from dkdp_keras.prunable import sync_batchnorm


def _unit_axis(layer):
    """The kernel axis of `layer`'s units: a depthwise kernel is
    `(..., channels, 1)`, every other `(..., units)`."""
    return -2 if isinstance(layer, depgraph.DEPTHWISE) else -1


def _units(array, layer, units):
    """The index of `units` along `layer`'s unit axis of a kernel-shaped array."""
    index = [slice(None)] * array.ndim
    index[_unit_axis(layer)] = np.asarray(units)
    return tuple(index)


def check_budget(budget, where="regrow(budget=...)"):
    """Refuse anything but a `dkdp_keras.Budget`, naming `where` it came."""
    if not isinstance(budget, Budget):
        raise TypeError(
            f"{where} takes the dkdp_keras.Budget that DKDPCallback holds during "
            f"the next task, got {budget!r}.")


def regrowable(graph, group):
    """Whether `group`'s channels may be pruned and regrown: not pinned, and
    written only by masked layers."""
    owners = [node.op for node in graph.owners[group]]
    return not graph.pinned[group] and bool(owners) and all(is_masked(o) for o in owners)


def dead_channels(model):
    """Group -> the indices of its channels that are exact zeros wherever
    they are read (those `compact` removes), for the `regrowable` groups."""
    graph = depgraph.of(model)
    zero = zero_channels(model)
    dead = {}
    for group in graph.roots():
        if not regrowable(graph, group):
            continue
        if zero[group].any():
            dead[group] = np.flatnonzero(zero[group])
    return dead


def _channel_layers(graph, group):
    """The masked layers whose units are `group`'s channels: its writers
    and the depthwise convolutions that carry it."""
    layers = [node.op for node in graph.owners[group]]
    for node in graph.nodes:
        if (isinstance(node.op, depgraph.DEPTHWISE) and is_masked(node.op)
                and graph.groups(node.outputs[0]) == [group]):
            layers.append(node.op)
    return layers


def _masks_with(base, graph, revived):
    """Layer name -> kernel mask: `base`'s, with the `revived` channels'
    units kept."""
    masks = {name: mask.copy() for name, mask in base.items()}
    for group, channels in revived.items():
        for layer in _channel_layers(graph, group):
            masks[layer.name][_units(masks[layer.name], layer, channels)] = 1.0
    return masks


def _readers(graph, group):
    """`(kernel layer, input feature indices)` of each Dense/Conv layer
    that reads `group`, as functions of the group's channel indices."""
    out = []
    for node in graph.nodes:
        if node.kind != "kernel":
            continue
        key = node.inputs[0]
        groups = graph.groups(key)
        if group not in groups:
            continue
        offset = sum(graph.size[g] for g in groups[: groups.index(group)])
        width = sum(graph.size[g] for g in groups)
        positions = graph.flat.get(key, 1)

        def features(channels, offset=offset, width=width, positions=positions):
            return (np.arange(positions)[:, None] * width
                    + (offset + np.asarray(channels))[None, :]).reshape(-1)

        out.append((node.op, features))
    return out


def _fits(budget, model, masks):
    usage = budget.usage(model, counts=deployed_counts(model, masks))
    return all(value <= 1.0 for value in usage.values())


def regrow(model, budget, seed=0, steps=12):
    """Revive pruned channels of the masked `model` in place, as many as
    `budget` allows (see the module docstring). Returns the number of
    channels revived per group (a dict; empty when none fit or none was
    pruned).

    Args:
        model: a masked model (from `prunable`, as DKDPModel's teacher).
        budget: a `dkdp_keras.Budget` that the compacted model must fit.
        seed: which pruned channels are revived first, and their weights.
        steps: bisection steps on the share of pruned channels revived.
    """
    check_budget(budget)
    check_graph_model(model)
    graph = depgraph.of(model)
    if graph.unsupported is not None:
        raise ValueError(
            f"regrow: the graph of model '{model.name}' cannot be read whole "
            f"({graph.unsupported}), so its pruned channels cannot be revived "
            "safely; call next_task without regrow.")
    dead = dead_channels(model)
    base = {layer.name: ops.convert_to_numpy(layer.kernel_mask)
            for layer in iter_layers(model) if is_masked(layer)}
    rng = np.random.default_rng(seed)
    order = {group: rng.permutation(channels) for group, channels in dead.items()}

    def revived(share):
        return {g: np.sort(o[: int(np.ceil(share * len(o)))]) for g, o in order.items()
                if int(np.ceil(share * len(o)))}

    def fits(share):
        return _fits(budget, model, _masks_with(base, graph, revived(share)))

    low, high = 0.0, 1.0
    if not order or not fits(0.0):
        return {}
    if fits(1.0):
        low = 1.0
    else:
        for _ in range(steps):
            middle = (low + high) / 2
            if fits(middle):
                low = middle
            else:
                high = middle
    chosen = revived(low)
    if not chosen:
        return {}
    masks = _masks_with(base, graph, chosen)
    for group, channels in chosen.items():
        for layer in _channel_layers(graph, group):
            _fresh_units(layer, channels, rng)
        for layer, features in _readers(graph, group):
            kernel = ops.convert_to_numpy(layer.kernel).copy()
            kernel[..., features(channels), :] = 0.0
            layer.kernel.assign(kernel)
    for layer in iter_layers(model):
        if is_masked(layer):
            layer.kernel_mask.assign(masks[layer.name])
    sync_batchnorm(model)
    bns = batchnorm_after(model)
    for group, channels in chosen.items():
        for layer in _channel_layers(graph, group):
            if layer.name in bns:
                _reset_channels(bns[layer.name], channels)
    return {group: int(len(channels)) for group, channels in chosen.items()}


def _fresh_units(layer, units, rng):
    """New incoming weights for `units` of a masked kernel layer: drawn
    from its kernel initializer, bias zero."""
    initializer = getattr(layer, "depthwise_initializer", None) or layer.kernel_initializer
    seed = int(rng.integers(2**31 - 1))
    config = keras.initializers.serialize(initializer)
    if isinstance(config, dict) and "config" in config and "seed" in config["config"]:
        config = {**config, "config": {**config["config"], "seed": seed}}
    fresh = ops.convert_to_numpy(keras.initializers.get(config)(tuple(layer.kernel.shape)))
    kernel = ops.convert_to_numpy(layer.kernel).copy()
    kernel[_units(kernel, layer, units)] = fresh[_units(fresh, layer, units)]
    layer.kernel.assign(kernel)
    if getattr(layer, "bias", None) is not None:
        bias = ops.convert_to_numpy(layer.bias).copy()
        bias[units] = 0.0
        layer.bias.assign(bias)


def _reset_channels(bn, channels):
    """BatchNormalization channels back to the identity."""
    for name, value in (("gamma", 1.0), ("beta", 0.0), ("moving_mean", 0.0),
                        ("moving_variance", 1.0)):
        variable = getattr(bn, name, None)
        if variable is None:
            continue
        array = ops.convert_to_numpy(variable).copy()
        array[channels] = value
        variable.assign(array)
