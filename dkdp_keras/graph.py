"""The bottom of the library: what a Sequential/Functional model is made
of, read with the public API (`model.layers`, `layer.input`,
`layer.output`): which layers it has (nested models included), which are
the library's masked twins, which BatchNormalization follows a layer,
which layers own the model's output units; and copies of a model (cloned,
rewired). Which channels go together is `depgraph`'s, read from the
model's config."""

import keras

from dkdp_keras.layers import MASKED_TWINS, MaskedBatchNormalization, MaskedKernelMixin

def _is_graph_model(model):
    """True for Sequential and Functional models, which can be cloned."""
    names = {cls.__name__ for cls in type(model).__mro__}
    return "Sequential" in names or "Functional" in names


def check_graph_model(model, argument="model"):
    """Raise a clear error unless `model` is a built Sequential/Functional model."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"{argument} must be a keras.Model (Sequential or Functional), got "
            f"{type(model).__name__}: {model!r:.80}. Load a saved model with "
            "keras.saving.load_model(path) first."
        )
    if not _is_graph_model(model):
        raise TypeError(
            f"{argument} is a subclassed keras.Model ({type(model).__name__}), "
            "whose layers cannot be rewired. Build the same network as a "
            "Sequential or Functional model (keras.Model(inputs, outputs)), or "
            "use the masked layers (dkdp_keras.MaskedDense, MaskedConv2D, ...) "
            "directly inside your subclass."
        )
    if not model.built or not model.inputs:
        raise ValueError(
            f"{argument} '{model.name}' is not built: give it an input "
            "(keras.Input(shape=...)) or call model.build(input_shape) first."
        )


def iter_layers(model):
    """Every layer of `model`, nested models' layers included, in order."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer)
        else:
            yield layer


def is_masked(layer):
    """True if `layer` is one of the library's masked kernel layers."""
    return isinstance(layer, MaskedKernelMixin)


def is_strippable(layer):
    """True for every library layer that `strip` turns back into Keras'."""
    return isinstance(layer, (MaskedKernelMixin, MaskedBatchNormalization))


def _twin_of(layer):
    """The masked class for `layer`'s exact class, or None."""
    return MASKED_TWINS.get(type(layer))


def is_operation(node):
    """True for a `keras.ops` call in a functional graph (`x + 3.0`,
    `keras.ops.sigmoid(x)`): an operation that is not a layer, and has no
    weights."""
    return isinstance(node, keras.Operation) and not isinstance(node, keras.layers.Layer)


def _clone(model, clone_function):
    """`(clone, [(old layer, new layer)])`: `keras.models.clone_model` with
    `clone_function` for every layer; `keras.ops` calls are copied as
    they are and not listed."""
    pairs = []

    def recording(layer):
        if is_operation(layer):
            return layer.__class__.from_config(layer.get_config())
        new = clone_function(layer)
        pairs.append((layer, new))
        return new

    clone = keras.models.clone_model(
        model, clone_function=recording, recursive=True
    )
    return clone, pairs


def is_kernel_layer(layer):
    """True for masked layers and for the plain layers that have a twin."""
    return is_masked(layer) or type(layer) in MASKED_TWINS



#: Layers whose output has the same units (channels) as their input, one to
#: one: a unit of the layer before them is a unit of their output.
UNIT_PRESERVING = (
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.PReLU,
    keras.layers.Softmax,
    keras.layers.Dropout,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.Identity,
)


def _single(tensors):
    if isinstance(tensors, (list, tuple)):
        return tensors[0] if len(tensors) == 1 else None
    return tensors


def _flat(tensors):
    return list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]


def is_wired(model):
    """True when every layer's first call, the one `layer.input` and
    `layer.output` show, is its call in `model`'s graph.

    A Sequential rebuilt from its config (every Sequential loaded from a
    `.keras` file) is not: Keras calls its first layers again each time it
    adds a layer, so their first call belongs to an unfinished graph.
    """
    return _first_misreading(model) is None


def _first_misreading(model):
    """The name of the first layer of `model` whose first call reads a
    tensor that the graph has not produced before it (a layer called again
    elsewhere, or a graph left unfinished), or None."""
    produced = {id(t) for t in model.inputs}
    for layer in model.layers:
        try:
            inputs, outputs = _flat(layer.input), _flat(layer.output)
        except (AttributeError, ValueError):
            return None  # a layer used at several places: callers see to it
        if not isinstance(layer, keras.layers.InputLayer) and any(
            id(t) not in produced for t in inputs
        ):
            return layer.name
        produced.update(id(t) for t in outputs)
    return None


def rewired(model):
    """`model` itself when `is_wired(model)`, else a copy with the same
    layer names, configurations and weights (masks included) whose graph is
    wired, for the functions that read the graph from `layer.input`."""
    if is_wired(model):
        return model
    copy, pairs = _clone(
        model, lambda layer: layer.__class__.from_config(layer.get_config())
    )
    for old, new in pairs:
        new.set_weights(old.get_weights())
    return copy


def output_unit_layers(model):
    """Names of the kernel layers whose units are the model's output units.

    Walks back from each model output through unit-preserving layers
    (activations, dropout, normalisation) to the Dense/Conv layer that
    produces those units. Removing one of its units would remove an output.
    """
    model = rewired(model)
    producer = _producers(model)
    names = set()
    for tensor in model.outputs:
        layer = producer.get(id(tensor))
        while layer is not None:
            if isinstance(layer, keras.Model):
                names |= output_unit_layers(layer)
                break
            if is_kernel_layer(layer):
                names.add(layer.name)
                break
            if not isinstance(layer, UNIT_PRESERVING):
                break
            try:
                previous = _single(layer.input)
            except (AttributeError, ValueError):
                break
            layer = producer.get(id(previous)) if previous is not None else None
    return names


def _producers(model):
    producer = {}
    for layer in model.layers:
        try:
            out = layer.output
        except (AttributeError, ValueError):
            continue
        for tensor in out if isinstance(out, (list, tuple)) else [out]:
            producer[id(tensor)] = layer
    return producer


def batchnorm_after(model, source_filter=is_masked):
    """Map layer name -> the BatchNormalization layer that reads its output
    directly (Conv -> BN -> activation), for every layer that passes
    `source_filter` (default: masked layers)."""
    view = rewired(model)
    producer = _producers(view)
    pairs = {}
    for layer in view.layers:
        if isinstance(layer, keras.Model):
            pairs.update(batchnorm_after(layer, source_filter))
            continue
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        try:
            source = producer.get(id(_single(layer.input)))
        except (AttributeError, ValueError):
            continue
        if source is not None and source_filter(source):
            pairs[source.name] = layer
    if view is not model:  # the layers of `model`, not of its copy
        own = {layer.name: layer for layer in iter_layers(model)}
        pairs = {name: own[bn.name] for name, bn in pairs.items()}
    return pairs
