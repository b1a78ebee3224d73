"""DKDPCallback: prune, distil and refine inside `model.fit`."""

import math
import os
import warnings

import keras
import numpy as np
from keras import ops

from dkdp_keras import _validation
from dkdp_keras import importance as importance_lib
from dkdp_keras.budget import count_macs, count_params, deployed, deployed_counts
from dkdp_keras.graph import batchnorm_after, output_unit_layers, shared_layer_reader
from dkdp_keras.prunable import (
    is_kernel_layer,
    iter_layers,
    masked_layers,
    sync_batchnorm,
)
from dkdp_keras.state import pruning_state
from dkdp_keras.thresholds.mechanism import NORMALIZE, Floors, MaskPool
from dkdp_keras.thresholds.schedules import (
    Adaptive,
    PolynomialDecay,
    SparsityPolicy,
)


#: What each `DKDPCallback.history` record holds.
HISTORY = ("step", "tau", "sparsity", "kept_params", "before")

#: Epoch ends after a pruning event that `DKDPCallback(average=True)` leaves
#: out of the mean: the teacher is still recovering from the event.
AVERAGE_BURN_IN = 1
#: Epoch ends after those that `DKDPCallback(average=True)` needs to average.
MIN_AVERAGED_EPOCHS = 2
#: `batchnorm_momentum="auto"`: the weight an epoch's BatchNormalization
#: moving statistics may keep of what they were before it.
BN_SETTLE = 0.05


def _examples_pair(name, data):
    """`data` checked as None or an `(x, y)` pair of matching examples."""
    if data is None:
        return None
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError(f"{name} must be a pair (x, y), got {type(data).__name__}.")
    x, y = data
    return _validation.examples(f"{name} x", x, y=y), y


class StudentRefresh:
    """When a DKDPModel's student is rebuilt from the pruned teacher.

    Args:
        every: rebuild after every `every` pruning events.
        shrink: rebuild when the teacher's non-zero parameters have fallen
            by this factor (> 1) since the last rebuild.
        strategy: passed to `DKDPModel.refresh_student` ("width",
            "compact_teacher" or a callable).

    "compact_teacher" and callables change the student's architecture, so
    weights saved after a rebuild (`BackupAndRestore`) no longer fit a model
    built as at the start: resume such runs from a `.keras` checkpoint
    (`ModelCheckpoint`, then `keras.saving.load_model` and
    `fit(initial_epoch=...)`), which stores the student's architecture too.
    """

    def __init__(self, every=None, shrink=None, strategy="width"):
        if every is None and shrink is None:
            raise ValueError("StudentRefresh needs every= or shrink=.")
        self.every = (
            None if every is None
            else _validation.number("every", every, low=1, integer=True)
        )
        self.shrink = (
            None if shrink is None
            else _validation.number("shrink", shrink, low=1.0, low_open=True)
        )
        if isinstance(strategy, str):
            _validation.choice("strategy", strategy, ("width", "compact_teacher"))
        elif not callable(strategy):
            raise TypeError(
                "strategy must be 'width', 'compact_teacher' or a callable "
                f"teacher -> student, got {strategy!r}."
            )
        self.strategy = strategy

    def __repr__(self):
        return (f"StudentRefresh(every={self.every}, shrink={self.shrink}, "
                f"strategy={self.strategy!r})")


class DKDPCallback(keras.callbacks.Callback):
    """Prunes the teacher on a schedule during `fit`: scores importance,
    asks the threshold policy for the target, writes new masks.

    Each pruning event: (1) the criterion scores every masked layer of the
    teacher at `granularity`; (2) the policy gives the target sparsity (a
    schedule from the training step, or `Adaptive` from the budget and the
    monitored metric); (3) the shared mechanism (`compute_masks`) finds τ so
    that the target fraction of weights scores below it, applies per-layer
    floors, and the masks are assigned. Pruned weights keep their stored
    values under the mask, so a back-off can restore them.

    Works with a `DKDPModel` (prunes its teacher) and with a plain Keras
    model made with `dkdp_keras.prunable`.

    Everything it decides from (pruning events done, τ, the event history,
    the `Adaptive` controller with its last good masks, the saved
    BatchNormalization statistics of removed units) lives in the model's
    `PruningState` (`dkdp_keras.state`), in non-trainable variables that
    `keras.callbacks.BackupAndRestore` and `ModelCheckpoint` save: a run
    resumed from a checkpoint ends as the uninterrupted run would. List this
    callback *before* `BackupAndRestore`, so that each epoch's checkpoint is
    written after its pruning event (callbacks run in list order). In the
    other order a resumed schedule replays the missed event exactly, but an
    `Adaptive` decision of that epoch is lost (with a warning).

    Adds to the epoch logs (progress bar, History, and CSVLogger when it is
    listed after this callback): `tau`, `sparsity` (of the masks),
    `kept_params` and `kept_macs` (non-zeros of the teacher as deployed,
    i.e. compacted) and, with a budget, `budget_usage` (the largest
    measure/limit ratio; <= 1 means within budget).

    Args:
        importance: a criterion, its name or a callable (see
            `dkdp_keras.importance`).
        granularity: "weight" (unstructured) or "unit" (whole neurons and
            filters; the output layer's units are never removed).
        threshold: a `SparsityPolicy`: `ConstantSparsity`, `PolynomialDecay`
            or `Adaptive`. Default: `PolynomialDecay(0, 0.8)` from `begin`
            to 70% of the training steps.
        frequency: "epoch" (prune at epoch ends) or a number of steps.
            `Adaptive` always decides at epoch ends.
        begin: first training step at which pruning may happen.
        end: last training step at which pruning may happen (None: none).
        scope: "global" (one τ) or "layer" (a τ per layer).
        normalize: how scores are made comparable across layers for a
            global τ: "lamp" (default), "mean", "l2" or "none".
        floors: a `thresholds.Floors` (what every layer keeps).
        layer_importance: if True, each layer's normalised scores are
            multiplied by its layer-level importance (mean 1 over layers).
        unit_multiple: at "unit" granularity, layers of at least
            4 × `unit_multiple` units keep a multiple of it (their best
            units): LiteRT/XNNPACK run such widths much faster (see
            `thresholds.compute_masks`). 1 turns it off.
        student_refresh: a `StudentRefresh`, or an int k for
            `StudentRefresh(every=k)`.
        calibration_data: `(x, y)` used to collect gradients for gradient
            criteria when the model is a plain Keras model (a DKDPModel
            collects them during training).
        log_dir: write TensorBoard summaries here (τ, sparsity per layer,
            importance histograms).
        average: if True (default), training ends with the teacher's
            weights averaged over the epoch ends since its masks last
            changed, leaving out the first one after the change, when at
            least two are left (stochastic weight averaging, Izmailov et
            al. 2018): at a constant learning rate the weights wander about
            a minimum, and their mean generalises better than any one of
            them. The first epoch after a pruning event is still recovering
            from it and would pull the mean down (the reference CNN pruned
            to 56k parameters at epoch 9: best single epoch 91.19% test,
            mean of epochs 10-15 91.71%, of 11-15 91.96%; two epochs after
            a 90% prune, with the first: 69%, against >75% for the last).
            BatchNormalization statistics are averaged too; the masks are
            those all the averaged epochs trained with. With
            `Adaptive(restore_best=True)` the average takes the place of
            the best epoch when there is one.
        validation_data: `(x, y)` on which the end of training checks the
            weight average against the last epoch (and `Adaptive`'s best
            epoch) for a plain model; a DKDPModel uses the validation data
            of its `fit`. Without any, a model with BatchNormalization keeps
            its last epoch and one without takes the mean unchecked.
        batchnorm_momentum: "auto" (default): when an epoch has too few
            steps for BatchNormalization's moving statistics to settle
            (momentum ** steps_per_epoch > 0.05, as with Keras' 0.99 and
            fewer than 300 steps), every BatchNormalization layer of the
            model trains this fit with momentum 0.05 ** (1 / steps), and
            gets its own back after training. None: left as it is.
        verbose: 0 silent, 1 one line per pruning event.

    Example:

    ```python
    callback = DKDPCallback(
        importance=dkdp_keras.importance.Taylor(), granularity="unit",
        threshold=dkdp_keras.thresholds.Adaptive(
            budget=dkdp_keras.Budget(max_params=60_000), tolerance=0.005))
    model.fit(x, y, validation_split=0.1, epochs=15, callbacks=[callback])
    ```
    """

    def __init__(self, importance="magnitude", granularity="weight",
                 threshold=None, frequency="epoch", begin=0, end=None,
                 scope="global", normalize="lamp", floors=None,
                 layer_importance=False, unit_multiple=8, student_refresh=None,
                 calibration_data=None, log_dir=None, average=True,
                 validation_data=None, batchnorm_momentum="auto", verbose=1):
        super().__init__()
        self.importance = importance_lib.get(importance)
        self.granularity = _validation.choice(
            "granularity", granularity, ("weight", "unit")
        )
        if threshold is not None and not isinstance(threshold, SparsityPolicy):
            raise TypeError(
                "threshold must be a dkdp_keras.thresholds policy "
                "(ConstantSparsity, PolynomialDecay, Adaptive), got "
                f"{threshold!r}."
            )
        self.threshold = threshold
        self._default_threshold = threshold is None
        if frequency != "epoch":
            _validation.number("frequency", frequency, low=1, integer=True)
        self.frequency = frequency
        self.begin = _validation.number("begin", begin, low=0, integer=True)
        if end is not None:
            _validation.number("end", end, low=self.begin, integer=True)
        self.end = end
        self.scope = _validation.choice("scope", scope, ("global", "layer"))
        self.normalize = _validation.choice("normalize", normalize, NORMALIZE)
        if floors is not None and not isinstance(floors, Floors):
            raise TypeError(
                f"floors must be a dkdp_keras.thresholds.Floors, got {floors!r}."
            )
        self.floors = floors or Floors()
        if not isinstance(layer_importance, bool):
            raise TypeError(
                f"layer_importance must be True or False, got {layer_importance!r}."
            )
        self.layer_importance = layer_importance
        self.unit_multiple = _validation.number(
            "unit_multiple", unit_multiple, low=1, integer=True
        )
        if isinstance(student_refresh, int) and not isinstance(student_refresh, bool):
            student_refresh = StudentRefresh(every=student_refresh)
        if student_refresh is not None and not isinstance(student_refresh, StudentRefresh):
            raise TypeError(
                "student_refresh must be None, an int or a StudentRefresh, "
                f"got {student_refresh!r}."
            )
        self.student_refresh = student_refresh
        self.calibration_data = _examples_pair("calibration_data", calibration_data)
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a directory path, got {log_dir!r}.")
        if log_dir is not None:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise ImportError(
                    "DKDPCallback(log_dir=...) writes TensorBoard summaries "
                    "and needs the tensorboard package: pip install tensorboard."
                ) from None
        self.log_dir = log_dir
        if not isinstance(average, bool):
            raise TypeError(f"average must be True or False, got {average!r}.")
        self.average = average
        self.averaged_epochs = 0
        self.validation_data = _examples_pair("validation_data", validation_data)
        if batchnorm_momentum not in ("auto", None):
            raise ValueError(
                "batchnorm_momentum must be 'auto' or None, got "
                f"{batchnorm_momentum!r}."
            )
        self.batchnorm_momentum = batchnorm_momentum
        self.final = None  # what training ended with (`_finish`)
        self.last_decision = None  # what the last event decided from
        self.verbose = _validation.number("verbose", verbose, low=0, integer=True)
        self.tau = 0.0
        self.events = 0
        self.history = []  # one dict per pruning event
        self._writer = None
        self._state = None
        self._run_started = False
        self._epochs_done = 0
        self._stale = False  # statistics predate the current masks

    # ------------------------------------------------------------ plumbing
    def _teacher(self):
        return getattr(self.model, "teacher", self.model)

    def _is_dkdp(self):
        from dkdp_keras.model import DKDPModel

        return isinstance(self.model, DKDPModel)

    def _step(self):
        return int(ops.convert_to_numpy(self.model.optimizer.iterations))

    def set_model(self, model):
        super().set_model(model)
        # Attached now, when fit builds its callback list: before any
        # callback's on_train_begin, where BackupAndRestore loads the
        # checkpoint into it.
        self._state = pruning_state(model)

    def on_train_begin(self, logs=None):
        self._claim_model()
        teacher = self._teacher()
        self._layers = masked_layers(teacher)
        if not self._layers:
            raise ValueError(
                f"DKDPCallback prunes masked layers, and model "
                f"'{teacher.name}' has none: make it with "
                "dkdp_keras.prunable(model) or train a dkdp_keras.DKDPModel."
            )
        if self.calibration_data is not None:
            _validation.examples(
                "calibration_data x", self.calibration_data[0], model=teacher
            )
        if (
            "gradient" in (getattr(self.importance, "requires", None) or ())
            and not self._is_dkdp()
            and self.calibration_data is None
        ):
            raise ValueError(
                f"{type(self.importance).__name__} needs gradients, which "
                "only a DKDPModel collects while training: pass "
                "calibration_data=(x, y) to DKDPCallback, or train a "
                "DKDPModel."
            )
        frozen = [l.name for l in self._layers if not l.trainable]
        if frozen and "gradient" in (getattr(self.importance, "requires", None) or ()):
            raise ValueError(
                f"{type(self.importance).__name__} reads gradient statistics, "
                f"and layer{'s' if len(frozen) > 1 else ''} "
                f"{', '.join(repr(n) for n in frozen)} of model '{teacher.name}' "
                f"{'are' if len(frozen) > 1 else 'is'} frozen (trainable=False): "
                "a frozen layer gets no gradients to collect. Unfreeze it "
                "(layer.trainable = True, or the model containing it), or use "
                "a criterion that needs none, such as importance='magnitude'."
            )
        if self._is_dkdp():
            needs = getattr(self.importance, "requires", None)
            self.model.request_statistics(
                ("gradient", "activation") if needs is None else needs,
                gradient_statistics=self._gradient_statistics(),
            )
        if self.granularity == "unit":
            shared = shared_layer_reader(teacher)
            if shared is not None:
                raise ValueError(
                    f"Model '{teacher.name}' calls a layer at more than one "
                    f"place (a shared layer; layer '{shared}' reads the output "
                    "of its second call), and unit pruning cannot remove a "
                    "unit from one call of a layer but not from the other: "
                    "compaction and export would fail after training. Use "
                    "DKDPCallback(granularity='weight'), or give each call "
                    "its own layer."
                )
        self._protect = (
            output_unit_layers(teacher) if self.granularity == "unit" else set()
        )
        self._batchnorms = batchnorm_after(teacher)
        self._bn_saved = {}
        self._run_started = False
        self._good = None
        epochs = self.params.get("epochs") or 1
        self._epochs = epochs
        self._epoch_start_step = self._step()
        if self._default_threshold:
            # Built per fit from its own length (`_default_schedule`).
            self.threshold = self._default_schedule(self.params.get("steps"))
        self._dense_params = count_params(teacher, nonzero=False)
        self._refresh_params = deployed_counts(teacher)[0]
        if isinstance(self.threshold, Adaptive):
            self._check_monitor()
            self.threshold.budget.check_feasible(teacher)
            self._check_budget_reachable()
            self.threshold.start(teacher, epochs)
        self._settle_batchnorm()
        if self.log_dir and self._writer is None:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(str(self.log_dir))

    def _gradient_statistics(self):
        """The gradient running means this callback's scoring reads (None:
        all), so that the training step keeps only those."""
        read = getattr(self.importance, "gradient_statistics", None)
        if read is None:
            return None
        names = []
        granularities = [self.granularity] + (["layer"] if self.layer_importance else [])
        for granularity in granularities:
            found = read(granularity)
            if found is None:
                return None
            names += [n for n in found if n not in names]
        return tuple(names)

    def _claim_model(self):
        """Refuse a second DKDPCallback in the same fit: both would prune
        the same masks and overwrite each other's state. (Callbacks of one
        fit share one `params` dict; a callback left over from an earlier
        fit, or one that crashed, has another.)"""
        holder = getattr(self.model, "_dkdp_callback", None)
        if holder is not None and holder[1] is not self and holder[0] is self.params:
            raise ValueError(
                "Two DKDPCallbacks were given to one fit of model "
                f"'{self.model.name}': they would prune the same masks and "
                "overwrite each other's state. Pass one DKDPCallback (one "
                "criterion can combine several: importance.Combined)."
            )
        object.__setattr__(self.model, "_dkdp_callback", (self.params, self))

    def _default_schedule(self, steps):
        """`PolynomialDecay(0, 0.8)` from `begin` to 70% of this fit's
        steps; None while the steps per epoch are unknown (data of unknown
        length): it is then built at the first epoch end, from the steps
        that epoch took, and no pruning happens before it."""
        if not steps:
            return None
        total = self._epochs * int(steps)
        return PolynomialDecay(
            0.0, 0.8, self.begin, max(self.begin + 1, int(0.7 * total)),
        )

    def _check_monitor(self):
        """A DKDPModel knows before training what its epoch logs will hold
        (its metrics, with `val_` when fit has validation data): refuse a
        monitor they will not have now, not at the first epoch's end. (A
        plain model's logs can be written by other callbacks too; there it
        is checked at the first epoch end.)"""
        if not self._is_dkdp():
            return
        monitor = self.threshold.monitor
        names = {m.name for m in self.model.metrics}
        validated = getattr(self.model, "_fit_validation", None) is not None
        base = monitor[len("val_"):] if monitor.startswith("val_") else None
        if base is not None:
            found = validated and (base in names or "teacher_" + base in names)
        else:
            found = monitor in names
        if found:
            return
        logged = sorted(names) + (sorted("val_" + n for n in names) if validated else [])
        why = (
            "fit has no validation data: pass validation_data= or "
            "validation_split= to fit, or " if base is not None and not validated
            else ""
        )
        raise ValueError(
            f"Adaptive watches {monitor!r}, which the epoch logs will not have "
            f"(they will have {logged}): {why}set Adaptive(monitor=...) to one "
            "of them."
        )

    def check_budget(self, model):
        """Raise `ValueError` if this callback's `Adaptive` budget cannot be
        met by its pruning of `model` (a DKDPModel or a masked model), as
        `fit` would at its start: for callers that train other things
        first (a dense baseline) and want to know before."""
        if not isinstance(self.threshold, Adaptive):
            return
        self.set_model(model)
        teacher = self._teacher()
        self._layers = masked_layers(teacher)
        self._protect = (
            output_unit_layers(teacher) if self.granularity == "unit" else set()
        )
        self.threshold.budget.check_feasible(teacher)
        self._check_budget_reachable()

    def _check_budget_reachable(self):
        """Refuse, before training, a budget that the strongest pruning this
        callback can do (0.999 sparsity, what the budget search tries last,
        with the floors, the protected output units and `unit_multiple`)
        does not meet, naming the smallest value each limit could have."""
        budget = self.threshold.budget
        scores = [
            ops.convert_to_numpy(importance_lib.Magnitude().score(l, self.granularity))
            for l in self._layers
        ]
        pool = MaskPool(
            self._layers, scores, granularity=self.granularity,
            scope=self.scope, normalize=self.normalize, floors=self.floors,
            protect_units=self._protect, unit_multiple=self.unit_multiple,
        )
        usage = self._floor_usage(pool.masks(0.999).masks, budget)
        over = {k: v for k, v in usage.items() if v > 1.0}
        if not over:
            return
        limits = budget.limits()
        fixes = ", ".join(
            f"max_{k}={limits[k]:g} (the strongest pruning leaves "
            f"{limits[k] * usage[k]:.4g})" for k in over
        )
        raise ValueError(
            f"The budget {budget} cannot be met by pruning model "
            f"'{self._teacher().name}' at granularity '{self.granularity}': "
            f"{fixes}; what pruning can never remove (the output layer's "
            "units and biases, normalisation layers, the units and weights "
            "every layer keeps by its floors) is more. Allow at least that "
            "much, or lower the floors (thresholds.Floors)."
        )

    def _floor_usage(self, masks, budget):
        """Budget usage of the teacher compacted under `masks`, counting
        every parameter it keeps but the zeros of its kernels: before
        training, biases and normalisation offsets are zeros that training
        makes non-zero."""
        saved = self._current_masks()
        teacher = self._teacher()
        self._assign(masks, batchnorm=False)
        sync_batchnorm(teacher)
        try:
            small = deployed(teacher)
        finally:
            self._assign(saved, batchnorm=False)
            sync_batchnorm(teacher)
        params = 0
        for layer in iter_layers(small):
            kernel = getattr(layer, "kernel", None) if is_kernel_layer(layer) else None
            for variable in layer.weights:
                values = ops.convert_to_numpy(variable)
                params += (int(np.count_nonzero(values)) if variable is kernel
                           else values.size)
        return budget.usage(teacher, counts=(params, count_macs(small)))

    def _settle_batchnorm(self):
        """`batchnorm_momentum="auto"`: lower the momentum of every
        BatchNormalization layer for this fit when an epoch has too few
        steps for its moving statistics to follow the weights (momentum **
        steps > BN_SETTLE), so that the statistics inference uses, and
        every decision validates with, are mostly this epoch's (with
        Keras' 0.99 and 41 steps an epoch, 66% of them were still the
        initial 0 and 1 after one epoch, 9% after six). Restored after
        training."""
        self._momenta = {}
        steps = self.params.get("steps")
        if self.batchnorm_momentum != "auto" or not steps:
            return
        target = BN_SETTLE ** (1.0 / int(steps))
        for layer in iter_layers(self.model):
            if isinstance(layer, keras.layers.BatchNormalization) and (
                layer.momentum > target
            ):
                self._momenta[id(layer)] = (layer, layer.momentum)
                layer.momentum = target
        if self._momenta:
            self.model.make_train_function(force=True)
            if self.verbose:
                print(
                    f"DKDP: {int(steps)} steps an epoch are too few for "
                    "BatchNormalization's moving statistics at momentum "
                    f"{max(m for _, m in self._momenta.values()):g}; this fit "
                    f"trains with momentum {target:.3f}.",
                    flush=True,
                )

    def _restore_batchnorm(self):
        for layer, momentum in getattr(self, "_momenta", {}).values():
            layer.momentum = momentum
        self._momenta = {}

    # ---------------------------------------------------------------- state
    def on_epoch_begin(self, epoch, logs=None):
        # The first epoch of this fit: every on_train_begin has run, so a
        # checkpoint, if one was restored, is in the model's state now.
        if not self._run_started:
            self._run_started = True
            self._begin_run(epoch)
        self._reset_stale_statistics()
        self._epoch_start_step = self._step()

    def _reset_stale_statistics(self):
        """Start new running statistics if the masks changed since they
        were collected. Done when training goes on (this epoch's begin, or
        the step after a step-scheduled event), not at the event: a pruning
        event after the last epoch (`Adaptive`'s prune to the budget in
        `on_train_end`) still scores from the last epoch's statistics."""
        if self._stale:
            for layer in self._layers:
                layer.reset_statistics()
            self._stale = False

    def _begin_run(self, epoch):
        saved = self._state.get("epoch")
        saved = None if saved is None else int(saved)
        if epoch > 0 and saved == epoch:
            self._restore_state()
        elif epoch > 0 and saved == epoch - 1:
            # The checkpoint was written before this callback's end of
            # epoch `epoch - 1` (BackupAndRestore listed before it).
            self._restore_state()
            self._replay_epoch_end(epoch - 1)
        else:
            self.tau = 0.0
            self.events = 0
            self.history = []
            self._bn_saved = {}
            self._stale = False
            self._refresh_params = deployed_counts(self._teacher())[0]
            self.last_decision = None
            for key in [k for k in self._state.keys()
                        if k.startswith(("best:", "avg:", "decision:"))]:
                self._state.remove(key)  # a new fit forgets an old best and mean
            self._save_state(epoch)
        self._keep_good()

    def _seed_generators(self):
        """The model's `keras.random.SeedGenerator`s (Dropout, noise
        layers, ...), in a fixed order."""
        found = []
        for layer in iter_layers(self.model):
            for name in sorted(vars(layer)):
                value = vars(layer)[name]
                if isinstance(value, keras.random.SeedGenerator):
                    found.append(value)
        return found

    def _replay_epoch_end(self, epoch):
        step = self._step()
        if isinstance(self.threshold, Adaptive):
            warnings.warn(
                "DKDPCallback: the checkpoint this run resumed from was "
                f"written before the Adaptive decision at the end of epoch "
                f"{epoch + 1}, which is lost; the controller continues from "
                "the epoch before. List DKDPCallback before "
                "BackupAndRestore in callbacks.",
                stacklevel=2,
            )
        elif (self.frequency == "epoch" and self.threshold is not None
              and self._in_window(step)):
            self._prune(self.threshold.sparsity_at(step))
        self._accumulate_average()
        self._save_state(epoch + 1)

    def _save_state(self, epochs_done):
        """Write what the next decisions depend on into the model's state."""
        self._epochs_done = epochs_done
        state = self._state
        state.set("epoch", np.int64(epochs_done))
        state.set("events", np.int64(self.events))
        state.set("tau", np.float64(self.tau))
        state.set("refresh_params", np.int64(self._refresh_params))
        state.set("stale_statistics", np.int64(self._stale))
        # Dropout's random streams: Keras saves no seed generator, and a
        # resumed run must draw the masks the uninterrupted run would.
        for i, generator in enumerate(self._seed_generators()):
            state.set(f"seed:{i}", ops.convert_to_numpy(generator.state))
        state.set("history", np.array(
            [[h[k] for k in HISTORY] for h in self.history], "float64"
        ).reshape(-1, len(HISTORY)))
        # Layers are keyed by position: their names are numbered per
        # process ("dense_12"), their order is the model's.
        position = {layer.name: i for i, layer in enumerate(self._layers)}
        for name, saved in self._bn_saved.items():
            for kind, values in saved.items():
                state.set(f"bn_{kind}:{position[name]}", values)
        if isinstance(self.threshold, Adaptive):
            policy = self.threshold.get_state()
            for key in Adaptive.STATE:
                value = policy[key]
                state.set(f"adaptive:{key}", np.float64(
                    np.nan if value is None else value
                ))
            masks = policy["last_good_masks"]
            state.set("adaptive:has_good", np.int64(masks is not None))
            for name, mask in (masks or {}).items():
                state.set(f"adaptive:good:{position[name]}", mask)

    def _restore_state(self):
        """Read back what `_save_state` wrote (a resumed run)."""
        state = self._state
        self._epochs_done = int(state.get("epoch"))
        self.events = int(state.get("events", 0))
        self.tau = float(state.get("tau", 0.0))
        self._refresh_params = int(
            state.get("refresh_params", self._refresh_params)
        )
        self._stale = bool(state.get("stale_statistics", 0))
        for i, generator in enumerate(self._seed_generators()):
            value = state.get(f"seed:{i}")
            if value is not None and value.shape == tuple(generator.state.shape):
                generator.state.assign(value)
        self.history = [
            dict(zip(HISTORY, (int(r[0]), float(r[1]), float(r[2]), int(r[3]),
                               float(r[4]) if len(r) > 4 else float("nan"))))
            for r in state.get("history", np.zeros((0, len(HISTORY))))
        ]
        self.last_decision = self._decision_from_state()
        self._bn_saved = {}
        for i, layer in enumerate(self._layers):
            for kind in ("mean", "var"):
                values = state.get(f"bn_{kind}:{i}")
                if values is not None:
                    self._bn_saved.setdefault(layer.name, {})[kind] = values
        if isinstance(self.threshold, Adaptive):
            if "adaptive:step" not in state:
                raise ValueError(
                    "The checkpoint holds no Adaptive controller state: it "
                    "was written by a run with another threshold policy."
                )
            values = {}
            for key in Adaptive.STATE:
                value = float(state.get(f"adaptive:{key}"))
                values[key] = None if math.isnan(value) else value
            values["last_good_masks"] = (
                {l.name: state.get(f"adaptive:good:{i}")
                 for i, l in enumerate(self._layers)}
                if int(state.get("adaptive:has_good", 0)) else None
            )
            self.threshold.set_state(values)

    def on_train_batch_end(self, batch, logs=None):
        # Only step-scheduled pruning acts here; reading the loss every step
        # would force a device sync per step, so divergence is caught at
        # each pruning event (weights) and each epoch end (loss) instead.
        if self.frequency == "epoch" or self.threshold is None or isinstance(
            self.threshold, Adaptive
        ):
            return
        step = self._step()
        if step % self.frequency == 0 and self._in_window(step):
            self._check_loss(logs)
            if self._prune(self.threshold.sparsity_at(step)) is not None:
                self._reset_stale_statistics()
                self._save_state(self._epochs_done)
                self._keep_good()

    def _no_step_trained(self, epoch, logs):
        """An epoch whose every step was skipped (`DKDPModel(on_nonfinite=
        "skip")` and NaN/Inf in every batch): its training logs are means of
        no step, so they read NaN, not 0; no pruning decision is made."""
        for key in list(logs):
            if not key.startswith("val_") and key != "skipped_steps":
                logs[key] = float("nan")
        warnings.warn(
            f"DKDPCallback: epoch {epoch + 1} applied no training step: the "
            "losses or gradients of every step were NaN or Inf, and "
            "DKDPModel(on_nonfinite='skip') skipped them all. Nothing was "
            "pruned at its end. Check the data for NaN/Inf, lower the "
            "learning rate or clip gradients (optimizer clipnorm=1.0).",
            stacklevel=3,
        )
        if self.verbose:
            print(f"\nDKDP epoch {epoch + 1}: every training step was skipped "
                  "(NaN/Inf); no pruning decision.", flush=True)

    def _check_loss(self, logs):
        if logs and "loss" in logs:
            value = float(ops.convert_to_numpy(logs["loss"]))
            if not math.isfinite(value):
                self._fail(
                    f"The training loss became {value} at step {self._step()}."
                )

    def _fail(self, what):
        """Stop training on NaN/Inf: no pruning acts on it, and a plain
        model gets back the weights of the last check that found them
        finite (a DKDPModel's training step never applies such a step)."""
        restored = self._restore_good()
        raise FloatingPointError(
            f"{what} DKDPCallback stopped training before any pruning step "
            f"acted on it (masks are as they were{restored}). Lower the "
            "learning rate, check the data for NaN/Inf, or clip gradients "
            "(optimizer clipnorm=1.0); DKDPModel(on_nonfinite='skip') skips "
            "such steps instead."
        )

    def _keep_good(self):
        """Remember a plain model's weights and optimizer state, checked
        finite, to go back to if training diverges."""
        if self._is_dkdp():
            return
        values = [np.array(ops.convert_to_numpy(v)) for v in self._variables()]
        self._good = (self._step(), values)

    def _variables(self):
        optimizer = getattr(self.model, "optimizer", None)
        return list(self.model.weights) + list(getattr(optimizer, "variables", []))

    def _restore_good(self):
        good = getattr(self, "_good", None)
        if good is None:
            return ""
        step, values = good
        for var, value in zip(self._variables(), values):
            var.assign(value)
        return (
            "; weights and optimizer state are back to those after step "
            f"{step}, the last check that found them finite"
        )

    def _in_window(self, step):
        return step >= self.begin and (self.end is None or step <= self.end)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        self._check_loss(logs)
        self._check_weights()
        step = self._step()
        trained = step > self._epoch_start_step
        if not trained:
            self._no_step_trained(epoch, logs)
        elif self.threshold is None:  # the default schedule, length now known
            self.threshold = self._default_schedule(step - self._epoch_start_step)
        if not trained:
            pass  # nothing was learnt to decide from
        elif isinstance(self.threshold, Adaptive):
            if self._in_window(step):
                self._adaptive_event(epoch, logs)
        elif self.frequency == "epoch" and self._in_window(step):
            self._prune(self.threshold.sparsity_at(step))
        self._accumulate_average()
        self._save_state(epoch + 1)
        self._keep_good()
        self._add_logs(logs)

    def on_train_end(self, logs=None):
        self._restore_batchnorm()
        if not self._run_started and not self._resume_after_last_epoch():
            return
        self.averaged_epochs = 0
        self._finish()
        self._reset_stale_statistics()  # the prune to the budget read them
        self._drop_dead_state()
        if self._writer is not None:
            self._writer.flush()

    def _resume_after_last_epoch(self):
        """A fit resumed after its last epoch (`BackupAndRestore` holding a
        run whose every epoch had ended) runs no epoch: the state is read
        back here, so that training ends as the uninterrupted run did."""
        saved = self._state.get("epoch")
        if saved is None or int(saved) == 0:
            return False
        self._run_started = True
        self._begin_run(int(saved))
        return True

    def _drop_dead_state(self):
        """Forget what only a run in progress needs (the running mean, the
        best epoch's weights, the last good masks): a `.keras` file saved
        after `fit` would carry them as dead weight. Checkpoints written
        during the run (at epoch ends) keep them, so a resumed run ends as
        the uninterrupted one."""
        for key in self._state.keys():
            if key.startswith(("avg:", "best:", "adaptive:good:", "decision:")):
                self._state.remove(key)
        if "adaptive:has_good" in self._state:
            self._state.set("adaptive:has_good", np.int64(0))
        if isinstance(self.threshold, Adaptive):
            self.threshold.last_good_masks = None

    # ------------------------------------------------------------ averaging
    def _accumulate_average(self):
        """Fold this epoch end's teacher weights into the running mean (in
        the checkpointed state) if the masks are those the mean is taken
        with and the first `AVERAGE_BURN_IN` epoch ends under them have
        passed; else start a new mean with these masks (the weights of an
        epoch end that changed the masks have not trained with them)."""
        if not self.average:
            return
        state = self._state
        masks = self._current_masks()
        same = "avg:seen" in state and self._averaged_with(masks)
        if not same:  # (assigned in place: no new variables per event)
            for i, layer in enumerate(self._layers):
                state.set(f"avg:mask:{i}", masks[layer.name])
            state.set("avg:seen", np.int64(0))
            return
        seen = int(state.get("avg:seen")) + 1
        state.set("avg:seen", np.int64(seen))
        count = seen - AVERAGE_BURN_IN  # epoch ends in the mean
        if count < 1:
            return
        for i, w in enumerate(self._teacher().get_weights()):
            if count == 1 or not np.issubdtype(w.dtype, np.floating):
                mean = w
            else:
                mean = state.get(f"avg:w:{i}")
                mean += (w - mean) / count
            state.set(f"avg:w:{i}", mean)

    def _averaged_with(self, masks):
        """True if the running mean is taken under these masks."""
        return all(
            np.array_equal(self._state.get(f"avg:mask:{i}"), masks[layer.name])
            for i, layer in enumerate(self._layers)
        )

    def _teacher_from_state(self, prefix):
        """Set the teacher's weights to those kept under `prefix:i`."""
        teacher = self._teacher()
        teacher.set_weights([
            self._state.get(f"{prefix}:{i}") for i in range(len(teacher.weights))
        ])

    def _average_count(self):
        """Epochs in the running mean if it may replace the teacher (enough
        of them, under the current masks), else 0."""
        count = int(self._state.get("avg:seen", 0)) - AVERAGE_BURN_IN
        if not self.average or count < MIN_AVERAGED_EPOCHS:
            return 0
        if not self._averaged_with(self._current_masks()):
            return 0
        return count

    # ---------------------------------------------------------- the finish
    def _finish(self):
        """The teacher training ends with: the last epoch's, the mean of its
        weights (`average`) or the best epoch's within the budget
        (`Adaptive(restore_best=True)`), whichever validates best; then,
        with `Adaptive`, a prune to the budget if it is still not met.

        With validation data (a DKDPModel's `fit` hands its own over, a
        plain model's comes from `validation_data=`), the last epoch and the
        mean are evaluated on it, so a mean that validates worse than what
        it would replace does not replace it (a mean over epochs whose
        BatchNormalization statistics were still settling can be far
        worse). Without validation data, a model without BatchNormalization
        takes the mean unchecked, one with it keeps its last epoch."""
        adaptive = isinstance(self.threshold, Adaptive)
        policy = self.threshold if adaptive else None
        within = self._budget_met() if adaptive else True
        monitor = policy.monitor if adaptive else None
        higher = policy.higher_is_better if adaptive else True
        data = self._validation_data()
        values, notes = {}, []
        if data is not None:
            monitor, higher, last = self._validate(data, monitor)
        else:
            last = policy.last_value if adaptive else None
        if within:
            values["last"] = last
        best = self._state.get("best:value") if adaptive else None
        if best is not None and policy.restore_best:
            values["best"] = float(best)
        count = self._average_count() if within else 0
        if count:
            if data is not None:
                saved = self._teacher().get_weights()
                self._teacher_from_state("avg:w")
                values["average"] = self._validate(data, monitor)[2]
                self._teacher().set_weights(saved)
            elif self._has_batchnorm():
                notes.append(
                    "the mean of its weights was not taken: without "
                    "validation data it cannot be checked, and averaged "
                    "BatchNormalization statistics can be far off"
                )
            else:
                values["average"] = None  # unchecked
        kept = self._choose(values, higher)
        self.final = {"kept": kept, "monitor": monitor, "values": values,
                      "averaged_epochs": count if kept == "average" else 0}
        if kept == "average":
            self._teacher_from_state("avg:w")
            self.averaged_epochs = count
        elif kept == "best":
            self._teacher_from_state("best:w")
            policy.last_value = values["best"]
        elif kept == "last" and adaptive and values.get("last") is not None:
            policy.last_value = values["last"]
        self._report_finish(kept, count, monitor, values, notes)
        if adaptive:
            self._meet_budget_after_training()

    @staticmethod
    def _choose(values, higher):
        """The key of `values` to keep: an unchecked mean (value None) if
        there is one, else the best value; ties go to the mean, then to the
        last epoch (no change)."""
        if "average" in values and values["average"] is None:
            return "average"
        order = [k for k in ("average", "last", "best")
                 if k in values and values[k] is not None]
        if not order:
            return "last" if "last" in values else None
        sign = 1.0 if higher else -1.0
        return max(order, key=lambda k: (sign * values[k], -order.index(k)))

    def _report_finish(self, kept, count, monitor, values, notes):
        if not self.verbose:
            return
        def show(key):
            value = values.get(key)
            return "" if value is None else f" ({monitor} {value:.4f})"
        what = {
            "average": f"the mean of its weights over the last {count} epochs "
                       "(trained with its final masks)",
            "best": "the weights of the best epoch within the budget",
            "last": "the weights of the last epoch",
        }
        if kept is None:
            return
        others = [f"{what[k].split(' (')[0]}{show(k)}" for k in values if k != kept]
        line = f"DKDP: the teacher ends with {what[kept]}{show(kept)}"
        if others:
            line += " (also considered: " + "; ".join(others) + ")"
        if notes:
            line += "; " + "; ".join(notes)
        print(line + ".", flush=True)

    def _validation_data(self):
        data = self.validation_data
        if data is not None:
            return {"x": data[0], "y": data[1], "batch_size": None, "steps": None}
        return getattr(self.model, "_fit_validation", None)

    def _validate(self, data, monitor):
        """(monitor, higher is better, value) of the teacher as it is now,
        evaluated on `data`. `monitor` None: accuracy if the model tracks
        it, else the loss."""
        results = self.model.evaluate(
            data["x"], data["y"], batch_size=data.get("batch_size"),
            steps=data.get("steps"), verbose=0, return_dict=True,
        )
        def lookup(name):  # as the epoch logs read it (_monitor_value)
            key = name[len("val_"):] if name.startswith("val_") else name
            for candidate in (key, "teacher_" + key):
                if candidate in results:
                    return float(ops.convert_to_numpy(results[candidate]))
            return None
        if monitor is None:
            for name, higher in (("val_accuracy", True), ("val_loss", False)):
                value = lookup(name)
                if value is not None:
                    return name, higher, value
            return None, True, None
        higher = self.threshold.higher_is_better if isinstance(
            self.threshold, Adaptive) else "loss" not in monitor
        return monitor, higher, lookup(monitor)

    def _has_batchnorm(self):
        return any(isinstance(layer, keras.layers.BatchNormalization)
                   for layer in iter_layers(self._teacher()))

    def _meet_budget_after_training(self):
        """`Adaptive`: prune to the budget if the teacher training ended
        with is not within it, and say honestly where that left it."""
        policy = self.threshold
        if not self._budget_met():
            scores = self._scores()
            if scores is not None:
                self._prune(self._sparsity_for_budget(scores), scores,
                            fill=policy.fill_budget)
            usage = self.threshold.budget.usage(self._teacher())
            if max(usage.values()) <= 1.0:
                warnings.warn(
                    "Adaptive: the budget was not met during training, so the "
                    "teacher was pruned to it after the last epoch with no "
                    "training to recover: evaluate it, or train longer "
                    "(Adaptive(finish_by=...)).",
                    stacklevel=3,
                )
            else:
                warnings.warn(
                    "Adaptive: the budget is NOT met: the teacher uses "
                    + ", ".join(f"{k} {v:.3g}x" for k, v in usage.items())
                    + " of its limits after the strongest pruning the floors "
                    "allow. Loosen the budget or lower the floors.",
                    stacklevel=3,
                )
                return
        fall = policy.final_fall()
        if fall is not None and fall > policy.tolerance:
            warnings.warn(
                f"Adaptive: the budget is met, but {policy.monitor} ended "
                f"{fall:.4f} below its best before pruning "
                f"({policy.reference:.4f}), more than the tolerance "
                f"{policy.tolerance}. Train longer, loosen the budget or "
                "raise the tolerance.",
                stacklevel=3,
            )

    # -------------------------------------------------------------- scoring
    def _check_weights(self):
        for layer in self._layers:
            kernel = ops.convert_to_numpy(layer.kernel)
            if not np.all(np.isfinite(kernel)):
                self._fail(
                    f"The kernel of layer '{layer.name}' holds NaN or Inf "
                    f"after step {self._step()}: training diverged."
                )

    def _scores(self):
        self._check_weights()
        teacher = self._teacher()
        if self.calibration_data is not None and not self._is_dkdp() and (
            "gradient" in (getattr(self.importance, "requires", None) or ("gradient",))
        ):
            for layer in self._layers:
                layer.reset_statistics()
            x, y = self.calibration_data
            importance_lib.collect_gradients(teacher, x, y, self.model.loss)
        self.importance.prepare(teacher)
        scores = [
            self.importance.score(layer, self.granularity) for layer in self._layers
        ]
        arrays = [np.asarray(ops.convert_to_numpy(s)) for s in scores]
        bad = [l.name for l, a in zip(self._layers, arrays) if not np.all(np.isfinite(a))]
        if bad:
            warnings.warn(
                f"DKDPCallback: importance scores of {', '.join(bad)} contain "
                "NaN or Inf; this pruning event is skipped and the masks are "
                "unchanged.",
                stacklevel=2,
            )
            return None
        return arrays

    def _layer_weights(self):
        if not self.layer_importance:
            return None
        values = np.array([
            float(ops.convert_to_numpy(self.importance.score(l, "layer")))
            for l in self._layers
        ])
        mean = values.mean()
        if not np.all(np.isfinite(values)) or mean <= 0:
            return None
        return {l.name: v / mean for l, v in zip(self._layers, values)}

    def _masks_for(self, sparsity, scores):
        # One pool per scoring: an event's bisection cuts the same scores,
        # sorted once, at each sparsity it tries.
        cached = getattr(self, "_pool", None)
        if cached is None or cached[0] is not scores:
            pool = MaskPool(
                self._layers, scores, granularity=self.granularity,
                scope=self.scope, normalize=self.normalize, floors=self.floors,
                protect_units=self._protect,
                layer_weights=self._layer_weights(),
                unit_multiple=self.unit_multiple,
            )
            cached = self._pool = (scores, pool)
        return cached[1].masks(sparsity)

    def _current_masks(self):
        return {l.name: ops.convert_to_numpy(l.kernel_mask).copy() for l in self._layers}

    def _assign(self, masks, batchnorm=True):
        for layer in self._layers:
            if batchnorm:  # read before the mask changes
                was_dead = ops.convert_to_numpy(layer.unit_mask()) == 0
            layer.kernel_mask.assign(masks[layer.name])
            if batchnorm:
                self._sync_batchnorm(layer, masks[layer.name], was_dead)

    def _sync_batchnorm(self, layer, mask, was_dead):
        """Keep the BatchNormalization after a layer in step with its units.

        A removed unit feeds exact zeros to it: a MaskedBatchNormalization's
        channel mask then zeroes its output as well. For a plain one, in
        training the batch mean and variance are 0 and it outputs beta;
        setting its moving mean and variance to 0 makes inference output
        the same beta, instead of a constant from before pruning. A unit
        that comes back (a back-off) gets its saved statistics."""
        bn = self._batchnorms.get(layer.name)
        if bn is None:
            return
        dead = mask.reshape(-1, layer.num_units).max(axis=0) == 0
        saved = self._bn_saved.setdefault(layer.name, {})
        for key, var in (("mean", bn.moving_mean), ("var", bn.moving_variance)):
            values = ops.convert_to_numpy(var).copy()
            store = saved.setdefault(key, np.zeros_like(values))
            newly_dead, revived = dead & ~was_dead, ~dead & was_dead
            store[newly_dead] = values[newly_dead]
            values[revived] = store[revived]
            values[dead] = 0.0
            var.assign(values)
        if hasattr(bn, "channel_mask"):
            bn.channel_mask.assign((~dead).astype("float32"))

    # -------------------------------------------------------------- pruning
    def _prune(self, sparsity, scores=None, fill=False):
        """One pruning event to `sparsity`; returns the result or None.
        With `fill`, pruned units come back while the budget holds
        (`MaskPool.fill`)."""
        scores = self._scores() if scores is None else scores
        if scores is None:
            return None
        before = self._sparsity()
        result = self._masks_for(sparsity, scores)
        if fill:
            result = self._pool[1].fill(result, self._fits_budget)
        self._assign(result.masks)
        self._keep_decision(scores, result)
        self._after_masks_changed(before, result)
        return result

    def _keep_decision(self, scores, result):
        """What this event decided from, for a report to show: the
        criterion's scores at the event's granularity (before the
        normalisation that makes one τ fit all layers) and the masks they
        gave. Kept in the checkpointed state while the run goes on."""
        self.last_decision = {
            "step": self._step(),
            "criterion": type(self.importance).__name__,
            "granularity": self.granularity,
            "scores": {l.name: np.asarray(a) for l, a in zip(self._layers, scores)},
            "masks": {name: np.asarray(m) for name, m in result.masks.items()},
        }
        for i, (layer, values) in enumerate(zip(self._layers, scores)):
            self._state.set(f"decision:scores:{i}", np.asarray(values, "float32"))
        self._state.set("decision:step", np.int64(self.last_decision["step"]))

    def _decision_from_state(self):
        if "decision:step" not in self._state:
            return None
        scores = {l.name: self._state.get(f"decision:scores:{i}")
                  for i, l in enumerate(self._layers)}
        if any(v is None for v in scores.values()):
            return None
        # The masks the decision gave: those of the event, read back from
        # the layers when it was the last change (else unknown).
        return {"step": int(self._state.get("decision:step")),
                "criterion": type(self.importance).__name__,
                "granularity": self.granularity, "scores": scores,
                "masks": None}

    def _after_masks_changed(self, before, result):
        self._stale = True
        self.tau = (
            float(np.mean(list(result.tau.values())))
            if isinstance(result.tau, dict) else float(result.tau or 0.0)
        )
        self.events += 1
        teacher = self._teacher()
        record = {
            "step": self._step(),
            "tau": self.tau,
            "sparsity": result.sparsity,
            "kept_params": deployed_counts(teacher)[0],
            "before": before,
        }
        self.history.append(record)
        if self.verbose:
            print(
                f"\nDKDP step {record['step']}: sparsity {before:.3f} -> "
                f"{result.sparsity:.3f} (tau={self.tau:.4g}), kept params "
                f"{record['kept_params']:,} of {self._dense_params:,}",
                flush=True,
            )
        self._summaries(result)
        self._maybe_refresh_student(record["kept_params"])

    def _sparsity(self):
        zeros = total = 0
        for layer in self._layers:
            mask = ops.convert_to_numpy(layer.kernel_mask)
            zeros += mask.size - int(np.count_nonzero(mask))
            total += mask.size
        return zeros / total

    def _maybe_refresh_student(self, kept_params):
        refresh = self.student_refresh
        if refresh is None or not self._is_dkdp():
            return
        due = (refresh.every is not None and self.events % refresh.every == 0) or (
            refresh.shrink is not None
            and kept_params * refresh.shrink <= self._refresh_params
        )
        if due:
            self.model.refresh_student(refresh.strategy)
            self._refresh_params = kept_params
            if self.verbose:
                print(f"DKDP: student rebuilt ({refresh.strategy!r}).", flush=True)

    # ------------------------------------------------------------- adaptive
    def _measure_with(self, masks, budget=None):
        """Budget usage of the teacher if it had `masks` (restored after)."""
        saved = self._current_masks()
        teacher = self._teacher()
        self._assign(masks, batchnorm=False)
        sync_batchnorm(teacher)  # channel masks follow, so compaction sees it
        try:
            return (budget or self.threshold.budget).usage(teacher)
        finally:
            self._assign(saved, batchnorm=False)
            sync_batchnorm(teacher)

    def _fits_budget(self, masks):
        return max(self._measure_with(masks).values()) <= 1.0

    def _sparsity_for_budget(self, scores):
        """The smallest target sparsity whose masks meet the budget.

        A bracketing secant search (regula falsi, Illinois variant) on
        g(s) = largest usage − 1 between the current sparsity and 0.999:
        usage falls almost linearly with sparsity at weight granularity, so
        a handful of measurements land within 0.1% of the budget, where
        bisection took eleven (each one assigns masks and counts the
        deployed model). The Illinois rule (halve the value kept at an end
        that stays twice) keeps both ends moving where usage is
        step-shaped, at unit granularity; the search stops at 1/1024 of the
        first bracket, as ten bisection rounds did, or after twenty
        measurements, always at a sparsity that meets the budget.
        """
        def excess(sparsity):
            usage = self._measure_with(self._masks_for(sparsity, scores).masks)
            return max(usage.values()) - 1.0

        lo, hi = self._sparsity(), 0.999
        g_lo = excess(lo)
        if g_lo <= 0:
            return lo
        g_hi = excess(hi)
        if g_hi > 0:
            return hi  # even 0.999 does not fit: the closest there is
        resolution = (hi - lo) / 1024
        side = 0
        for _ in range(20):
            width = hi - lo
            if width <= resolution or g_hi >= -1e-3:
                break
            mid = hi - g_hi * width / (g_hi - g_lo)
            if not lo < mid < hi:
                mid = (lo + hi) / 2
            g = excess(mid)
            if g <= 0:
                hi, g_hi = mid, g
                if side == 1:
                    g_lo /= 2
                side = 1
            else:
                lo, g_lo = mid, g
                if side == -1:
                    g_hi /= 2
                side = -1
        return hi

    def _monitor_value(self, logs):
        policy = self.threshold
        name = policy.monitor
        if name not in logs and self._is_dkdp() and name.startswith("val_"):
            alias = "val_teacher_" + name[len("val_"):]
            if alias in logs:
                name = alias
        if name not in logs:
            raise ValueError(
                f"Adaptive watches {policy.monitor!r}, which the epoch logs do "
                f"not have (they have {sorted(logs)}): pass validation_data "
                "(or validation_split) to fit, or set Adaptive(monitor=...)."
            )
        value = float(ops.convert_to_numpy(logs[name]))
        if not math.isfinite(value):
            self._fail(f"Adaptive's metric {name} is {value} at this epoch's end.")
        return value

    def _adaptive_event(self, epoch, logs):
        policy = self.threshold
        value = self._monitor_value(logs)
        # Measured once: the masks do not change before the checks below.
        met = self._budget_met()
        self._remember_if_best(value, met)
        action = policy.observe(epoch, value)
        if action == "backoff":
            self._assign(policy.last_good_masks)
            self._stale = True
            if self.verbose:
                print(
                    f"\nDKDP epoch {epoch + 1}: {policy.monitor} fell to "
                    f"{value:.4f} (best before pruning {policy.reference:.4f}, "
                    f"tolerance {policy.tolerance}); restored the previous "
                    f"masks, next step {policy.step:.3f}.",
                    flush=True,
                )
            return
        if action == "keep_good":
            policy.last_good_masks = self._current_masks()
        if action != "keep_good":
            return
        if met:
            return
        scores = self._scores()
        if scores is None:
            return
        required = self._sparsity_for_budget(scores)
        target = policy.next_sparsity(epoch, self._sparsity(), required)
        if policy.last_good_masks is None:
            policy.last_good_masks = self._current_masks()
        self._prune(target, scores, fill=policy.fill_budget and target >= required)

    def _budget_met(self):
        return self.threshold.budget.is_met(self._teacher())

    def _remember_if_best(self, value, met):
        """Keep the teacher's weights (masks included) of the best epoch that
        ended within the budget, in the checkpointed state."""
        policy = self.threshold
        if not policy.restore_best or not met:
            return
        best = self._state.get("best:value")
        better = best is None or (
            value > float(best) if policy.higher_is_better else value < float(best)
        )
        if better:
            self._state.set("best:value", np.float64(value))
            for i, w in enumerate(self._teacher().get_weights()):
                self._state.set(f"best:w:{i}", w)

    # ------------------------------------------------------------- logging
    def _add_logs(self, logs):
        teacher = self._teacher()
        # As exported: removed units gone.
        counts = deployed_counts(teacher)
        logs["kept_params"], logs["kept_macs"] = counts
        logs["tau"] = self.tau
        logs["sparsity"] = self._sparsity()
        if isinstance(self.threshold, Adaptive):
            usage = self.threshold.budget.usage(teacher, counts=counts)
            logs["budget_usage"] = max(usage.values())

    def _summaries(self, result):
        if self._writer is None:
            return
        import tensorflow as tf

        step = self._step()
        with self._writer.as_default(step=step):
            tf.summary.scalar("dkdp/tau", self.tau)
            tf.summary.scalar("dkdp/sparsity", result.sparsity)
            for layer in self._layers:
                mask = result.masks[layer.name]
                tf.summary.scalar(
                    f"dkdp_layer_sparsity/{layer.name}", float((mask == 0).mean())
                )
                try:
                    scores = self.importance.score(layer, self.granularity)
                    tf.summary.histogram(f"dkdp_importance/{layer.name}", scores)
                except ValueError:
                    pass
