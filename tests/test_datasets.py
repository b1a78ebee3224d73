"""Where datasets come from: Debian's IDX files, DKDP_DATA_DIR, .npz,
scikit-learn's digits, and tensorflow-datasets (mocked: no network)."""

import gzip
import pathlib

import numpy as np
import pytest

from dkdp_keras import datasets

FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist not installed (.ci/data.sh installs it)",
)


@needs_fashion
def test_fashion_mnist_from_the_debian_files():
    (x_train, y_train), (x_test, y_test) = datasets.load("fashion_mnist", as_numpy=True)
    assert x_train.shape == (60_000, 28, 28, 1) and x_test.shape == (10_000, 28, 28, 1)
    assert x_train.dtype == np.float32 and 0.0 <= x_train.min() and x_train.max() == 1.0
    assert sorted(np.unique(y_train)) == list(range(10))
    assert np.bincount(y_test).tolist() == [1000] * 10
    (tr, va) = datasets.validation_split(x_train, y_train)
    assert len(tr[0]) == 55_000 and len(va[0]) == 5_000


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_from_data_dir_env(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    root = tmp_path / "mnist"
    root.mkdir()
    images = rng.integers(0, 256, size=(6, 28, 28))
    labels = np.arange(6) % 10
    for stem, arr in [("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels),
                      ("t10k-images-idx3-ubyte", images[:2]), ("t10k-labels-idx1-ubyte", labels[:2])]:
        _write_idx(root / f"{stem}.gz", arr)
    monkeypatch.setenv("DKDP_DATA_DIR", str(tmp_path))
    (x, y), (xt, yt) = datasets.load("mnist", as_numpy=True)
    np.testing.assert_allclose(x[..., 0], images / 255.0, atol=1e-7)
    assert y.tolist() == labels.tolist() and xt.shape == (2, 28, 28, 1)
    train, test = datasets.load("mnist")
    image, label = next(iter(train))
    assert tuple(image.shape) == (28, 28, 1) and int(label) == 0


def test_npz_and_bad_input(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((3, 4, 4), np.uint8), y_train=np.arange(3),
             x_test=np.full((1, 4, 4), 255, np.uint8), y_test=np.arange(1))
    (x, y), (xt, yt) = datasets.load(str(path), as_numpy=True)
    assert x.shape == (3, 4, 4, 1) and xt.max() == 1.0
    with pytest.raises(FileNotFoundError, match="No dataset file"):
        datasets.load(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "bad.npz", x_train=np.zeros(3))
    with pytest.raises(ValueError, match=r"lacks the arrays \['x_test', 'y_test', 'y_train'\]"):
        datasets.load(str(tmp_path / "bad.npz"))
    with pytest.raises(TypeError, match="dataset name or a path"):
        datasets.load(3)
    truncated = tmp_path / "t.gz"
    with gzip.open(truncated, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="truncated"):
        datasets._read_idx(truncated)


def _npz(path, **change):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (20, 4, 4)).astype(np.uint8),
                  y_train=np.arange(20) % 3,
                  x_test=rng.integers(0, 256, (6, 4, 4)).astype(np.uint8),
                  y_test=np.arange(6) % 3)
    arrays.update(change)
    np.savez(path, **arrays)
    return str(path)


def _with(array, index, value):
    array = array.astype(np.asarray(value).dtype)
    array[index] = value
    return array


X20 = np.full((20, 4, 4), 0.5, np.float32)


@pytest.mark.parametrize("change,text", [
    (dict(x_train=_with(X20, (3, 1, 1), np.nan)),
     r"x_train holds 1 NaN or infinite values \(the first in example 3\); fix or drop"),
    (dict(x_test=_with(np.zeros((6, 4, 4), np.float32), (2, 0, 0), np.inf)),
     r"x_test holds 1 NaN or infinite values \(the first in example 2\)"),
    (dict(y_train=np.arange(15) % 3),
     r"x_train has 20 examples but y_train has 15 labels; each example needs one label"),
    (dict(y_test=np.arange(5) % 3), r"x_test has 6 examples but y_test has 5 labels"),
    (dict(y_train=_with(np.arange(20) % 3, 4, -2)),
     r"y_train holds negative labels \(-2 at example 4\); labels are class indices 0, 1, 2"),
    (dict(y_test=_with(np.arange(6) % 3, 1, 0.5)),
     r"y_test holds labels that are not whole numbers \(0.5 at example 1\)"),
    (dict(y_train=np.eye(3)[np.arange(20) % 3]),
     r"y_train has shape \(20, 3\); labels are one class index per example, shape "
     r"\(N,\) \(for one-hot labels, save y.argmax\(axis=1\)\)"),
    (dict(x_test=np.zeros((6, 5, 4), np.uint8)),
     r"x_test's examples have shape \(5, 4, 1\) but x_train's have \(4, 4, 1\); both "
     r"splits need images of one shape"),
    (dict(x_train=np.zeros((0, 4, 4), np.uint8), y_train=np.zeros(0, int)),
     r"x_train has shape \(0, 4, 4\); it must hold at least one example"),
    (dict(x_train=np.array(["a"] * 20)), r"x_train has shape \(20,\)"),
    (dict(x_train=np.full((20, 4, 4), "a")), r"x_train has dtype <U1; images must be real"),
])
def test_npz_contents_are_checked_when_loaded(tmp_path, change, text):
    path = _npz(tmp_path / "d.npz", **change)
    with pytest.raises(ValueError, match=f"^{path}: {text}"):
        datasets.load(path, as_numpy=True)


def test_npz_labels_of_shape_n_1_and_uint8_scaling_per_split(tmp_path):
    x_test = np.full((6, 4, 4), 0.25, np.float32)  # already in [0, 1]: kept as is
    path = _npz(tmp_path / "d.npz", y_train=(np.arange(20) % 3)[:, None].astype(float),
                x_test=x_test)
    (x, y), (xt, yt) = datasets.load(path, as_numpy=True)
    assert y.shape == (20,) and y.dtype == np.int64 and y.tolist()[:4] == [0, 1, 2, 0]
    assert x.max() <= 1.0 and xt.max() == 0.25 and xt.shape == (6, 4, 4, 1)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"\x93NUMPY"])
def test_unreadable_npz_is_a_value_error(tmp_path, content):
    path = tmp_path / "d.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{path} is not a readable .npz file"):
        datasets.load(str(path), as_numpy=True)
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(path)  # one array, not a dataset's four
    with pytest.raises(ValueError, match=f"^{path} holds one array, not the arrays"):
        datasets.load(str(path), as_numpy=True)


def test_missing_dataset_names_the_fix_for_that_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "SYSTEM_DIR", tmp_path / "none")
    monkeypatch.delenv("DKDP_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "_from_tfds", lambda name, data_dir, download: None)
    with pytest.raises(FileNotFoundError) as cifar:
        datasets.load("cifar10", data_dir=str(tmp_path))
    assert str(cifar.value) == (
        f"Dataset 'cifar10' is not on this machine (tensorflow-datasets has not prepared "
        f"it in {tmp_path}): prepare it once with a network: tfds build cifar10 (in "
        "Python: load('cifar10', download=True)); or pass a .npz with x_train, y_train, "
        "x_test and y_test.")
    with pytest.raises(FileNotFoundError, match=r"install the Debian package "
                       r"dataset-fashion-mnist .* or prepare it once with a network: "
                       r"tfds build fashion_mnist"):
        datasets.load("fashion_mnist")
    with pytest.raises(FileNotFoundError) as mnist:
        datasets.load("mnist")
    assert "dataset-fashion-mnist" not in str(mnist.value)
    assert "IDX files (train-images-idx3-ubyte.gz, ...) in $DKDP_DATA_DIR" in str(mnist.value)

    def no_tfds(name, data_dir, download):
        raise ModuleNotFoundError("No module named 'tensorflow_datasets'")

    monkeypatch.setattr(datasets, "_from_tfds", no_tfds)
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"^Dataset 'cifar10' is not on this "
                       r"machine, and tensorflow-datasets, which provides it, is not "
                       r"installed: pip install tensorflow-datasets and prepare it once"):
        datasets.load("cifar10")


def test_digits_from_scikit_learn():
    from sklearn.datasets import load_digits

    (x, y), (xt, yt) = datasets.load("digits", as_numpy=True)
    assert x.shape == (1438, 8, 8, 1) and xt.shape == (359, 8, 8, 1)
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0 and xt.max() == 1.0
    assert sorted(np.unique(y)) == list(range(10))
    # A fixed split: the test images are the last 359 (20%) of scikit-learn's 1,797.
    raw = load_digits()
    np.testing.assert_array_equal(xt[..., 0] * 16.0, raw.images[-359:])
    np.testing.assert_array_equal(yt, raw.target[-359:])
    (x2, _), _ = datasets.load("digits", as_numpy=True)
    np.testing.assert_array_equal(x, x2)


def test_tensorflow_datasets_path_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    # cifar10 has no offline copy here, so load() goes to tensorflow-datasets;
    # mock_data makes download_and_prepare a no-op and generates the examples.
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(FileNotFoundError, match="'cifar10' is not on this machine .*"
                           "tfds build cifar10"):
            datasets.load("cifar10", as_numpy=True)  # not prepared, no download
        (x, y), (xt, yt) = datasets.load("cifar10", as_numpy=True, download=True)
        assert x.shape == (12, 32, 32, 3) and xt.shape == (12, 32, 32, 3)
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5  # uint8 / 255
        assert set(y.tolist()) <= set(range(10))
        train, _ = datasets.load("cifar10", download=True)
        image, label = next(iter(train))
        assert tuple(image.shape) == (32, 32, 3) and 0 <= int(label) < 10
        with pytest.raises(ValueError, match="Unknown dataset 'no_such_set'"):
            datasets.load("no_such_set", download=True)
