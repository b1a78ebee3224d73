"""DKDPCallback: prune, distil and refine inside `model.fit`.

The orchestrator: it checks what can be checked before training, asks the
threshold policy when and how much to prune, lets the `Pruner` write the
masks, `refinement` decide what training ends with, the `StudentRefresh`
rule when the student is rebuilt, and keeps all of it in the model's
checkpointed `PruningState`.
"""

import warnings

import keras
import numpy as np
from keras import ops

from dkdp_keras import _checks, _validation
from dkdp_keras import importance as importance_lib
from dkdp_keras import refinement, report
from dkdp_keras.budget import count_params
from dkdp_keras.compaction import ALIGN
from dkdp_keras.distillation import StudentRefresh
from dkdp_keras.graph import output_unit_layers
from dkdp_keras.guard import NonFiniteGuard
from dkdp_keras.model import DKDPModel
from dkdp_keras.pruner import HISTORY, Pruner, count_logs, kept_counts
from dkdp_keras.state import load_random_state, pruning_state, save_random_state
from dkdp_keras.thresholds.adaptive import (
    Adaptive,
    check_reachable,
    epoch_end,
    sparsity_for_budget,
)
from dkdp_keras.thresholds.mechanism import NORMALIZE, Floors
from dkdp_keras.thresholds.schedules import PolynomialDecay, SparsityPolicy

__all__ = ["DKDPCallback", "HISTORY", "StudentRefresh"]


def _examples_pair(name, data):
    """`data` checked as None or an `(x, y)` pair of matching examples."""
    if data is None:
        return None
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError(f"{name} must be a pair (x, y), got {type(data).__name__}.")
    x, y = data
    return _validation.examples(f"{name} x", x, y=y), y


def _pruner(callback, teacher, layers):
    """The `Pruner` of `callback`'s settings for `teacher`'s masked `layers`."""
    calibration = None
    if callback.calibration_data is not None and not callback._is_dkdp():
        calibration = (*callback.calibration_data, callback.model.loss)
    adaptive = isinstance(callback.threshold, Adaptive)
    return Pruner(
        teacher, layers, callback.importance, granularity=callback.granularity,
        scope=callback.scope, normalize=callback.normalize, floors=callback.floors,
        protect_units=output_unit_layers(teacher) if callback.granularity == "unit" else set(),
        layer_importance=callback.layer_importance, unit_multiple=callback.unit_multiple,
        calibration=calibration, warn_shortfall=not adaptive,
        budget=callback.threshold.budget if callback.resource_aware else None)


class DKDPCallback(keras.callbacks.Callback):
    """Prunes the teacher during `fit` (a DKDPModel's, or a plain model made
    with `dkdp_keras.prunable`): at each event the criterion scores the
    masked layers, the policy gives the target sparsity (a schedule, or
    `Adaptive` from the budget and the monitored metric), and the `Pruner`
    finds τ and writes the masks; `refinement` decides what training ends
    with. Masked weights keep their values, so a back-off can restore them.

    Its state is in the model's `PruningState`, which `BackupAndRestore`
    and `ModelCheckpoint` save: a resumed run ends as the uninterrupted one
    would. List it *before* `BackupAndRestore` (in the other order an
    `Adaptive` decision of the interrupted epoch is lost, with a warning).

    Adds to the epoch logs: `tau`, `sparsity` (of the masks), `kept_params`
    and `kept_macs` (of the teacher as compacted) and, with a budget,
    `budget_usage` (the largest measure/limit ratio; <= 1 is within it).
    A subclassed model with masked layers is weight-pruned by a schedule
    (no graph to count MACs, units or budgets by: no `kept_macs`).

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
        resource_aware: at "unit" granularity under an `Adaptive` budget,
            rank units by score per share of the budget each takes
            (`Pruner.unit_prices`). Off by default: it helped reference_cnn
            under a MACs budget and hurt MobileNetV2 (README).
        unit_multiple: at "unit" granularity, layers of at least
            4 × `unit_multiple` units keep a multiple of it (`ALIGN`, 16, as
            `compact`); 1 turns it off (pair it with `compact(align=1)`).
        student_refresh: a `StudentRefresh`, or an int k for
            `StudentRefresh(every=k)`.
        calibration_data: `(x, y)` used to collect gradients for gradient
            criteria when the model is a plain Keras model (a DKDPModel
            collects them during training).
        log_dir: write TensorBoard summaries here (τ, sparsity per layer,
            importance histograms).
        average: if True (default), training may end with the teacher's
            weights averaged over the epoch ends since its masks last
            changed, the first one after the change left out (still
            recovering), when at least two are left
            (`refinement.WeightAverage`); it is kept when it validates at
            least as well as the last epoch and `Adaptive`'s best epoch.
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
                 layer_importance=False, resource_aware=False, unit_multiple=ALIGN,
                 student_refresh=None, calibration_data=None, log_dir=None, average=True,
                 validation_data=None, batchnorm_momentum="auto", verbose=1):
        super().__init__()
        self.importance = importance_lib.get(importance)
        self.granularity = _validation.choice("granularity", granularity, ("weight", "unit"))
        self.threshold = _validation.instance(
            "threshold", threshold, SparsityPolicy, "a dkdp_keras.thresholds "
            "policy (ConstantSparsity, PolynomialDecay, Adaptive)")
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
        self.floors = _validation.instance(
            "floors", floors, Floors, "a dkdp_keras.thresholds.Floors") or Floors()
        self.layer_importance = _validation.boolean("layer_importance", layer_importance)
        self.resource_aware = _checks.resource_aware(resource_aware, granularity, threshold)
        self.unit_multiple = _validation.number("unit_multiple", unit_multiple, low=1,
                                                integer=True)
        self.student_refresh = StudentRefresh.get(student_refresh)
        self.calibration_data = _examples_pair("calibration_data", calibration_data)
        self.log_dir = _checks.log_dir(log_dir)
        self.average = _validation.boolean("average", average)
        self.averaged_epochs = 0
        self.validation_data = _examples_pair("validation_data", validation_data)
        if batchnorm_momentum is not None:
            _validation.choice("batchnorm_momentum", batchnorm_momentum, ("auto",))
        self.batchnorm_momentum = batchnorm_momentum
        self.final = None  # what training ended with (`_finish`)
        self.verbose = _validation.number("verbose", verbose, low=0, integer=True)
        self._pruner = self._writer = self._state = None
        self._run_started, self._epochs_done = False, 0

    # ------------------------------------------------------------ plumbing
    tau = property(lambda self: self._pruner.tau if self._pruner else 0.0)
    events = property(lambda self: self._pruner.events if self._pruner else 0)
    history = property(lambda self: self._pruner.history if self._pruner else [])
    last_decision = property(lambda self: self._pruner and self._pruner.last_decision)

    def _teacher(self):
        return getattr(self.model, "teacher", self.model)

    def _is_dkdp(self):
        return isinstance(self.model, DKDPModel)

    def _step(self):
        return int(ops.convert_to_numpy(self.model.optimizer.iterations))

    def set_model(self, model):
        super().set_model(model)
        # Now, when fit builds its callback list: before any callback's
        # on_train_begin, where BackupAndRestore loads the checkpoint into it.
        self._state = pruning_state(model)

    def _wire(self, model, fitting=True):
        """The parts for `model`, checked as far as they can be before
        training (`_checks.before_training`; the monitor only in fit)."""
        self.set_model(model)
        teacher = self._teacher()
        layers = _checks.before_training(self, teacher)
        self._pruner = _pruner(self, teacher, layers)
        self._average = refinement.WeightAverage(self._state, layers)
        self._best = refinement.BestEpoch(self._state)
        if isinstance(self.threshold, Adaptive):
            if fitting and self._is_dkdp():
                self.threshold.check_monitor(
                    {m.name for m in self.model.metrics},
                    getattr(self.model, "_fit_validation", None) is not None)
            self.threshold.budget.check_feasible(teacher)
            check_reachable(self.threshold.budget, self._pruner)
        return teacher, layers

    def check_budget(self, model):
        """Raise `ValueError` if this callback's `Adaptive` budget cannot be
        met by its pruning of `model`, as `fit` would at its start."""
        if isinstance(self.threshold, Adaptive):
            self._wire(model, fitting=False)

    def on_train_begin(self, logs=None):
        _checks.one_callback_per_fit(self)
        teacher, layers = self._wire(self.model)
        self._layers = layers
        self._run_started = False
        self._guard = NonFiniteGuard(self.model, restores=not self._is_dkdp())
        self._epochs = self.params.get("epochs") or 1
        self._epoch_start_step = self._step()
        if self._default_threshold:  # built per fit, from its own length
            self.threshold = self._default_schedule(self.params.get("steps"))
        self._dense_params = count_params(teacher, nonzero=False)
        self._refresh_params = kept_counts(teacher)[0]
        if isinstance(self.threshold, Adaptive):
            self.threshold.start(teacher, self._epochs)
        self._momenta = []
        if self.batchnorm_momentum == "auto":
            self._momenta = refinement.settle_batchnorm(
                self.model, self.params.get("steps"), self.verbose)
        if self.log_dir and self._writer is None:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(str(self.log_dir))

    def _default_schedule(self, steps):
        """`PolynomialDecay(0, 0.8)` from `begin` to 70% of this fit's steps;
        None while the steps per epoch are unknown (data of unknown length):
        then built at the first epoch end from the steps it took."""
        if not steps:
            return None
        total = self._epochs * int(steps)
        return PolynomialDecay(0.0, 0.8, self.begin, max(self.begin + 1, int(0.7 * total)))

    # ---------------------------------------------------------------- state
    def on_epoch_begin(self, epoch, logs=None):
        # The first epoch of this fit: every on_train_begin has run, so a
        # checkpoint, if one was restored, is in the model's state now.
        if not self._run_started:
            self._run_started = True
            self._begin_run(epoch)
        self._pruner.reset_stale_statistics()
        self._epoch_start_step = self._step()

    def _begin_run(self, epoch):
        saved = self._state.get("epoch")
        saved = None if saved is None else int(saved)
        if epoch > 0 and saved in (epoch, epoch - 1):
            self._restore_state()
            if saved == epoch - 1:
                # The checkpoint was written before this callback's end of
                # epoch `epoch - 1` (BackupAndRestore listed before it).
                self._replay_epoch_end(epoch - 1)
        else:  # a new run forgets an old best, mean and decision
            self._pruner.reset()
            self._refresh_params = kept_counts(self._teacher())[0]
            self._best.drop()
            self._average.drop()
            Pruner.drop(self._state)
            self._save_state(epoch)
        self._guard.keep(self._step())

    def _replay_epoch_end(self, epoch):
        step = self._step()
        if isinstance(self.threshold, Adaptive):
            warnings.warn(
                "DKDPCallback: the checkpoint this run resumed from was written "
                f"before the Adaptive decision at the end of epoch {epoch + 1}, "
                "which is lost; the controller continues from the epoch before. "
                "List DKDPCallback before BackupAndRestore in callbacks.",
                stacklevel=2,
            )
        elif self.frequency == "epoch" and self.threshold is not None and self._in_window(step):
            self._prune(self.threshold.sparsity_at(step))
        if self.average:
            self._average.accumulate(self._teacher(), self._pruner.current_masks())
        self._save_state(epoch + 1)

    def _save_state(self, epochs_done):
        """Write what the next decisions depend on into the model's state."""
        self._epochs_done = epochs_done
        self._state.set("epoch", np.int64(epochs_done))
        self._state.set("refresh_params", np.int64(self._refresh_params))
        save_random_state(self._state, self.model)
        self._pruner.save(self._state)
        if isinstance(self.threshold, Adaptive):
            self.threshold.save(self._state, self._layers)

    def _restore_state(self):
        """Read back what `_save_state` wrote (a resumed run)."""
        state = self._state
        self._epochs_done = int(state.get("epoch"))
        self._refresh_params = int(state.get("refresh_params", self._refresh_params))
        load_random_state(state, self.model)
        self._pruner.load(state)
        if isinstance(self.threshold, Adaptive):
            self.threshold.load(state, self._layers)

    # --------------------------------------------------------------- events
    def _in_window(self, step):
        return step >= self.begin and (self.end is None or step <= self.end)

    def on_train_batch_end(self, batch, logs=None):
        # Only step-scheduled pruning acts here; reading the loss every step
        # would force a device sync per step, so divergence is caught at
        # each pruning event (weights) and each epoch end (loss) instead.
        if self.frequency == "epoch" or self.threshold is None or isinstance(
                self.threshold, Adaptive):
            return
        step = self._step()
        if step % self.frequency == 0 and self._in_window(step):
            self._check_loss(logs)
            if self._prune(self.threshold.sparsity_at(step)) is not None:
                self._pruner.reset_stale_statistics()
                self._save_state(self._epochs_done)
                self._guard.keep(step)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        self._check_loss(logs)
        self._check_weights()
        step = self._step()
        trained = step > self._epoch_start_step
        if not trained:
            _no_step_trained(epoch, logs, self.verbose)
        elif self.threshold is None:  # the default schedule, length now known
            self.threshold = self._default_schedule(step - self._epoch_start_step)
        if trained and isinstance(self.threshold, Adaptive):
            if self._in_window(step):
                epoch_end(self.threshold, self, epoch, logs)
        elif trained and self.frequency == "epoch" and self._in_window(step):
            self._prune(self.threshold.sparsity_at(step))
        if self.average:
            self._average.accumulate(self._teacher(), self._pruner.current_masks())
        self._save_state(epoch + 1)
        self._guard.keep(step)
        self._add_logs(logs)

    def on_train_end(self, logs=None):
        refinement.restore_batchnorm(getattr(self, "_momenta", []))
        self._momenta = []
        if not self._run_started and not self._resume_after_last_epoch():
            return
        self.averaged_epochs = 0
        refinement.finish(self)
        self._pruner.reset_stale_statistics()  # the prune to the budget read them
        # What only a run in progress needs would be dead weight in a file
        # saved after fit; checkpoints written during the run keep it.
        self._average.drop()
        self._best.drop()
        Pruner.drop(self._state)
        if isinstance(self.threshold, Adaptive):
            self.threshold.drop(self._state)
        if self._writer is not None:
            self._writer.flush()

    def _resume_after_last_epoch(self):
        """A fit resumed after its last epoch runs no epoch: the state is
        read back here, so that training ends as the uninterrupted run did."""
        saved = self._state.get("epoch")
        if saved is None or int(saved) == 0:
            return False
        self._run_started = True
        self._begin_run(int(saved))
        return True

    # ------------------------------------------------------------- pruning
    def _check_loss(self, logs):
        self._guard.check_loss(logs, self._step())

    def _check_weights(self):
        self._guard.check_kernels(self._pruner.nonfinite_layer(), self._step())

    def _scores(self):
        self._check_weights()
        return self._pruner.scores()

    def _masks_for(self, sparsity, scores):
        return self._pruner.masks_for(sparsity, scores)

    def _prune(self, sparsity, scores=None, fill=False):
        """One pruning event to `sparsity`; returns the result or None. With
        `fill`, pruned units come back while the budget holds."""
        scores = self._scores() if scores is None else scores
        if scores is None:
            return None
        result, record = self._pruner.prune(
            sparsity, scores, self._step(), fits=self._fits_budget if fill else None)
        if self.verbose:
            print(f"\nDKDP step {record['step']}: sparsity {record['before']:.3f} -> "
                  f"{result.sparsity:.3f} (tau={record['tau']:.4g}), kept params "
                  f"{record['kept_params']:,} of {self._dense_params:,}", flush=True)
        if self._writer is not None:
            report.write_summaries(self._writer, self._step(), self.tau, result,
                                   self._layers, self.importance, self.granularity)
        refresh = self.student_refresh
        if refresh is not None and self._is_dkdp() and refresh.due(
                self.events, record["kept_params"], self._refresh_params):
            self.model.refresh_student(refresh.strategy)
            self._refresh_params = record["kept_params"]
            if self.verbose:
                print(f"DKDP: student rebuilt ({refresh.strategy!r}).", flush=True)
        return result

    # ------------------------------------------------------------- adaptive
    def _measure_with(self, masks):
        """Budget usage of the teacher if it had `masks` (nothing assigned)."""
        return self._pruner.usage_with(masks, self.threshold.budget)

    def _fits_budget(self, masks):
        return max(self._measure_with(masks).values()) <= 1.0

    def _sparsity_for_budget(self, scores):
        """The smallest sparsity whose masks meet the budget."""
        return sparsity_for_budget(
            lambda s: max(self._measure_with(self._masks_for(s, scores).masks).values()) - 1.0,
            self._pruner.sparsity())

    def _budget_met(self):
        return self.threshold.budget.is_met(self._teacher())

    # ------------------------------------------------------------- logging
    def _add_logs(self, logs):
        teacher = self._teacher()
        counts = kept_counts(teacher)  # as exported: removed units gone
        logs.update(count_logs(counts))
        logs["tau"] = self.tau
        logs["sparsity"] = self._pruner.sparsity()
        if isinstance(self.threshold, Adaptive):
            usage = self.threshold.budget.usage(teacher, counts=counts)
            logs["budget_usage"] = max(usage.values())



def _no_step_trained(epoch, logs, verbose):
    """An epoch whose every step was skipped (`DKDPModel(on_nonfinite=
    "skip")` and NaN/Inf in every batch): its training logs are means of no
    step, so they read NaN, not 0; no pruning decision is made."""
    for key in list(logs):
        if not key.startswith("val_") and key != "skipped_steps":
            logs[key] = float("nan")
    warnings.warn(
        f"DKDPCallback: epoch {epoch + 1} applied no training step: the losses "
        "or gradients of every step were NaN or Inf, and "
        "DKDPModel(on_nonfinite='skip') skipped them all. Nothing was pruned at "
        "its end. Check the data for NaN/Inf, lower the learning rate or clip "
        "gradients (optimizer clipnorm=1.0).",
        stacklevel=3,
    )
    if verbose:
        print(f"\nDKDP epoch {epoch + 1}: every training step was skipped "
              "(NaN/Inf); no pruning decision.", flush=True)
