"""A narrower copy of a model, through its channel groups (the student
`student="auto"` distils into).

Every `depgraph` group is narrowed once, so the members that an Add or a
squeeze-and-excite Multiply joins keep equal widths, and a Reshape that
carries channels gets the narrower width in its target shape. A group
stays as wide as it is where the model's outputs read it (their units are
the task's) or where a layer that holds a width of its own reads it (a
Reshape that moves the channel axis, a `keras.ops` call with constants).
"""

import keras

from dkdp_keras import depgraph
from dkdp_keras.graph import _clone, check_graph_model, is_strippable


def group_widths(model, width):
    """Group -> its width in the narrower copy: `width` times (`width(group)`
    times when it is a callable), at least one channel, except the groups
    that keep theirs (any that is pinned)."""
    graph = depgraph.of(model)
    return {
        group: graph.size[group] if graph.pinned[group]
        else max(1, int(round(graph.size[group] * (width(group) if callable(width) else width))))
        for group in graph.roots()
    }


def width_copy(model, width, name=None):
    """A freshly initialised plain copy of `model` with every channel group
    `width` times as wide (see the module docstring); masked layers become
    their plain Keras layers.

    Args:
        model: a built Sequential or Functional model (masked or not).
        width: factor in (0, 1] (or larger, for a wider copy), or a
            callable group -> factor for groups of different widths.
        name: name of the copy (default: `<model.name>_w<width>`).
    """
    check_graph_model(model)
    graph = depgraph.of(model)
    if graph.unsupported is not None:
        shared = graph.shared
        why = (f"calls a layer at more than one place (layer '{shared}'): a "
               "narrower copy would feed the shared layer inputs of two widths"
               if shared is not None else f"cannot be read whole ({graph.unsupported})")
        raise ValueError(
            f"student='auto' builds a narrower copy of the teacher, and model "
            f"'{model.name}' {why}. Pass student= a Keras model of your own "
            "(the teacher's input and output shapes) or a callable teacher -> "
            "student."
        )
    widths = group_widths(model, width)

    def channels(key):
        return sum(widths.get(g, graph.size[g]) for g in graph.groups(key))

    def clone_function(layer):
        if is_strippable(layer):
            cls, config = layer.base_class, layer.base_config()
        else:
            cls, config = layer.__class__, layer.get_config()
        node = graph.node_of.get(id(layer))
        if node is not None and node.kind == "kernel":
            for key in ("units", "filters"):
                if key in config:
                    config[key] = widths[graph.groups(node.outputs[0])[0]]
        elif node is not None and node.kind == "carry" and isinstance(
                layer, keras.layers.Reshape):
            config["target_shape"] = tuple(config["target_shape"][:-1]) + (
                channels(node.inputs[0]),)
        return cls.from_config(config)

    copy, _ = _clone(model, clone_function)
    copy.name = name or (f"{model.name}_mixed" if callable(width) else f"{model.name}_w{width:g}")
    return copy
