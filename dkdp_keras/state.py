"""The state a pruning run keeps between steps, where checkpoints find it.

`DKDPCallback` decides from more than the weights: how many pruning events
it has made, τ, the adaptive controller's reference metric and step, the
masks of the last good event, the BatchNormalization statistics of removed
units. A `PruningState` holds these values in non-trainable Keras variables,
attached to the model being trained, so that everything that saves the
model's variables (`keras.callbacks.BackupAndRestore`,
`keras.callbacks.ModelCheckpoint`, `model.save`, `model.save_weights`)
saves them too, and a resumed run continues where it stopped.

The state is reachable from the model (Keras' saving walks the model's
attributes) but is not one of its layers: a tracked attribute would join a
Functional model's `layers`, its summary and its weights lists. A
`DKDPModel` carries one from construction, so `.keras` files restore it;
`DKDPCallback` attaches one to a plain model when it is given the model,
before any callback's `on_train_begin` restores a checkpoint.
"""

import keras
import numpy as np

from dkdp_keras.graph import iter_layers

#: Attribute of the model that holds its `PruningState`.
ATTRIBUTE = "_dkdp_state"


class PruningState(keras.layers.Layer):
    """Named arrays in non-trainable variables, saved with the model.

    Values are set by key (`state.set("tau", 0.3)`); a variable is created
    on first use and replaced when a value of another shape or dtype comes.
    Loading replaces the whole state by the saved one; a file written before
    the state existed (an empty store) leaves it empty.

    Example:

    >>> state = PruningState()
    >>> state.set("events", np.int64(3))
    >>> int(state.get("events"))
    3
    """

    def __init__(self, name="dkdp_state", **kwargs):
        super().__init__(name=name, trainable=False, **kwargs)
        # Kept outside Keras' attribute tracking: the variables are this
        # object's own, saved and loaded by the two methods below.
        object.__setattr__(self, "_slots", {})

    def __contains__(self, key):
        return key in self._slots

    def keys(self):
        return sorted(self._slots)

    def get(self, key, default=None):
        """A numpy copy of the value under `key`, or `default`."""
        var = self._slots.get(key)
        if var is None:
            return default
        return np.array(keras.ops.convert_to_numpy(var))

    def set(self, key, value):
        if not isinstance(key, str) or not key or "/" in key:
            raise ValueError(
                f"A state key must be a non-empty string without '/', got {key!r}."
            )
        value = np.asarray(value)
        var = self._slots.get(key)
        if (
            var is None
            or tuple(var.shape) != value.shape
            or np.dtype(var.dtype) != value.dtype
        ):
            self._slots[key] = keras.Variable(
                value, dtype=str(value.dtype), trainable=False,
                name=key.replace(":", "_"),
            )
        else:
            var.assign(value)

    def remove(self, key):
        self._slots.pop(key, None)

    def clear(self):
        self._slots.clear()

    @property
    def variables(self):
        return [self._slots[key] for key in self.keys()]

    def save_own_variables(self, store):
        for key in self.keys():
            store[key] = self._slots[key]

    def load_own_variables(self, store):
        self._slots.clear()
        for key in store.keys():
            self.set(key, np.asarray(store[key]))


def pruning_state(model):
    """The `PruningState` of `model`, attached to it on first use."""
    state = getattr(model, ATTRIBUTE, None)
    if not isinstance(state, PruningState):
        state = PruningState()
        object.__setattr__(model, ATTRIBUTE, state)
    return state


def _seed_generators(model):
    """The `keras.random.SeedGenerator`s of `model`'s layers (Dropout, noise
    layers), in a fixed order."""
    return [value for layer in iter_layers(model)
            for _, value in sorted(vars(layer).items())
            if isinstance(value, keras.random.SeedGenerator)]


def save_random_state(state, model):
    """Keep the states of `model`'s random streams in `state`: Keras saves
    no seed generator, and a resumed run must draw the dropout masks the
    uninterrupted one would."""
    for i, generator in enumerate(_seed_generators(model)):
        state.set(f"seed:{i}", keras.ops.convert_to_numpy(generator.state))


def load_random_state(state, model):
    for i, generator in enumerate(_seed_generators(model)):
        value = state.get(f"seed:{i}")
        if value is not None and value.shape == tuple(generator.state.shape):
            generator.state.assign(value)
