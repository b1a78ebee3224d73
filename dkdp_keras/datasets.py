"""Datasets for examples, tests and the benchmark, with an offline path.

`load("fashion_mnist", as_numpy=True)` returns
``((x_train, y_train), (x_test, y_test))`` like `keras.datasets`, with
images as float32 in [0, 1] of shape (N, 28, 28, 1) and integer labels.

Where the data comes from, first found first served:

1. a `.npz` file given as the name (keys x_train, y_train, x_test, y_test;
   refused with a ValueError unless the images are finite numbers of one
   shape in both splits, with one label, a class index >= 0, per image);
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
import importlib.util
import os
import pathlib
import zipfile

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
    try:
        data = np.load(path)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"{path} is not a readable .npz file ({_reason(error)}): save the "
            "dataset with numpy.savez(path, x_train=..., y_train=..., "
            "x_test=..., y_test=...)."
        ) from None
    if not hasattr(data, "files"):  # a plain .npy array under a .npz name
        raise ValueError(
            f"{path} holds one array, not the arrays x_train, y_train, x_test "
            "and y_test: save it with numpy.savez(path, x_train=..., ...)."
        )
    with data:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(data.files)
        if missing:
            raise ValueError(
                f"{path} lacks the arrays {sorted(missing)}; a dataset .npz "
                "holds x_train, y_train, x_test and y_test."
            )
        try:
            arrays = {k: data[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
            raise ValueError(
                f"{path} is not a readable .npz file ({_reason(error)})."
            ) from None
    x_train, x_test = (_images(path, k, arrays[k]) for k in ("x_train", "x_test"))
    y_train, y_test = (_labels(path, k, arrays[k]) for k in ("y_train", "y_test"))
    for x_name, x, y_name, y in (("x_train", x_train, "y_train", y_train),
                                 ("x_test", x_test, "y_test", y_test)):
        if len(x) != len(y):
            raise ValueError(
                f"{path}: {x_name} has {len(x)} examples but {y_name} has "
                f"{len(y)} labels; each example needs one label."
            )
    if x_test.shape[1:] != x_train.shape[1:]:
        raise ValueError(
            f"{path}: x_test's examples have shape {x_test.shape[1:]} but "
            f"x_train's have {x_train.shape[1:]}; both splits need images of one shape."
        )
    return (x_train, y_train), (x_test, y_test)


def _reason(error):
    return str(error).splitlines()[0] if str(error).strip() else type(error).__name__


def _images(path, name, x):
    """One split's images as float32: uint8 scaled to [0, 1], a channel
    axis added to (N, H, W); refused when empty, not numbers, or not finite."""
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(
            f"{path}: {name} has shape {x.shape}; it must hold at least one "
            "example, as (N, height, width) or (N, height, width, channels)."
        )
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) \
            or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{path}: {name} has dtype {x.dtype}; images must be real numbers.")
    if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x)
        if bad.any():
            first = int(np.argmax(bad.reshape(len(x), -1).any(axis=1)))
            raise ValueError(
                f"{path}: {name} holds {int(bad.sum())} NaN or infinite values "
                f"(the first in example {first}); fix or drop those examples."
            )
    x = x / 255.0 if x.dtype == np.uint8 else x
    if x.ndim == 3:
        x = x[..., None]
    return x.astype("float32")


def _labels(path, name, y):
    """One split's labels as int64 class indices, shape (N,); (N, 1) is
    flattened; refused when not whole numbers >= 0."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(
            f"{path}: {name} has shape {y.shape}; labels are one class index per "
            "example, shape (N,) (for one-hot labels, save y.argmax(axis=1))."
        )
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)
            or y.dtype == np.bool_):
        raise ValueError(f"{path}: {name} has dtype {y.dtype}; labels must be integers.")
    if np.issubdtype(y.dtype, np.floating):
        whole = np.isfinite(y) & (y == np.round(y))
        if not whole.all():
            first = int(np.argmin(whole))
            raise ValueError(
                f"{path}: {name} holds labels that are not whole numbers "
                f"({y[first].item()} at example {first}); labels are class indices 0, 1, 2, ..."
            )
    if len(y) and y.min() < 0:
        first = int(np.argmax(y < 0))
        raise ValueError(
            f"{path}: {name} holds negative labels ({y[first].item()} at example "
            f"{first}); labels are class indices 0, 1, 2, ..."
        )
    return y.astype("int64")


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


def _not_here(name, data_dir, tfds_installed=True):
    """What is missing for dataset `name` and what brings it, in one line."""
    where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    offline = ""
    if name == "fashion_mnist":
        offline = ("install the Debian package dataset-fashion-mnist (its IDX files go "
                   f"to {SYSTEM_DIR / 'fashion-mnist'}), put the four IDX files in "
                   "$DKDP_DATA_DIR, or ")
    elif name in IDX_DATASETS:
        offline = "put the four IDX files (train-images-idx3-ubyte.gz, ...) in $DKDP_DATA_DIR, or "
    build = (f"prepare it once with a network: tfds build {name} (in Python: "
             f"load({name!r}, download=True)); or pass a .npz with x_train, y_train, "
             "x_test and y_test.")
    if not tfds_installed:
        return (f"Dataset {name!r} is not on this machine, and tensorflow-datasets, "
                f"which provides it, is not installed: {offline}pip install "
                f"tensorflow-datasets and {build}")
    return (f"Dataset {name!r} is not on this machine (tensorflow-datasets has not "
            f"prepared it in {where}): {offline}{build}")


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
            except ImportError:
                if importlib.util.find_spec("tensorflow_datasets") is not None:
                    raise  # installed, but broken: its own error says why
                raise FileNotFoundError(_not_here(name, data_dir, tfds_installed=False)) from None
            except Exception as error:  # tfds raises many kinds
                if "not found" in str(error).lower() and "dataset" in str(error).lower():
                    raise ValueError(
                        f"Unknown dataset {name!r}: use 'fashion_mnist', "
                        "'mnist', 'digits', a tensorflow-datasets name or a "
                        ".npz path."
                    ) from None
                raise
    if result is None:
        raise FileNotFoundError(_not_here(name, data_dir))
    if as_numpy:
        return result
    import tensorflow as tf

    return tuple(tf.data.Dataset.from_tensor_slices(split) for split in result)


def validation_split(x, y, size=5000):
    """The protocol's split: the last `size` training examples validate."""
    return (x[:-size], y[:-size]), (x[-size:], y[-size:])
