"""Batch-1 latency against MACs and parameters, fitted on the runtime a
model will run on.

A pruned model's time is not its dense time × its share of the MACs. Every
inference also pays the runtime's work per operator, whatever the widths:
on this project's CPU in LiteRT, reference_cnn at ten sets of widths ran at
0.084× dense's time + 0.68× its MACs share, so at 7% of the MACs at 0.13×
dense, not 0.07× (benchmarks/RESULTS.md, 2026-12-07, sixth). And a weight
costs time as a MAC does where each is read once an inference: MobileNetV2's
pruned files ran at 0.055 + 0.725 × MACs share + 0.217 × parameter share.

`LatencyFit` is that plane, ``ms ≈ fixed_ms + ms_per_mac × MACs +
ms_per_param × parameters``, each term zero or above. Two ways to get one:
- `fit_latency(model)` builds narrower copies of the model, times each and
  fits the plane. Four copies have every channel group narrowed alike (widths
  1, 0.5, 0.25, 0.125). A few more draw each group's width at random, since
  pruning does not narrow every layer alike; without them MACs and
  parameters shrink together and cannot be told apart.
- `LatencyFit.from_timings(macs, ms, params=...)` fits timings taken
  elsewhere, on the phone or board the model will run on.

Pass the result, or the name of the runtime to time, to
`Budget(max_latency_ms=..., latency_fit=...)`.
"""

import tempfile
import time

import numpy as np

RUNTIMES = ("litert", "keras")
WIDTHS = (1.0, 0.5, 0.25, 0.125)


def measure_latency_ms(model, runs=50, warmup=5):
    """Median wall time of one batch-1 inference of `model`, in ms (Keras)."""
    shape = tuple(model.inputs[0].shape)[1:]
    x = np.zeros((1,) + shape, dtype="float32")
    for _ in range(warmup):
        model(x, training=False)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(x, training=False)
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def _nonnegative_lstsq(columns, y):
    """Least squares of `y` on `columns` with every coefficient ≥ 0: the best
    fit over each subset of the columns whose own fit is non-negative."""
    columns = np.asarray(columns, dtype="float64")
    best, coef = np.inf, np.zeros(columns.shape[1])
    for subset in range(1, 2 ** columns.shape[1]):
        cols = [j for j in range(columns.shape[1]) if subset >> j & 1]
        c, *_ = np.linalg.lstsq(columns[:, cols], y, rcond=None)
        if np.any(c < 0):
            continue
        full = np.zeros(columns.shape[1])
        full[cols] = c
        residual = float(np.sum((columns @ full - y) ** 2))
        if residual < best * (1 - 1e-9):
            best, coef = residual, full
    return coef


class LatencyFit:
    """Batch-1 latency as ``fixed_ms + ms_per_mac × MACs + ms_per_param ×
    parameters``.

    Args:
        fixed_ms: the time an inference takes whatever its size (ms, ≥ 0).
        ms_per_mac: the time each multiply-accumulate adds (ms, ≥ 0).
        ms_per_param: the time each parameter adds (ms, ≥ 0).
        points: the `(macs, params, ms)` timings it was fitted from, if any.
        runtime: where they were timed ("litert", "keras", or your name
            for a device).
    """

    def __init__(self, fixed_ms, ms_per_mac, ms_per_param=0.0, points=(), runtime="given"):
        for name, value in (("fixed_ms", fixed_ms), ("ms_per_mac", ms_per_mac),
                            ("ms_per_param", ms_per_param)):
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"LatencyFit: {name} must be a finite number ≥ 0, got "
                                 f"{value!r}.")
        self.fixed_ms = float(fixed_ms)
        self.ms_per_mac = float(ms_per_mac)
        self.ms_per_param = float(ms_per_param)
        self.points = [(int(m), None if p is None else int(p), float(t)) for m, p, t in points]
        self.runtime = runtime

    @classmethod
    def from_timings(cls, macs, ms, params=None, runtime="given"):
        """Least-squares plane through timings of models of one architecture
        at several widths (MACs per example, ms, and the parameters of each
        where given; without them the fit is of MACs alone), every term held
        at zero or above. Two timings at different MACs at least."""
        macs = np.asarray(macs, dtype="float64")
        ms = np.asarray(ms, dtype="float64")
        given = None if params is None else np.asarray(params, dtype="float64")
        if macs.shape != ms.shape or macs.ndim != 1 or (
                given is not None and given.shape != macs.shape):
            raise ValueError("LatencyFit.from_timings needs one time (and one parameter "
                             "count, if any) per MACs figure, lists of equal length; got "
                             f"{macs.shape}, {ms.shape}"
                             + ("" if given is None else f" and {given.shape}") + ".")
        if len(np.unique(macs)) < 2 or not np.all(np.isfinite(ms)) or np.any(ms <= 0):
            raise ValueError(
                "LatencyFit.from_timings needs positive times of at least two models of "
                "different MACs (e.g. the model at widths 1, 0.5 and 0.25); got MACs "
                f"{macs.tolist()} and ms {ms.tolist()}.")
        # Columns scaled to at most 1, for a well-conditioned fit.
        scale = [1.0, macs.max()] + ([] if given is None else [max(given.max(), 1.0)])
        columns = np.stack([np.ones_like(macs), macs] + ([] if given is None else [given]), 1)
        coef = _nonnegative_lstsq(columns / scale, ms) / scale
        per_param = 0.0 if given is None else coef[2]
        points = zip(macs, [None] * len(macs) if given is None else given, ms)
        return cls(coef[0], coef[1], per_param, points, runtime)

    def predict(self, macs, params=None):
        """Estimated batch-1 latency in ms of a model with `macs` MACs per
        example and `params` parameters (needed when the fit has a
        parameter term)."""
        if params is None and self.ms_per_param > 0:
            raise ValueError(f"{self!r} has a time per parameter: give params too.")
        return (self.fixed_ms + self.ms_per_mac * float(macs)
                + self.ms_per_param * float(params or 0))

    def get_config(self):
        return {"fixed_ms": self.fixed_ms, "ms_per_mac": self.ms_per_mac,
                "ms_per_param": self.ms_per_param,
                "points": [list(p) for p in self.points], "runtime": self.runtime}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return (f"LatencyFit(fixed_ms={self.fixed_ms:.4g}, ms_per_mac={self.ms_per_mac:.4g}, "
                f"ms_per_param={self.ms_per_param:.4g}, runtime={self.runtime!r}, "
                f"{len(self.points)} timings)")


def _mixed_widths(model, widths, count, seed):
    """`count` callables group -> factor, each group's factor drawn from
    `widths`, and in each copy at least two groups at different widths (a
    copy of one width throughout is one of the uniform ones); none for a
    model with a single group to narrow."""
    from dkdp_keras import depgraph

    graph = depgraph.of(model)
    groups = [g for g in graph.roots() if not graph.pinned[g]]
    if len(groups) < 2:
        return []
    rng = np.random.default_rng(seed)
    drawn = []
    while len(drawn) < count:
        factor = dict(zip(groups, rng.choice(widths, size=len(groups)).tolist()))
        if len(set(factor.values())) > 1:
            drawn.append(factor.get)
    return drawn


def fit_latency(model, runtime="litert", widths=WIDTHS, mixed=4, seed=0, runs=100,
                verbose=True):
    """Time copies of `model` at several widths on `runtime` and fit a
    `LatencyFit` to the times.

    Args:
        model: a built Sequential or Functional model (masked or not) with
            a fixed input shape; its weights do not matter (each copy is
            built fresh: time does not depend on the weights).
        runtime: "litert" (each copy exported as float32 `.tflite` and
            timed in the LiteRT interpreter, one thread, files interleaved)
            or "keras" (the Keras model called eagerly).
        widths: factors in (0, 1] of the copies whose channel groups are
            all narrowed alike (at least two).
        mixed: how many copies more have each group narrowed by a factor
            drawn from `widths` (`seed` draws them).
        runs: timed invocations per copy (LiteRT; the median is kept).
        verbose: print a line per copy as it is timed.
    """
    from dkdp_keras.counting import count_macs, count_params
    from dkdp_keras.narrowing import width_copy

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}; for another "
                         "device, time the model there and pass LatencyFit.from_timings(...).")
    if len(set(widths)) < 2 or any(not 0 < w <= 1 for w in widths):
        raise ValueError(f"widths must be at least two factors in (0, 1], got {widths!r}.")
    shape = tuple(model.inputs[0].shape)[1:]
    if any(d is None for d in shape):
        raise ValueError(
            f"fit_latency times model '{model.name}' at batch 1, and its input shape "
            f"{shape} has unknown dimensions. Build the model at the input size it will "
            "run at, or time it there yourself and pass LatencyFit.from_timings(macs, ms).")
    try:
        factors = list(widths) + _mixed_widths(model, widths, mixed, seed)
        names = [f"width {w:g}" for w in widths] + [
            f"mixed widths {i + 1}" for i in range(len(factors) - len(widths))]
        copies = [width_copy(model, f, name=f"{model.name}_latency_{i}")
                  for i, f in enumerate(factors)]
    except ValueError as err:
        raise ValueError(
            f"fit_latency times narrower copies of model '{model.name}' and cannot build "
            f"them: {err} Time the model at a few widths yourself and pass "
            "LatencyFit.from_timings(macs, ms).") from err
    macs = [count_macs(c, nonzero=False) for c in copies]
    params = [count_params(c, nonzero=False) for c in copies]
    say = print if verbose else (lambda *_: None)
    if runtime == "keras":
        ms = [measure_latency_ms(copy) for copy in copies]
    else:
        from dkdp_keras import litert

        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for i, (name, copy) in enumerate(zip(names, copies)):
                say(f"fit_latency: exporting the copy at {name} ({i + 1} of {len(copies)})")
                paths.append(f"{tmp}/copy{i}.tflite")
                with open(paths[-1], "wb") as f:
                    f.write(litert.convert(copy))
            ms = litert.measure_latencies_ms(paths, runs=runs)
    for name, m, p, t in zip(names, macs, params, ms):
        say(f"fit_latency: {name}: {m:,} MACs, {p:,} parameters, {t:.4g} ms ({runtime})")
    fit = LatencyFit.from_timings(macs, ms, params=params, runtime=runtime)
    say(f"fit_latency: {fit}")
    return fit
