import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def small_cnn(name="small_cnn"):
    """Conv -> BN -> ReLU -> Depthwise -> Flatten -> Dense -> Dense."""
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, activation="relu")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(6, activation="relu")(x)
    outputs = keras.layers.Dense(3)(x)
    return keras.Model(inputs, outputs, name=name)


@pytest.fixture
def cnn():
    return small_cnn()


def two_hidden_mlp(name="mlp"):
    """8 -> Dense 24 ReLU -> Dense 16 ReLU -> Dense 3 logits."""
    return keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(24, activation="relu"),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(3),
    ], name=name)


def sign_data(n=128, seed=0):
    """x ~ N(0, 1) in 8 dimensions; class = how many of x0, x1 are > 0."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = ((x[:, 0] > 0).astype("int64") + (x[:, 1] > 0)).astype("int64")
    return x, y

