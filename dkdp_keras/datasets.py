"""Datasets for examples, tests and the benchmark, with an offline path.

`load("fashion_mnist", as_numpy=True)` returns
``((x_train, y_train), (x_test, y_test))`` like `keras.datasets`, with
images as float32 in [0, 1] of shape (N, 28, 28, 1) and integer labels.

Where the data comes from, first found first served:

1. a `.npz` file given as the name (keys x_train, y_train, x_test, y_test);
2. the original IDX files (``train-images-idx3-ubyte.gz`` ...) in
   `data_dir`, in ``$DKDP_DATA_DIR/<name>/`` or ``$DKDP_DATA_DIR``, or in
   ``/usr/share/datasets/<name-with-dashes>/`` (Debian's
   ``dataset-fashion-mnist`` package installs Fashion-MNIST there);
3. tensorflow-datasets, when it has the dataset prepared already or may
   download it (``download=True``).

``"digits"`` is scikit-learn's bundled 8×8 handwritten digits (1,797
images, no download): a tiny offline set for quick runs and tests, shape
(8, 8, 1), with the last 20% of the images as the test split.
"""

import gzip
import os
import pathlib

import numpy as np

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_DATASETS = ("fashion_mnist", "mnist")
DIGITS_TEST_FRACTION = 0.2
SYSTEM_DIR = pathlib.Path("/usr/share/datasets")


def _read_idx(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes.")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    array = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if array.size != int(np.prod(dims)):
        raise ValueError(
            f"{path} is truncated: expected {int(np.prod(dims))} values, "
            f"found {array.size}."
        )
    return array.reshape(dims)


def _find_idx_dir(name, data_dir):
    candidates = []
    if data_dir is not None:
        candidates += [pathlib.Path(data_dir) / name, pathlib.Path(data_dir)]
    env = os.environ.get("DKDP_DATA_DIR")
    if env:
        candidates += [pathlib.Path(env) / name, pathlib.Path(env)]
    candidates.append(SYSTEM_DIR / name.replace("_", "-"))
    for directory in candidates:
        if all(_idx_path(directory, f) is not None for f in IDX_FILES.values()):
            return directory
    return None


def _idx_path(directory, stem):
    for suffix in (".gz", ""):
        path = directory / (stem + suffix)
        if path.is_file():
            return path
    return None


def _prepare(images, labels):
    x = images.astype("float32") / 255.0
    if x.ndim == 3:
        x = x[..., None]
    return x, labels.astype("int64")


def _from_idx(directory):
    read = {k: _read_idx(_idx_path(directory, v)) for k, v in IDX_FILES.items()}
    return (
        _prepare(read["train_images"], read["train_labels"]),
        _prepare(read["test_images"], read["test_labels"]),
    )


def _from_npz(path):
    with np.load(path) as data:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(data.files)
        if missing:
            raise ValueError(
                f"{path} lacks the arrays {sorted(missing)}; a dataset .npz "
                "holds x_train, y_train, x_test and y_test."
            )
        x_train, x_test = data["x_train"], data["x_test"]
        if x_train.dtype == np.uint8:
            x_train, x_test = x_train / 255.0, x_test / 255.0
        if x_train.ndim == 3:
            x_train, x_test = x_train[..., None], x_test[..., None]
        return (
            (x_train.astype("float32"), data["y_train"].astype("int64")),
            (x_test.astype("float32"), data["y_test"].astype("int64")),
        )


def _from_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "The 'digits' dataset comes from scikit-learn: pip install scikit-learn."
        ) from None
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]  # pixel values are 0..16
    y = digits.target.astype("int64")
    cut = len(x) - int(round(DIGITS_TEST_FRACTION * len(x)))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def _tfds_numpy(dataset):
    """(images, labels) of a supervised split, gathered batch by batch (a
    batch of -1 asks tfds for a size it may not know)."""
    import tensorflow_datasets as tfds

    images, labels = [], []
    for x, y in tfds.as_numpy(dataset.batch(4096)):
        images.append(x)
        labels.append(y)
    return _prepare(np.concatenate(images), np.concatenate(labels))


def _from_tfds(name, data_dir, download):
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if not download:
            return None
        builder.download_and_prepare()
    return tuple(
        _tfds_numpy(builder.as_dataset(split=split, as_supervised=True))
        for split in ("train", "test")
    )


def load(name="fashion_mnist", as_numpy=False, data_dir=None, download=False):
    """Load a dataset as ``((x_train, y_train), (x_test, y_test))``.

    Args:
        name: "fashion_mnist", "mnist", "digits" (scikit-learn's 8×8
            digits), another tensorflow-datasets image dataset name, or the
            path of a `.npz` file.
        as_numpy: True for numpy arrays; False for a pair of unbatched
            `tf.data.Dataset` of `(image, label)`.
        data_dir: a directory with the IDX files (or a tensorflow-datasets
            data directory).
        download: allow tensorflow-datasets to download (needs a network).

    Returns:
        ``((x_train, y_train), (x_test, y_test))`` or ``(train_ds, test_ds)``.
    """
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a dataset name or a path, got {name!r}.")
    name = str(name)
    result = None
    if name.endswith(".npz"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"No dataset file at {name}.")
        result = _from_npz(name)
    elif name == "digits":
        result = _from_digits()
    else:
        directory = _find_idx_dir(name, data_dir) if name in IDX_DATASETS else None
        if directory is not None:
            result = _from_idx(directory)
        else:
            try:
                result = _from_tfds(name, data_dir, download)
            except Exception as error:  # tfds raises many kinds
                if "not found" in str(error).lower() and "dataset" in str(error).lower():
                    raise ValueError(
                        f"Unknown dataset {name!r}: use 'fashion_mnist', "
                        "'mnist', 'digits', a tensorflow-datasets name or a "
                        ".npz path."
                    ) from None
                raise
    if result is None:
        raise FileNotFoundError(
            f"Dataset {name!r} is not on this machine: install the Debian "
            "package dataset-fashion-mnist, put the IDX files in "
            "$DKDP_DATA_DIR, pass a .npz, use 'digits', or allow "
            "download=True."
        )
    if as_numpy:
        return result
    import tensorflow as tf

    return tuple(tf.data.Dataset.from_tensor_slices(split) for split in result)


def validation_split(x, y, size=5000):
    """The protocol's split: the last `size` training examples validate."""
    return (x[:-size], y[:-size]), (x[-size:], y[-size:])
