"""The fast stable sorts give exactly numpy's stable order."""
import numpy as np
import pytest

from dkdp_keras.thresholds.ordering import merged_order, stable_argsort


def scores_with_ties(rng, n):
    values = rng.standard_normal(n).astype("float32")
    values[rng.random(n) < 0.3] = 0.0  # pruned entries: many exact zeros
    values[rng.random(n) < 0.05] = -0.0  # equal to 0.0 for a sort
    values[: n // 10] = values[n // 10 : 2 * (n // 10)]  # repeated values
    return values.astype("float64")


@pytest.mark.parametrize("seed", range(5))
def test_stable_argsort_is_numpys_stable_order(seed):
    rng = np.random.default_rng(seed)
    values = scores_with_ties(rng, 5000)
    np.testing.assert_array_equal(
        stable_argsort(values), np.argsort(values, kind="stable"))
    # not float32 values: the plain sort, same order
    wide = values + 1e-12 * rng.random(values.size)
    np.testing.assert_array_equal(
        stable_argsort(wide), np.argsort(wide, kind="stable"))


@pytest.mark.parametrize("seed", range(5))
def test_merged_order_is_the_order_of_the_concatenation(seed):
    rng = np.random.default_rng(seed)
    arrays = [np.abs(scores_with_ties(rng, n)) / 3.0 for n in (700, 3000, 10)]
    arrays[2][:] = arrays[0][:10]  # equal values across layers: layer order
    expected = np.argsort(np.concatenate(arrays), kind="stable")
    good = [np.argsort(a, kind="stable") for a in arrays]
    np.testing.assert_array_equal(merged_order(arrays, good), expected)
    # a wrong hint (reversed ties, or none at all) is caught and redone
    bad = [good[0][::-1], None, np.arange(10)]
    np.testing.assert_array_equal(merged_order(arrays, bad), expected)
