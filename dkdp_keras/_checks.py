"""What `DKDPCallback` refuses before training, each with what to do."""

import os

import keras

from dkdp_keras import _validation, depgraph
from dkdp_keras.prunable import masked_layers
from dkdp_keras.pruner import is_subclassed
from dkdp_keras.thresholds.adaptive import Adaptive


def one_callback_per_fit(callback):
    """Refuse a second DKDPCallback in the same fit: both would prune the
    same masks and overwrite each other's state. (Callbacks of one fit share
    one `params` dict; one left over from an earlier fit, or one that
    crashed, has another.)"""
    model = callback.model
    holder = getattr(model, "_dkdp_callback", None)
    if holder is not None and holder[1] is not callback and holder[0] is callback.params:
        raise ValueError(
            f"Two DKDPCallbacks were given to one fit of model '{model.name}': "
            "they would prune the same masks and overwrite each other's state. "
            "Pass one DKDPCallback (one criterion can combine several: "
            "importance.Combined)."
        )
    object.__setattr__(model, "_dkdp_callback", (callback.params, callback))


def _gradient_statistics(callback):
    """The gradient running means the callback's scoring reads (None: all),
    so that the training step keeps only those."""
    read = getattr(callback.importance, "gradient_statistics", None)
    if read is None:
        return None
    names = []
    granularities = [callback.granularity] + (["layer"] if callback.layer_importance else [])
    for granularity in granularities:
        found = read(granularity)
        if found is None:
            return None
        names += [n for n in found if n not in names]
    return tuple(names)


def before_training(callback, teacher):
    """The teacher's masked layers, once everything the callback needs of
    it is there; a DKDPModel is told which statistics to collect."""
    layers = masked_layers(teacher)
    subclassed = is_subclassed(teacher)
    if not layers:
        how = ("build its layers as dkdp_keras.MaskedDense, MaskedConv2D, ... "
               "inside the subclass" if subclassed else "make it with "
               "dkdp_keras.prunable(model) or train a dkdp_keras.DKDPModel")
        raise ValueError(
            f"DKDPCallback prunes masked layers, and model '{teacher.name}' has "
            f"none: {how}."
        )
    if subclassed:
        subclassed_model(callback, teacher, layers)
    if callback.calibration_data is not None:
        _validation.examples("calibration_data x", callback.calibration_data[0],
                             model=None if subclassed else teacher)
    needs = getattr(callback.importance, "requires", None)
    name = type(callback.importance).__name__
    if "gradient" in (needs or ()) and not callback._is_dkdp() \
            and callback.calibration_data is None:
        raise ValueError(
            f"{name} needs gradients, which only a DKDPModel collects while "
            "training: pass calibration_data=(x, y) to DKDPCallback, or train a "
            "DKDPModel."
        )
    frozen = [l for l in layers if not l.trainable]
    if frozen and "gradient" in (needs or ()):
        raise ValueError(frozen_message(name, teacher, frozen, callback._is_dkdp()))
    untracked = [l.name for l in layers if not getattr(l, "track_statistics", False)]
    if untracked and needs:
        raise ValueError(untracked_message(name, needs, teacher, untracked,
                                           callback._is_dkdp()))
    if callback._is_dkdp():
        callback.model.request_statistics(
            ("gradient", "activation") if needs is None else needs,
            gradient_statistics=_gradient_statistics(callback),
        )
    if callback.granularity == "unit":
        shared = depgraph.of(teacher).shared
        if shared is not None:
            raise ValueError(
                f"Model '{teacher.name}' calls a layer at more than one place "
                f"(a shared layer: '{shared}'), and unit pruning cannot remove a "
                "unit from one call of a layer but not from the other: "
                "compaction and export would fail "
                "after training. Use DKDPCallback(granularity='weight'), or give "
                "each call its own layer."
            )
    return layers


def subclassed_model(callback, teacher, layers):
    """Refuse what a subclassed model's masked layers cannot do: its graph
    (which layer feeds which) cannot be read, so units cannot be removed
    together with the inputs they feed, and a budget, which counts the
    model as compacted, cannot be counted. Its layers must be built: fit
    builds a subclassed model at its first batch, after on_train_begin."""
    kind = type(teacher).__name__
    unbuilt = [layer.name for layer in layers if not layer.built]
    if unbuilt:
        raise ValueError(
            f"The masked layers {_names(unbuilt)} of subclassed model "
            f"'{teacher.name}' ({kind}) are not built, and DKDPCallback reads "
            "their kernels before the first batch: call the model once on a "
            "batch (model(x[:1])) or model.build(input_shape) before fit.")
    works = ("Weight pruning works: DKDPCallback(granularity='weight', "
             "threshold=dkdp_keras.thresholds.ConstantSparsity(0.5) or "
             "PolynomialDecay(...)). For unit pruning or a budget, build the "
             "network as a Sequential or Functional model (keras.Model(inputs, "
             "outputs)) and make it with dkdp_keras.prunable(model).")
    if callback.granularity == "unit":
        raise ValueError(
            f"Model '{teacher.name}' is a subclassed keras.Model ({kind}), whose "
            "graph cannot be read: unit pruning must remove a unit together "
            "with the inputs it feeds in the next layer, and cannot find them. "
            + works)
    if isinstance(callback.threshold, Adaptive):
        raise ValueError(
            f"Model '{teacher.name}' is a subclassed keras.Model ({kind}), whose "
            "graph cannot be read: Adaptive's budget counts the model as "
            "compacted, which needs it. " + works)


def _names(names, shown=5):
    """'a', 'b', 'c' and 4 more."""
    said = ", ".join(repr(n) for n in names[:shown])
    return said + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _frozen_models(model):
    """Names of the nested models of `model` with weights and none of them
    trainable (set trainable=False, or all their layers), outermost first."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            frozen = layer.weights and not layer.trainable_weights
            found += [layer.name] if frozen else _frozen_models(layer)
    return found


def frozen_message(criterion, teacher, frozen, dkdp):
    """Why a gradient criterion cannot score the masked layers `frozen`
    (trainable=False) of `teacher`, and the three ways that work."""
    many = len(frozen) > 1
    it = "them" if many else "it"
    models = _frozen_models(teacher)
    where = (f", in frozen model{'s' if len(models) > 1 else ''} {_names(models)}"
             if models else "")
    remake = ("dkdp_keras.DKDPModel(dkdp_keras.prunable(teacher, layers=lambda "
              "layer: layer.trainable, track_statistics=True), ...)" if dkdp else
              "dkdp_keras.prunable(model, layers=lambda layer: layer.trainable, "
              "track_statistics=True)")
    return (
        f"{criterion} scores layers from their gradients, and "
        f"layer{'s' if many else ''} {_names([l.name for l in frozen])} of model "
        f"'{teacher.name}' {'are' if many else 'is'} frozen (trainable=False)"
        f"{where}: a frozen layer gets no gradients, so {criterion} cannot score "
        f"{it}. Unfreeze {it} (layer.trainable = True, or on the model "
        f"containing {it}) to fine-tune and prune {it}; or leave {it} unpruned "
        f"by making only the trainable layers prunable, {remake} built from the "
        "original model; or use a criterion that needs no gradients, such as "
        "importance='magnitude'."
    )


def untracked_message(criterion, needs, teacher, untracked, dkdp):
    """Why a statistics criterion cannot score masked layers made without
    track_statistics (a model made prunable by hand, then given to a
    DKDPModel, which keeps a teacher's masked layers as they are)."""
    many = len(untracked) > 1
    how = ("DKDPModel keeps a teacher's masked layers as they are: pass it the "
           "original (unmasked) model, which it makes prunable with statistics, "
           "or one made with dkdp_keras.prunable(model, track_statistics=True)"
           if dkdp else "make it with dkdp_keras.prunable(model, "
           "track_statistics=True)")
    return (
        f"{criterion} reads {' and '.join(sorted(needs))} statistics, and "
        f"layer{'s' if many else ''} {_names(untracked)} of model '{teacher.name}' "
        f"{'were' if many else 'was'} made prunable without track_statistics=True, "
        f"so {'they keep' if many else 'it keeps'} none: {how}. Or use a criterion "
        "that needs none, such as importance='magnitude'."
    )


def log_dir(value):
    """A directory for TensorBoard summaries, with tensorboard installed."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"log_dir must be a directory path, got {value!r}.")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ImportError(
            "DKDPCallback(log_dir=...) writes TensorBoard summaries and needs "
            "the tensorboard package: pip install tensorboard."
        ) from None
    return value


def resource_aware(value, granularity, threshold):
    """`resource_aware` checked: units to rank, and a budget to price them by."""
    value = _validation.boolean("resource_aware", value)
    if value and (granularity != "unit" or not isinstance(threshold, Adaptive)):
        raise ValueError(
            "resource_aware=True ranks units by what they take of a budget: it needs "
            "granularity='unit' and threshold=dkdp_keras.thresholds.Adaptive(budget), "
            f"got granularity={granularity!r} and threshold="
            f"{type(threshold).__name__ if threshold is not None else None}."
        )
    return value
