"""The channel dependency graph of a model: which channels go together.

After DepGraph (Fang et al., CVPR 2023), for Keras Sequential and
Functional models: built once per model (`of(model)`), then queried.

The graph is read from the model's config, its public serialisation, which
says which layer or `keras.ops` call reads which tensor (constants
included); nested Functional/Sequential models are flattened into it, so a
backbone inside a transfer-learning model is one graph with its head.

Every tensor's last axis (its channels) is a list of segments, each the
channels of one group. A Dense/Conv layer starts a group with its units.
Channel-wise layers and calls carry their input's groups (activations,
BatchNormalization, Dropout, pooling, ZeroPadding/Cropping/UpSampling,
depthwise convolutions with one output per channel, Reshape that keeps the
last axis, element-wise `keras.ops` with scalar constants). An
element-wise merge of two tensors (a residual Add, a squeeze-and-excite
Multiply, whose gate's channels are the feature's) joins their groups
into one; Concatenate lays its inputs' segments side by side; Flatten
spreads them over positions. Any other layer or call is a barrier: the
groups it reads are pinned (no channel of them can be removed) and it is
named in `blocked`. Model inputs and outputs pin their groups too.
"""

import weakref

import keras
import numpy as np

from dkdp_keras.graph import _flat, _is_graph_model, is_kernel_layer, is_operation

#: Layers that compute each channel from the same channel only.
CHANNEL_WISE = (
    keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU,
    keras.layers.ELU, keras.layers.Dropout, keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D, keras.layers.SpatialDropout3D,
    keras.layers.GaussianNoise, keras.layers.GaussianDropout,
    keras.layers.Identity, keras.layers.BatchNormalization,
    keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D,
    keras.layers.AveragePooling1D, keras.layers.AveragePooling2D,
    keras.layers.AveragePooling3D, keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D, keras.layers.GlobalAveragePooling3D,
    keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D, keras.layers.ZeroPadding1D,
    keras.layers.ZeroPadding2D, keras.layers.ZeroPadding3D,
    keras.layers.Cropping1D, keras.layers.Cropping2D, keras.layers.Cropping3D,
    keras.layers.UpSampling1D, keras.layers.UpSampling2D, keras.layers.UpSampling3D,
)
DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
#: Element-wise merge layers: their inputs' channels are one group.
MERGING = (
    keras.layers.Add, keras.layers.Subtract, keras.layers.Multiply,
    keras.layers.Average, keras.layers.Maximum, keras.layers.Minimum,
)
#: `keras.ops` calls that act on each entry alone (by class name).
OPS_UNARY = {
    "Relu", "Relu6", "Sigmoid", "HardSigmoid", "Silu", "HardSilu", "Swish",
    "HardSwish", "Gelu", "Elu", "Selu", "LeakyRelu", "Softplus", "Softsign",
    "Tanh", "Exp", "Log1p", "Abs", "Absolute", "Square", "Sqrt", "Negative",
    "Cast", "Clip", "Sin", "Cos", "Sign", "Round", "Floor", "Ceil",
}
#: `keras.ops` calls of two operands, entry by entry (with a scalar
#: constant they act like `OPS_UNARY`).
OPS_BINARY = {
    "Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Maximum",
    "Minimum", "Power",
}


class Node:
    """One layer or `keras.ops` call of the flattened graph: the keys of
    the tensors it reads and writes, and its non-tensor arguments."""

    def __init__(self, op, inputs, outputs, constants, options):
        self.op, self.inputs, self.outputs = op, inputs, outputs
        self.constants, self.options = constants, options
        self.kind = None

    @property
    def name(self):
        return self.op.name


class Unsupported(Exception):
    """The graph cannot be read: `args[0]` names the layer and why;
    `shared` names a layer used at several places."""

    def __init__(self, why, shared=None):
        super().__init__(why)
        self.shared = shared


def _pairs(spec):
    """`input_layers`/`output_layers` of a config as [[name, node, index]]."""
    if isinstance(spec, dict):
        raise Unsupported("a model with named (dict) inputs or outputs")
    return [spec] if spec and isinstance(spec[0], str) else list(spec)


def _arguments(value, tensors, constants):
    """Collect the `keras_history` of every tensor in a serialised call
    argument, and the other leaves as constants."""
    if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
        name, _, index = value["config"]["keras_history"]
        tensors.append(f"{name}:{index}")
    elif isinstance(value, (list, tuple)):
        for item in value:
            _arguments(item, tensors, constants)
    elif isinstance(value, dict):
        for item in value.values():
            _arguments(item, tensors, constants)
    else:
        constants.append(value)


def _walk(model, inputs, prefix, nodes, shapes):
    """Append the nodes of `model`, its inputs bound to the tensor keys
    `inputs`; return the keys of its outputs."""
    if not _is_graph_model(model):
        raise Unsupported(f"'{model.name}' is a subclassed model")
    if "Sequential" in {c.__name__ for c in type(model).__mro__}:
        key = inputs[0]
        for layer in model.layers:
            if isinstance(layer, keras.Model):
                key = _walk(layer, [key], f"{prefix}{layer.name}/", nodes, shapes)[0]
                continue
            out = f"{prefix}{layer.name}:0"
            nodes.append(Node(layer, [key], [out], [], {}))
            shapes[out] = tuple(layer.output.shape)
            key = out
        return [key]
    config = model.get_config()
    by_name = {op.name: op for op in model.operations}
    local = {}
    for (name, _, index), key in zip(_pairs(config["input_layers"]), inputs):
        local[f"{name}:{index}"] = key
    for entry in config["layers"]:
        if entry["class_name"] == "InputLayer":
            continue
        op = by_name[entry["name"]]
        calls = entry.get("inbound_nodes") or []
        if len(calls) != 1:
            raise Unsupported(f"layer '{op.name}' is used at {len(calls)} places",
                              shared=op.name)
        tensors, constants = [], []
        _arguments(calls[0].get("args", []), tensors, constants)
        options = {}
        for k, v in (calls[0].get("kwargs") or {}).items():
            before = len(tensors)
            _arguments(v, tensors, [])
            if len(tensors) == before:
                options[k] = v
        keys = [local[t] for t in tensors]
        if isinstance(op, keras.Model):
            outs = _walk(op, keys, f"{prefix}{op.name}/", nodes, shapes)
        else:
            outs = [f"{prefix}{op.name}:{j}" for j in range(len(_flat(op.output)))]
            nodes.append(Node(op, keys, outs, constants, options))
            for key, tensor in zip(outs, _flat(op.output)):
                shapes[key] = tuple(tensor.shape)
        for j, key in enumerate(outs):
            local[f"{op.name}:{j}"] = key
    return [local[f"{name}:{index}"] for name, _, index in _pairs(config["output_layers"])]


def _channels_last(layer):
    return getattr(layer, "data_format", "channels_last") != "channels_first"


def _scalar(value):
    return value is None or isinstance(value, (bool, int, float)) or (
        np.ndim(value) == 0 and not isinstance(value, (str, dict)))


def _kind(node, shapes):
    """What a node does to channels: "kernel", "carry" (channel-wise),
    "merge", "concat", "flatten" or "barrier"."""
    op = node.op
    ins = [shapes.get(k) for k in node.inputs]
    outs = [shapes.get(k) for k in node.outputs]
    same = (len(ins) == 1 and len(outs) == 1 and ins[0] and outs[0]
            and ins[0][-1] == outs[0][-1])
    if is_operation(op):
        name = type(op).__name__
        if name == "Concatenate" and len(outs) == 1:
            axis = node.options.get("axis", node.constants[-1] if node.constants else 0)
            return "concat" if axis in (-1, len(outs[0]) - 1) else "barrier"
        if not all(_scalar(c) for c in node.constants):
            return "barrier"  # an array constant would need slicing too
        if same and (name in OPS_UNARY or name in OPS_BINARY):
            return "carry"
        if name in OPS_BINARY and len(ins) == 2:
            return "merge"
        return "barrier"
    if isinstance(op, keras.layers.InputLayer):
        return "barrier"
    if not _channels_last(op):
        return "barrier"
    if is_kernel_layer(op) and not isinstance(op, DEPTHWISE):
        return "kernel"
    if isinstance(op, DEPTHWISE):
        return "carry" if op.depth_multiplier == 1 and same else "barrier"
    if isinstance(op, keras.layers.BatchNormalization):
        axis = op.axis if isinstance(op.axis, int) else None
        return "carry" if same and axis in (-1, len(ins[0]) - 1) else "barrier"
    if isinstance(op, CHANNEL_WISE) or (
            isinstance(op, keras.layers.Reshape) and same):
        return "carry" if same else "barrier"
    if isinstance(op, keras.layers.Flatten):
        return "flatten"
    if isinstance(op, MERGING):
        return "merge"
    if isinstance(op, keras.layers.Concatenate):
        return "concat" if op.axis in (-1, len(outs[0]) - 1) else "barrier"
    return "barrier"


class DepGraph:
    """The channel groups of one model; see the module docstring.

    Attributes:
        nodes: the flattened graph's layers and calls, in order.
        segments: tensor key -> the groups along its last axis.
        size: group -> its number of channels.
        owners: group -> the kernel nodes whose units are its channels.
        pinned: group -> why no channel of it can go (barriers' names,
            "model input", "model output").
        unsupported: why the graph could not be read, or None.
        shared: the name of a layer used at several places, or None.
    """

    def __init__(self, model):
        self.nodes, self.shapes = [], {}
        self.unsupported = self.shared = None
        self.segments, self.flat, self.size = {}, {}, {}
        self.parent, self.owners, self.pinned = {}, {}, {}
        self.node_of = {}
        self.memo = {}  # what users of the graph derive from it once
        inputs = [f"input:{i}" for i in range(len(model.inputs))]
        for key, tensor in zip(inputs, model.inputs):
            self.shapes[key] = tuple(tensor.shape)
        try:
            self.outputs = _walk(model, inputs, "", self.nodes, self.shapes)
        except Unsupported as why:
            self.unsupported, self.shared, self.nodes = str(why), why.shared, []
            return
        for key in inputs:
            self._start(key, "model input")
        for node in self.nodes:
            self.node_of[id(node.op)] = node
            self._add(node)
        for key in self.outputs:
            self._pin(key, "model output")

    # ----------------------------------------------------------- building
    def find(self, group):
        while self.parent[group] != group:
            group = self.parent[group]
        return group

    def groups(self, key):
        """The groups along tensor `key`'s last axis, in channel order."""
        return [self.find(g) for g in self.segments.get(key, [])]

    def _start(self, key, why=None, owner=None):
        shape = self.shapes.get(key)
        group = key
        self.segments[key] = [group]
        self.parent[group] = group
        self.size[group] = int(shape[-1]) if shape and shape[-1] is not None else 0
        self.owners[group] = [owner] if owner is not None else []
        self.pinned[group] = [] if why is None else [why]

    def _pin(self, key, why):
        for group in self.groups(key):
            self.pinned[group].append(why)

    def _join(self, groups):
        first = groups[0]
        for other in groups[1:]:
            if other != first:
                self.parent[other] = first
                self.owners[first] += self.owners[other]
                self.pinned[first] += self.pinned[other]
        return first

    def _add(self, node):
        kind = node.kind = _kind(node, self.shapes)
        ins = [k for k in node.inputs if k in self.segments]
        plain = all(k not in self.flat for k in node.inputs)
        if kind == "kernel" and len(node.inputs) == 1:
            self._start(node.outputs[0], owner=node)
            return
        if kind == "carry" and len(node.inputs) == 1 and ins and (
                plain or not isinstance(node.op, keras.layers.Reshape)):
            self.segments[node.outputs[0]] = self.segments[ins[0]]
            if not plain:  # channel-wise on flattened features: still flat
                self.flat[node.outputs[0]] = self.flat[ins[0]]
            return
        if kind == "flatten" and len(node.inputs) == 1 and ins and plain:
            self.segments[node.outputs[0]] = self.segments[ins[0]]
            shape = self.shapes[ins[0]]
            self.flat[node.outputs[0]] = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
            return
        if kind == "concat" and len(ins) == len(node.inputs) and plain:
            self.segments[node.outputs[0]] = [g for k in ins for g in self.segments[k]]
            return
        if kind == "merge" and len(ins) == len(node.inputs) >= 2 and plain:
            sizes = [[self.size[g] for g in self.groups(k)] for k in ins]
            widest = max(range(len(ins)), key=lambda i: sum(sizes[i]))
            wide = [k for k, s in zip(ins, sizes) if s == sizes[widest]]
            for k, s in zip(ins, sizes):  # broadcast: one channel for all
                if s != sizes[widest]:
                    if sum(s) != 1:
                        break
                    self._pin(k, node.name)
            else:
                self.segments[node.outputs[0]] = [
                    self._join(list(gs)) for gs in zip(*(self.groups(k) for k in wide))]
                return
        # A barrier, or a node reading a flattened or unknown tensor.
        for key in ins:
            self._pin(key, node.name)
        node.kind = "barrier"
        for key in node.outputs:
            self._start(key, why="fixed")

    # ----------------------------------------------------------- queries
    def roots(self):
        """The groups (each by its representative) that kernel layers produce."""
        return [g for g in self.size if self.find(g) == g and self.owners[g]]

    def members(self, group):
        """The kernel nodes whose units are `group`'s channels and the
        depthwise nodes that carry them (one unit per channel): what a
        structured prune of the group masks together."""
        group = self.find(group)
        carriers = [n for n in self.nodes if n.kind == "carry"
                    and isinstance(n.op, DEPTHWISE)
                    and self.groups(n.inputs[0]) == [group]]
        return self.owners[group] + carriers

    def shapes_at(self, input_shape):
        """Tensor key -> its shape when the (single) model input has
        `input_shape` (batch axis included), as far as the layers'
        `compute_output_shape` and the channel-wise calls tell."""
        if len(self.shapes) == 0 or self.unsupported is not None:
            return {}
        found = {"input:0": tuple(input_shape)}
        for node in self.nodes:
            ins = [found.get(k) for k in node.inputs]
            if any(s is None for s in ins):
                continue
            try:
                if is_operation(node.op):
                    if node.kind not in ("carry", "merge"):
                        continue
                    out = [tuple(np.broadcast_shapes(*[tuple(1 if d is None else d for d in s)
                                                      for s in ins]))]
                else:
                    out = node.op.compute_output_shape(ins[0] if len(ins) == 1 else ins)
                    out = [tuple(out)] if not isinstance(out[0], (tuple, list)) else out
            except Exception:  # a layer that cannot say: its outputs stay unknown
                continue
            for key, shape in zip(node.outputs, out):
                found[key] = tuple(shape)
        return found

    def output_of(self, layer):
        return self.node_of[id(layer)].outputs[0]


_GRAPHS = weakref.WeakKeyDictionary()


def of(model):
    """The `DepGraph` of `model`, built on first use and kept with it."""
    try:
        return _GRAPHS[model]
    except (KeyError, TypeError):
        pass
    graph = DepGraph(model)
    try:
        _GRAPHS[model] = graph
    except TypeError:
        pass
    return graph
