"""Resource constraints C and the measures a model is held against.

Counting rules (masked or plain Sequential/Functional models; a `Budget`
measures a masked model after compacting it, as it will be deployed):

- parameters: every weight of the model as Keras counts it (BatchNorm moving
  statistics included), except masks, gates and statistics; with
  `nonzero=True` only entries that are non-zero in the computation
  (``kernel * mask``; the bias of a removed unit counts as removed).
- bytes: ``parameters * bytes_per_param`` (4 for float32, 1 for int8), the
  weight storage of a compacted model, before file overhead.
- multiply-accumulates per example: Dense ``nonzero(kernel) * positions``,
  convolutions ``nonzero(kernel) * output positions`` (depthwise likewise);
  other layers count 0.
- latency: with `latency_fit`, ``fixed_ms + ms_per_mac * macs + ms_per_param
  * params`` of the compacted model's shapes (zeros included: the runtime
  computes them), fitted to the model timed at several widths on the
  runtime it will run on (`dkdp_keras.latency`); without, ``dense_latency_ms
  * kept_macs / dense_macs`` where `dense_latency_ms` is the model timed in
  Keras at batch 1 (`measure_latency_ms`), which misses what a small model
  spends per operator whatever its widths (see README.md, Budgets).
"""

import numpy as np

from dkdp_keras import _validation
from dkdp_keras.compaction import Counts, compact
from dkdp_keras.compaction import deployed_counts as _compacted_counts
from dkdp_keras.counting import (  # noqa: F401  (part of this module's API)
    _positions,
    count_macs,
    count_params,
    count_params_of_layer,
)
from dkdp_keras.latency import RUNTIMES, LatencyFit, fit_latency
from dkdp_keras.latency import measure_latency_ms  # noqa: F401  (part of this module's API)
from dkdp_keras.prunable import effective_kernels, is_masked, iter_layers


def deployed(model):
    """`model` compacted when it has masked layers, else `model` itself."""
    if not any(is_masked(layer) for layer in iter_layers(model)):
        return model
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compact(model)


def deployed_counts(model, masks=None, snapshot=None):
    """`(non-zero parameters, MACs per example)` of `deployed(model)`,
    counted without building the compacted model; with `masks` (layer name
    -> kernel mask), as if the masked layers had those, without assigning
    them, and with `snapshot` from its weights read once
    (`compaction.deployed_counts`)."""
    if not any(is_masked(layer) for layer in iter_layers(model)):
        return Counts.of(model)
    return _compacted_counts(model, masks, snapshot)


class Budget:
    """A resource constraint C = (max parameters, bytes, MACs, latency).

    Args:
        max_params: at most this many non-zero parameters.
        max_bytes: at most this many bytes of weights
            (non-zero parameters × `bytes_per_param`). The file holds
            more: a full-int8 `.tflite` of a small CNN adds about 7 kB of
            scales, biases and graph, and `compact` keeps zero channels for
            XNNPACK's speed (`align=16`). For a file of tens of kB, prune
            with `DKDPCallback(unit_multiple=1)` and export with `align=1`
            (`export_tflite`, `compact`): widths then step one unit at a
            time and the file holds no zero channel.
        max_macs: at most this many multiply-accumulates per example.
        max_latency_ms: at most this estimated batch-1 latency in ms. How
            it is estimated from the kept MACs: `latency_fit`.
        latency_fit: with `max_latency_ms`, the runtime to fit latency on,
            "litert" or "keras" (`dkdp_keras.latency.fit_latency`: copies
            of the model at several widths timed before training, and
            ``fixed_ms + ms_per_mac × MACs + ms_per_param × parameters``
            fitted to the times), or a `LatencyFit` of your own device's timings
            (`LatencyFit.from_timings`). None (the default): dense's Keras
            time × kept MACs / dense MACs, which a small model's fixed
            time per operator makes too low (README.md, Budgets).
        bytes_per_param: 4 (float32), 2 (float16) or 1 (int8) for bytes.
        input_shape: the shape of one input example (no batch axis) at
            which MACs and latency are counted, for models whose layers
            have outputs of unknown size (`None` dimensions). A DKDPModel
            takes it from the data `fit` is given when this is None.

    Example:

    >>> budget = Budget(max_params=60_000)
    >>> budget.is_met(model)  # doctest: +SKIP
    """

    MEASURES = ("params", "bytes", "macs", "latency_ms")

    def __init__(self, max_params=None, max_bytes=None, max_macs=None,
                 max_latency_ms=None, bytes_per_param=4, input_shape=None,
                 latency_fit=None):
        limits = {
            "max_params": max_params,
            "max_bytes": max_bytes,
            "max_macs": max_macs,
            "max_latency_ms": max_latency_ms,
        }
        if all(v is None for v in limits.values()):
            raise ValueError(
                "Budget needs at least one limit: max_params, max_bytes, "
                "max_macs or max_latency_ms."
            )
        for name, value in limits.items():
            if value is not None:
                _validation.number(name, value, low=0, low_open=True)
        if bytes_per_param not in (1, 2, 4):
            raise ValueError(
                "bytes_per_param must be 1 (int8), 2 (float16) or 4 "
                f"(float32), got {bytes_per_param!r}."
            )
        self.max_params = max_params
        self.max_bytes = max_bytes
        self.max_macs = max_macs
        self.max_latency_ms = max_latency_ms
        self.bytes_per_param = bytes_per_param
        if input_shape is not None and not (
                isinstance(input_shape, (tuple, list)) and input_shape
                and all(isinstance(d, int) and d > 0 for d in input_shape)):
            raise ValueError(
                "input_shape must be the shape of one input example, positive "
                f"integers without the batch axis (e.g. (224, 224, 3)), got {input_shape!r}.")
        self.input_shape = None if input_shape is None else tuple(input_shape)
        if isinstance(latency_fit, dict):
            latency_fit = LatencyFit.from_config(latency_fit)
        if latency_fit is not None and not (
                isinstance(latency_fit, LatencyFit) or latency_fit in RUNTIMES):
            raise ValueError(
                f"latency_fit must be one of {RUNTIMES} (time the model there before "
                "training) or a LatencyFit (LatencyFit.from_timings of your device's "
                f"timings), got {latency_fit!r}.")
        if latency_fit is not None and max_latency_ms is None:
            raise ValueError("latency_fit says how max_latency_ms is estimated; set "
                             "max_latency_ms too, or drop latency_fit.")
        self.latency_fit = latency_fit
        self._dense_latency = {}
        self._fits = {}  # architecture -> its LatencyFit, when latency_fit names a runtime

    def limits(self):
        """The set limits, keyed by measure name."""
        named = {
            "params": self.max_params,
            "bytes": self.max_bytes,
            "macs": self.max_macs,
            "latency_ms": self.max_latency_ms,
        }
        return {k: v for k, v in named.items() if v is not None}

    def measure(self, model, counts=None):
        """The model's measures that this budget limits, as a dict.

        A masked model is measured as it will be deployed: compacted
        (`dkdp_keras.compact`), so that the inputs a removed unit fed in the
        next layer count as removed too, then counted over non-zeros.
        `counts`: `deployed_counts(model)` when the caller has them already.
        A latency on a `latency_fit` is estimated from the compacted
        model's shapes instead (`Counts.computed`): the runtime computes
        the zero channels `compact` keeps for alignment too.
        """
        limits = self.limits()
        out = {}
        counts = deployed_counts(model) if counts is None else counts
        params, macs = counts
        if "params" in limits or "bytes" in limits:
            out["params"] = params
            if "bytes" in limits:
                out["bytes"] = params * self.bytes_per_param
        if "macs" in limits or "latency_ms" in limits:
            if "macs" in limits:
                out["macs"] = macs
            if "latency_ms" in limits and self.latency_fit is not None:
                # Time follows the shapes the runtime computes, zeros included.
                shape_params, shape_macs = getattr(counts, "computed", (params, macs))
                out["latency_ms"] = self.fit_for(model).predict(shape_macs, shape_params)
            elif "latency_ms" in limits:
                key = id(model)
                if key not in self._dense_latency:
                    self._dense_latency[key] = (
                        measure_latency_ms(model),
                        count_macs(model, nonzero=False),
                    )
                dense_ms, dense_macs = self._dense_latency[key]
                out["latency_ms"] = dense_ms * macs / max(dense_macs, 1)
        return out

    def fit_for(self, model):
        """The `LatencyFit` this budget estimates `model`'s latency with:
        the one given, or the model timed on the runtime named (once per
        model)."""
        if isinstance(self.latency_fit, LatencyFit):
            return self.latency_fit
        # Keyed by the architecture, not the object: a fit depends on the
        # widths only, and `dkdp run` checks the budget on the teacher
        # before its dense baseline trains.
        # (Keras' count_params reads shapes only: this runs in the budget
        # search, some twenty times a pruning event.)
        key = (model.name, tuple(model.inputs[0].shape)[1:], model.count_params())
        if key not in self._fits:
            self._fits[key] = fit_latency(model, self.latency_fit)
        return self._fits[key]

    def usage(self, model, counts=None):
        """measure / limit for each limit (1.0 = exactly at the budget)."""
        measured = self.measure(model, counts)
        return {k: measured[k] / v for k, v in self.limits().items()}

    def is_met(self, model):
        """True when every measure is within its limit."""
        return all(u <= 1.0 for u in self.usage(model).values())

    def check_feasible(self, model):
        """Raise if no pruning of `model` could meet the budget.

        The floors: for parameters (and bytes), the parameters of layers
        without a mask (normalisation and other unmasked layers), which
        kernel pruning never reduces, plus the one weight that every masked
        layer keeps; for MACs, that weight at each of the layer's output
        positions plus the MACs of unmasked kernel layers.
        """
        layers = list(iter_layers(model))
        floor_params = sum(
            count_params_of_layer(layer) for layer in layers if not is_masked(layer)
        ) + sum(1 for layer in layers if is_masked(layer))
        if self.max_params is not None and self.max_params < floor_params:
            raise ValueError(
                f"max_params={self.max_params} is below the {floor_params} "
                f"parameters of model '{model.name}' that pruning cannot "
                "remove (unmasked layers such as normalisation, and one "
                f"weight per masked layer); allow more than {floor_params}."
            )
        floor_bytes = floor_params * self.bytes_per_param
        if self.max_bytes is not None and self.max_bytes < floor_bytes:
            raise ValueError(
                f"max_bytes={self.max_bytes} is below the {floor_bytes} bytes "
                f"({floor_params} parameters x {self.bytes_per_param}) of "
                f"model '{model.name}' that pruning cannot remove; allow more "
                f"than {floor_bytes}."
            )
        # Every masked layer keeps one weight, used at each output position.
        floor_macs = sum(
            _positions(layer) if is_masked(layer)
            else int(np.count_nonzero(kernel)) * _positions(layer)
            for layer, kernel in effective_kernels(model)
        )
        if self.max_macs is not None and self.max_macs < floor_macs:
            raise ValueError(
                f"max_macs={self.max_macs} is below the {floor_macs} "
                f"multiply-accumulates of model '{model.name}' that pruning "
                "cannot remove (one weight per masked layer, at each of its "
                f"output positions); allow more than {floor_macs}."
            )
        if self.max_latency_ms is not None and self.latency_fit is not None:
            fit = self.fit_for(model)
            floor_ms = fit.predict(floor_macs, floor_params)
            if self.max_latency_ms < floor_ms:
                raise ValueError(
                    f"max_latency_ms={self.max_latency_ms} is below the {floor_ms:.4g} ms "
                    f"that model '{model.name}' would take at its narrowest on "
                    f"{fit.runtime} ({fit.fixed_ms:.4g} ms whatever the widths: {fit}); "
                    f"allow more than {floor_ms:.4g} ms, or use a smaller architecture.")

    def get_config(self):
        return {
            "max_params": self.max_params,
            "max_bytes": self.max_bytes,
            "max_macs": self.max_macs,
            "max_latency_ms": self.max_latency_ms,
            "bytes_per_param": self.bytes_per_param,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "latency_fit": self.latency_fit.get_config()
            if isinstance(self.latency_fit, LatencyFit) else self.latency_fit,
        }

    def __repr__(self):
        config = dict(self.get_config(), latency_fit=self.latency_fit)
        args = ", ".join(f"{k}={v!r}" for k, v in config.items()
                         if v is not None and k != "bytes_per_param")
        return f"Budget({args})"
