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
        with pytest.raises(FileNotFoundError, match="'cifar10' is not on this machine"):
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
