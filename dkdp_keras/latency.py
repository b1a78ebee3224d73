"""Batch-1 latency against MACs, fitted on the runtime a model will run on.

A pruned model's time is not its dense time × its share of the MACs: every
inference also pays for the runtime's work per operator, whatever the
widths. On this project's CPU in LiteRT, reference_cnn at ten sets of widths
ran at 0.084× dense's time + 0.68× its MACs share, so at 7% of the MACs at
0.13× dense, not 0.07× (benchmarks/RESULTS.md, 2026-12-07, sixth).

`LatencyFit` is that line, ``ms ≈ fixed_ms + ms_per_mac × MACs``. There are
two ways to get one:
- `fit_latency(model)` builds copies of the model narrowed to a few widths
  (`narrowing.width_copy`, every channel group alike), times each, and
  fits the line;
- `LatencyFit.from_timings(macs, ms)` fits timings taken elsewhere, on the
  phone or board the model will run on.

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


class LatencyFit:
    """Batch-1 latency as ``fixed_ms + ms_per_mac × MACs``.

    Args:
        fixed_ms: the time an inference takes whatever its MACs (ms, ≥ 0).
        ms_per_mac: the time each multiply-accumulate adds (ms, ≥ 0).
        points: the `(macs, ms)` timings it was fitted from, if any.
        runtime: where they were timed ("litert", "keras", or your name
            for a device).
    """

    def __init__(self, fixed_ms, ms_per_mac, points=(), runtime="given"):
        for name, value in (("fixed_ms", fixed_ms), ("ms_per_mac", ms_per_mac)):
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"LatencyFit: {name} must be a finite number ≥ 0, got "
                                 f"{value!r}.")
        self.fixed_ms = float(fixed_ms)
        self.ms_per_mac = float(ms_per_mac)
        self.points = [(int(m), float(t)) for m, t in points]
        self.runtime = runtime

    @classmethod
    def from_timings(cls, macs, ms, runtime="given"):
        """Least-squares line through timings (MACs per example, ms) of
        models of one architecture at several widths, both terms held at
        zero or above. Two timings at different MACs at least."""
        macs = np.asarray(macs, dtype="float64")
        ms = np.asarray(ms, dtype="float64")
        if macs.shape != ms.shape or macs.ndim != 1:
            raise ValueError("LatencyFit.from_timings needs one time per MACs figure, two "
                             f"lists of equal length; got {macs.shape} and {ms.shape}.")
        if len(np.unique(macs)) < 2 or not np.all(np.isfinite(ms)) or np.any(ms <= 0):
            raise ValueError(
                "LatencyFit.from_timings needs positive times of at least two models of "
                "different MACs (e.g. the model at widths 1, 0.5 and 0.25); got MACs "
                f"{macs.tolist()} and ms {ms.tolist()}.")
        slope, fixed = np.polyfit(macs, ms, 1)
        if slope < 0:  # noise on a model whose time does not follow its MACs
            slope, fixed = 0.0, float(np.mean(ms))
        elif fixed < 0:  # through the origin instead
            slope, fixed = float(macs @ ms / (macs @ macs)), 0.0
        return cls(fixed, slope, zip(macs, ms), runtime)

    def predict(self, macs):
        """Estimated batch-1 latency in ms of a model with `macs` MACs."""
        return self.fixed_ms + self.ms_per_mac * float(macs)

    def get_config(self):
        return {"fixed_ms": self.fixed_ms, "ms_per_mac": self.ms_per_mac,
                "points": [list(p) for p in self.points], "runtime": self.runtime}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return (f"LatencyFit(fixed_ms={self.fixed_ms:.4g}, ms_per_mac={self.ms_per_mac:.4g}, "
                f"runtime={self.runtime!r}, {len(self.points)} timings)")


def fit_latency(model, runtime="litert", widths=WIDTHS, runs=100, verbose=True):
    """Time `model` narrowed to each of `widths` on `runtime` and fit a
    `LatencyFit` to the times.

    Args:
        model: a built Sequential or Functional model (masked or not) with
            a fixed input shape; its weights do not matter (a copy at each
            width is built fresh: time does not depend on the weights).
        runtime: "litert" (each copy exported as float32 `.tflite` and
            timed in the LiteRT interpreter, one thread, files interleaved)
            or "keras" (the Keras model called eagerly).
        widths: channel-width factors of the copies (at least two).
        runs: timed invocations per copy (LiteRT; the median is kept).
        verbose: print a line per copy as it is timed.
    """
    from dkdp_keras.counting import count_macs
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
        copies = [width_copy(model, w, name=f"{model.name}_latency_w{w:g}") for w in widths]
    except ValueError as err:
        raise ValueError(
            f"fit_latency times narrower copies of model '{model.name}' and cannot build "
            f"them: {err} Time the model at a few widths yourself and pass "
            "LatencyFit.from_timings(macs, ms).") from err
    macs = [count_macs(c, nonzero=False) for c in copies]
    say = print if verbose else (lambda *_: None)
    if runtime == "keras":
        ms = []
        for w, copy, m in zip(widths, copies, macs):
            ms.append(measure_latency_ms(copy))
            say(f"fit_latency: width {w:g}, {m:,} MACs: {ms[-1]:.4g} ms (Keras)")
    else:
        from dkdp_keras.export import _convert, measure_tflite_latencies_ms

        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for i, (w, copy) in enumerate(zip(widths, copies)):
                say(f"fit_latency: exporting width {w:g} ({i + 1} of {len(widths)})")
                paths.append(f"{tmp}/w{i}.tflite")
                with open(paths[-1], "wb") as f:
                    f.write(_convert(copy, None, None, False, False, None))
            ms = measure_tflite_latencies_ms(paths, runs=runs)
        for w, m, t in zip(widths, macs, ms):
            say(f"fit_latency: width {w:g}, {m:,} MACs: {t:.4g} ms (LiteRT)")
    fit = LatencyFit.from_timings(macs, ms, runtime)
    say(f"fit_latency: {fit}")
    return fit
