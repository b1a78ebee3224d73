"""Resource measures and the Budget constraint."""

import numpy as np
import pytest

import dkdp_keras as dkdp


def test_reference_models_match_the_protocol():
    cnn = dkdp.zoo.reference_cnn()
    assert cnn.count_params() == dkdp.count_params(cnn, nonzero=False) == 824_746
    macs = 28 * 28 * 9 * 32 + 14 * 14 * 9 * 32 * 64 + 3136 * 256 + 256 * 10
    assert dkdp.count_macs(cnn, nonzero=False) == macs
    assert 4.5e6 < macs < 4.7e6
    assert dkdp.zoo.lenet_300_100().count_params() == 266_610
    assert dkdp.zoo.reference_cnn(width=0.5).count_params() < 824_746 / 3


def test_counts_follow_masks():
    model = dkdp.prunable(dkdp.zoo.lenet_300_100())
    total = dkdp.count_params(model, nonzero=False)
    assert total == 266_610
    first = dkdp.masked_layers(model)[0]
    first.bias.assign(np.arange(1, 301, dtype="float32"))  # no zero bias
    before = dkdp.count_params(model)
    zeros = sum(int(np.sum(w.numpy() == 0)) for w in model.weights if "mask" not in w.path)
    assert before == total - zeros
    mask = np.ones(first.kernel.shape, "float32")
    mask[:, :150] = 0.0  # remove 150 of 300 units: their 784 weights and bias
    first.kernel_mask.assign(mask)
    removed = int(np.count_nonzero(first.kernel.numpy()[:, :150])) + 150
    assert dkdp.count_params(model) == before - removed
    assert dkdp.count_macs(model) == dkdp.count_macs(model, nonzero=False) - 150 * 784


def test_budget_measures_and_usage():
    model = dkdp.prunable(dkdp.zoo.lenet_300_100())
    budget = dkdp.Budget(max_params=100_000, max_bytes=2_000_000, max_macs=300_000)
    measured = budget.measure(model)
    assert measured["bytes"] == 4 * measured["params"]
    assert budget.usage(model)["params"] == pytest.approx(measured["params"] / 100_000)
    assert not budget.is_met(model)
    assert dkdp.Budget(max_params=300_000).is_met(model)
    latency = dkdp.Budget(max_latency_ms=1e6)
    assert latency.measure(model)["latency_ms"] > 0 and latency.is_met(model)


@pytest.mark.parametrize(
    "kwargs,error,text",
    [
        ({}, ValueError, "at least one limit"),
        (dict(max_params=0), ValueError, r"max_params must be in \(0, inf\], got 0"),
        (dict(max_params=-5), ValueError, "max_params must be in"),
        (dict(max_bytes="1MB"), TypeError, "max_bytes must be a number"),
        (dict(max_macs=float("nan")), ValueError, "max_macs must be a finite number"),
        (dict(max_latency_ms=True), TypeError, "max_latency_ms must be a number"),
        (dict(max_params=10, bytes_per_param=3), ValueError, "bytes_per_param must be 1"),
    ],
)
def test_budget_bad_input(kwargs, error, text):
    with pytest.raises(error, match=text):
        dkdp.Budget(**kwargs)


def test_impossible_budget_is_refused():
    model = dkdp.prunable(dkdp.zoo.reference_cnn())
    with pytest.raises(ValueError, match="max_params=100 is below the 388 parameters"):
        dkdp.Budget(max_params=100).check_feasible(model)
    dkdp.Budget(max_params=80_000).check_feasible(model)


def test_budget_measures_the_deployed_structure():
    model = dkdp.prunable(dkdp.zoo.lenet_300_100())
    first = dkdp.masked_layers(model)[0]
    mask = np.ones(first.kernel.shape, "float32")
    mask[:, :150] = 0.0  # 150 hidden units gone: their rows in the next layer too
    first.kernel_mask.assign(mask)
    measured = dkdp.Budget(max_params=1e9, max_macs=1e9).measure(model)
    small = dkdp.compact(model)
    assert measured["params"] == dkdp.count_params(small)
    assert measured["params"] <= dkdp.count_params(model) - 150 * 100
    assert measured["macs"] == dkdp.count_macs(small)
