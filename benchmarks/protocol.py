"""The protocol's models and their inputs, in one place for the Keras 3
systems (`train_keras3.py`, `run.py`, `paired_times.py`).

Model 3 (`mobilenet_v2`, PROTOCOL.md version 2) is the MobileNetV2 a user
starts from, on Fashion-MNIST zero-padded by 2 pixels to 32x32 and repeated
to 3 channels. `train_tfmot.py` builds the same models with tf_keras and
takes only `images` and `pipeline` from here, which import no Keras
(TFMOT's tf_keras must not meet Keras 3).
"""

import numpy as np

MODELS = ("reference_cnn", "lenet_300_100", "mobilenet_v2")
# What a width of the kd students means per model: the zoo's width factor,
# MobileNetV2's alpha.
KD_WIDTHS = {"reference_cnn": (0.5, 0.25), "lenet_300_100": (0.5, 0.25),
             "mobilenet_v2": (0.5, 0.35)}


def build(model, width=1.0):
    """A fresh, untrained model of the protocol."""
    import keras

    import dkdp_keras as dkdp

    if model == "mobilenet_v2":
        return keras.applications.MobileNetV2(
            input_shape=(32, 32, 3), alpha=width, weights=None, classes=10,
            classifier_activation=None)
    return getattr(dkdp.zoo, model)(width=width)


def images(x, model):
    """The protocol's images as `model` reads them (float32 in [0, 1]):
    28x28x1, or 32x32x3 for mobilenet_v2."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    x = x.astype("float32") / 255.0 if x.dtype == np.uint8 else x.astype("float32")
    if model == "mobilenet_v2":
        x = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
        x = np.repeat(x, 3, axis=-1)
    return x


def pipeline(x, y, batch, seed, start=0):
    """The protocol's training batches from epoch `start` on: shuffled with
    `seed`, reshuffled each epoch, repeated. The shuffle runs on indices,
    which gives the order the same seeded shuffle of the examples gives
    (checked), so a run resumed at epoch `start` skips to that epoch's
    batches without reading the data."""
    import tensorflow as tf

    xs, ys = tf.constant(x), tf.constant(y)
    steps = int(np.ceil(len(x) / batch))
    ds = tf.data.Dataset.range(len(x))
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch).repeat().skip(start * steps)
    ds = ds.map(lambda i: (tf.gather(xs, i), tf.gather(ys, i)))
    return ds.prefetch(tf.data.AUTOTUNE)


def write_json(path, value):
    """Write `value` to `path` as JSON whole or not at all (a kill mid-write
    leaves the file before it), creating its directory."""
    import json
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)
