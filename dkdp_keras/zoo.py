"""The reference models of the benchmark protocol, defined once here and
used by every system (../shared/benchmark/PROTOCOL.md)."""

import keras

from dkdp_keras import _validation


def _width(n, width):
    return max(1, int(round(n * width)))


def _check(width, input_shape, num_classes):
    return (
        _validation.number("width", width, low=0.0, low_open=True),
        _validation.shape("input_shape", input_shape),
        _validation.number("num_classes", num_classes, low=1, integer=True),
    )


def reference_cnn(input_shape=(28, 28, 1), num_classes=10, width=1.0, name=None):
    """Conv2D(32, 3, same, no bias) BN ReLU, MaxPool(2),
    Conv2D(64, 3, same, no bias) BN ReLU, MaxPool(2),
    Flatten, Dense(256) ReLU, Dropout(0.3), Dense(num_classes) logits.

    824,746 parameters and about 4.6 M multiply-accumulates per 28×28 image
    at width 1.0. `width` scales every layer but the output.

    Example:

    >>> reference_cnn().count_params()
    824746
    """
    width, input_shape, num_classes = _check(width, input_shape, num_classes)
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Conv2D(_width(32, width), 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(_width(64, width), 3, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(_width(256, width), activation="relu")(x)
    x = keras.layers.Dropout(0.3)(x)
    outputs = keras.layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name=name or "reference_cnn")


def lenet_300_100(input_shape=(28, 28, 1), num_classes=10, width=1.0, name=None):
    """Flatten, Dense(300) ReLU, Dense(100) ReLU, Dense(num_classes) logits
    (Han et al. 2015): 266,610 parameters on 28×28 inputs at width 1.0.

    Example:

    >>> lenet_300_100().count_params()
    266610
    """
    width, input_shape, num_classes = _check(width, input_shape, num_classes)
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(_width(300, width), activation="relu")(x)
    x = keras.layers.Dense(_width(100, width), activation="relu")(x)
    outputs = keras.layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name=name or "lenet_300_100")
