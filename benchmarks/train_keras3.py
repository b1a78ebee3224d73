"""The Keras 3 systems of the protocol: `dense`, `kd` (keras.distillation)
and `dkdp` (this project with its defaults).

Run by `benchmarks/run.py`, one process per system. Reads the protocol's
data from the run's `data.npz`, writes into WORK_DIR/<model>/ one `.tflite`,
one `.json` (Keras-side figures: test accuracy, parameters, MACs, training
seconds) and the `.keras` model per exported model. A model whose `.json`
exists is skipped, and every epoch of one in training is backed up in
WORK_DIR/<model>/backup/<stem>, so an interrupted run continues after its
last completed epoch, to the model it would have made uninterrupted.

    python benchmarks/train_keras3.py WORK_DIR dense --model reference_cnn
    python benchmarks/train_keras3.py WORK_DIR kd --model reference_cnn
    python benchmarks/train_keras3.py WORK_DIR dkdp --model reference_cnn \
        --targets 0.5 0.8 0.9 0.95
"""

import argparse
import json
import os
import pathlib
import shutil
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import dkdp_keras as dkdp  # noqa: E402
import protocol  # noqa: E402
from protocol import write_json  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class TrainTimer(keras.callbacks.Callback):
    """Listed last: seconds from its creation to the end of training, after
    every other callback's `on_train_end` (DKDP's final averaging)."""

    def __init__(self):
        super().__init__()
        self.start = time.perf_counter()

    def on_train_end(self, logs=None):
        self.seconds = time.perf_counter() - self.start


def completed(backup):
    """(epochs completed, their epoch logs, each with its training
    `seconds`) of a backup directory whose `BackupAndRestore` has restored
    (and so, if the last backup was cut short, fallen back to the one
    before)."""
    try:
        epochs = int(json.loads((backup / "training_metadata.json").read_text())["epoch"])
        return epochs, json.loads((backup / "epochs.json").read_text())[:epochs]
    except (OSError, ValueError, KeyError, TypeError):
        return 0, []


class EpochLog(keras.callbacks.Callback):
    """Writes every epoch's logs and seconds (those of earlier attempts
    included) into the backup directory, before `BackupAndRestore` backs
    the epoch up; `history` is the whole run's, as `model.history.history`
    is of an uninterrupted one."""

    def __init__(self, path, entries):
        super().__init__()
        self.path, self.entries = path, list(entries)

    def on_train_begin(self, logs=None):
        self.last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        self.entries.append({**{k: float(v) for k, v in (logs or {}).items()},
                             "seconds": now - self.last})
        self.last = now
        write_json(self.path, self.entries)

    @property
    def history(self):
        keys = [k for k in (self.entries[0] if self.entries else {})
                if k != "seconds" and all(k in entry for entry in self.entries)]
        return {k: [entry[k] for entry in self.entries] for k in keys}


class Run:
    """The protocol's data and training settings for one model."""

    def __init__(self, work, model, epochs, batch, seed=0):
        self.work = pathlib.Path(work)
        data = np.load(self.work / "data.npz")
        scale = lambda a: protocol.images(a, model)  # noqa: E731
        self.x, self.y = scale(data["x_train"]), data["y_train"]
        self.xv, self.yv = scale(data["x_val"]), data["y_val"]
        self.xt, self.yt = scale(data["x_test"]), data["y_test"]
        self.model, self.epochs, self.batch, self.seed = model, epochs, batch, seed
        self.steps = int(np.ceil(len(self.x) / batch))
        self.dir = self.work / model
        self.dir.mkdir(parents=True, exist_ok=True)

    def build(self, width=1.0):
        return protocol.build(self.model, width)

    def pipeline(self, start=0):
        return protocol.pipeline(self.x, self.y, self.batch, self.seed, start)

    def fit(self, model, callbacks=(), stem=None):
        """Train with the protocol's pipeline; wall seconds of training, from
        the start of `fit` to the end of its last callback's `on_train_end`.

        With a `stem`, every epoch end is backed up in WORK/<model>/backup/
        <stem> (`keras.callbacks.BackupAndRestore`, listed after DKDP's
        callback as it asks), so an interrupted run resumes at its last
        completed epoch with the batches it would have seen; the seconds
        of earlier attempts' completed epochs are added (`self.resumed`
        says after which epoch, `self.history` has every epoch's logs).
        `export_done` removes the backup.

        Not counted: the tf.data iterator's teardown as `fit` returns. With
        this repeated, shuffled pipeline it took 0 to 30 s after the last
        epoch, for the dense model as for DKDP (LeNet, same harness: 13 s
        and 12 s), which is no training work and would swamp a 40 s run."""
        timer = TrainTimer()
        callbacks, start, before, log = list(callbacks), 0, 0.0, None
        if stem is not None:
            backup = self.dir / "backup" / stem
            restore = keras.callbacks.BackupAndRestore(
                str(backup), delete_checkpoint=False, double_checkpoint=True)
            restore.set_model(model)
            restore.on_train_begin()  # falls back to the backup before a cut-short one
            start, earlier = completed(backup)
            before = sum(entry["seconds"] for entry in earlier)
            if start:
                print(f"{self.model} {stem}: resumes after epoch {start}", flush=True)
            log = EpochLog(backup / "epochs.json", earlier)
            callbacks += [log, restore]
        self.resumed = start
        history = model.fit(self.pipeline(start), steps_per_epoch=self.steps,
                            epochs=self.epochs, validation_data=(self.xv, self.yv),
                            callbacks=[*callbacks, timer], verbose=2)
        self.history = log.history if log is not None else history.history
        return before + timer.seconds

    def export_done(self, stem):
        """The run's files are written: its backup is no longer needed."""
        shutil.rmtree(self.dir / "backup" / stem, ignore_errors=True)

    def done(self, stem):
        if (self.dir / f"{stem}.json").exists():
            print(f"{self.model} {stem}: done already, skipped", flush=True)
            return True
        return False

    def export(self, stem, model, record, quantize=None, sparsity=False):
        """Write the .tflite (checked against Keras by export_tflite), the
        .keras and the .json record of one exported model."""
        plain = dkdp.budget.deployed(model)
        plain.compile(loss=LOSS, metrics=["accuracy"])
        kwargs = {}
        if quantize == "int8":
            kwargs = dict(representative_data=self.x[:500], min_top1_agreement=0.0)
        report = dkdp.export_tflite(plain, self.dir / f"{stem}.tflite", quantize=quantize,
                                    sparsity=sparsity, check_data=self.xt[:256],
                                    latency_runs=1, **kwargs)
        if quantize is None and not sparsity:
            plain.save(self.dir / f"{stem}.keras")
        record = {
            "model": self.model, "seed": self.seed, **record,
            "test_acc": float(plain.evaluate(self.xt, self.yt, verbose=0, batch_size=256)[1]),
            "params": int(dkdp.count_params(plain, nonzero=False)),
            "nonzero_params": int(dkdp.count_params(plain, nonzero=True)),
            "macs": int(dkdp.count_macs(plain, nonzero=False)),
            "file": f"{stem}.tflite", "quantize": quantize or "none", "sparse_format": sparsity,
            "export_check": {"max_abs_diff": report.max_abs_diff,
                             "top1_agreement": report.top1_agreement},
        }
        (self.dir / f"{stem}.json").write_text(json.dumps(record, indent=1))
        print(json.dumps(record), flush=True)
        return record


def compile_(model):
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS, metrics=["accuracy"],
                  jit_compile=False)


def system_dense(run, args):
    if run.done("dense"):
        return
    keras.utils.set_random_seed(run.seed)
    model = run.build()
    compile_(model)
    train_s = run.fit(model, stem="dense")
    run.export("dense", model, {"system": "dense", "target": 0.0, "variant": "dense",
                                "train_s": train_s, "resumed_after_epoch": run.resumed})
    run.export_done("dense")


def kd_teacher(run):
    """The trained teacher the students distil from: dense, or dense+avg
    where that run is in WORK and is the better of the two on the
    validation images (the protocol's decisions use only those). Plain
    dense MobileNetV2's BatchNormalization statistics, at keras.applications'
    0.999 momentum, lag its weights: seed 0 ends at 58.64% test accuracy on
    AVX-512 machines, and students of that teacher would judge distillation
    by a broken model, not by what it can do."""
    found = []
    for stem in ("dense", "dense-avg"):
        path = run.dir / f"{stem}.keras"
        if path.exists():
            model = keras.saving.load_model(path)
            logits = model.predict(run.xv, batch_size=256, verbose=0)
            found.append((float(np.mean(np.argmax(logits, -1) == run.yv)), stem, model))
            print(f"{run.model} kd: {stem} teacher, validation accuracy {found[-1][0]:.4f}",
                  flush=True)
    if not found:
        raise SystemExit(f"kd needs a trained teacher in {run.dir}: run `dense` first")
    accuracy, stem, model = max(found, key=lambda t: t[0])
    return model, stem, accuracy


def system_kd(run, args):
    """keras.distillation.Distiller students of width 0.5 and 0.25 from the
    trained dense teacher (`kd_teacher`; LogitsDistillation, temperature
    4). The loss is passed as a KLDivergence instance: Keras 3.15's default
    string "kl_divergence" computes the divergence on raw logits."""
    teacher, teacher_name, teacher_val = kd_teacher(run)
    for width in args.widths:
        stem = f"kd-w{width:g}"
        if run.done(stem) and (width != min(args.widths) or run.done(f"{stem}-dynamic")):
            continue
        keras.utils.set_random_seed(run.seed)
        student = run.build(width)
        distiller = keras.distillation.Distiller(
            teacher=teacher, student=student,
            distillation_losses=keras.distillation.LogitsDistillation(
                temperature=4.0, loss=keras.losses.KLDivergence()),
            student_loss_weight=0.5)
        distiller.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS,
                          metrics=["accuracy"], jit_compile=False)
        distiller(run.x[:1])  # built, as BackupAndRestore needs
        train_s = run.fit(distiller, stem=stem)
        base = {"system": "kd", "target": 1 - student.count_params() / teacher.count_params(),
                "train_s": train_s, "resumed_after_epoch": run.resumed,
                "teacher": teacher_name, "teacher_val_acc": teacher_val}
        run.export(stem, student, {**base, "variant": f"width {width:g}"})
        if width == min(args.widths):
            run.export(f"{stem}-dynamic", student,
                       {**base, "variant": f"width {width:g}, dynamic-range int8"},
                       quantize="dynamic")
        run.export_done(stem)


ABLATIONS = {
    "uniform": "layer-uniform sparsity instead of global LAMP",
    "poly": "PolynomialDecay instead of Adaptive",
    "no_avg": "no weight averaging",
    "no_kd": "lambda_kd=0",
}


def dkdp_options(args):
    """DKDPModel's arguments: the command line's, and lambda_kd=0 for
    `--ablate no_kd` (distillation trains only the student, mutual=False:
    its part shows in the student's accuracy, not the teacher's)."""
    options = {k: v for k, v in (("student_width", args.student_width),
                                 ("lambda_kd", args.lambda_kd),
                                 ("student_hard_loss_weight", args.hard_weight))
               if v is not None}
    if getattr(args, "ablate", None) == "no_kd":
        options["lambda_kd"] = 0.0
    return {"mutual": args.mutual, **options}


def kernel_sparsity(model, keep):
    """The kernel sparsity at which `model` keeps `keep` non-zero parameters
    (biases and BatchNormalization are not pruned): what a schedule aims at
    to hold the same parameter count as a budget."""
    kernels = sum(int(np.prod(layer.kernel.shape)) for layer in model.layers
                  if hasattr(layer, "kernel") and len(layer.kernel.shape) > 1)
    return min(0.999, max(0.0, 1 - (keep - (model.count_params() - kernels)) / kernels))


def dkdp_callback(granularity, budget, args, run=None, multiple=None, resource_aware=False):
    """The library's defaults: an adaptive threshold held to the budget;
    magnitude scores for weights (DKDPCallback's default), Taylor scores
    for units (`dkdp run`'s default). Options given on the command line
    override them (for the method work, not for the committed run), and
    `--ablate` removes one part of the method (PROTOCOL.md, ablations)."""
    importance = args.importance or ("magnitude" if granularity == "weight" else "taylor")
    criterion = importance
    if importance == "wanda":  # input norms from the first 2,048 training images
        criterion = dkdp.importance.Wanda(run.x[:2048])
    adaptive = {k: v for k, v in (("initial_step", args.initial_step),
                                  ("finish_by", args.finish_by)) if v is not None}
    widths = {} if multiple is None else {"unit_multiple": multiple}
    ablate = getattr(args, "ablate", None)
    threshold = dkdp.thresholds.Adaptive(budget, **adaptive)
    if ablate == "poly":
        # TFMOT's schedule (train_tfmot.py): from the end of epoch 1 to the
        # end of epoch 10, to the sparsity that keeps the budget's count.
        keep = budget.max_params
        target = kernel_sparsity(run.build(), keep)
        threshold = dkdp.thresholds.PolynomialDecay(0.0, target, run.steps, 10 * run.steps)
    callback = dkdp.DKDPCallback(
        importance=criterion, granularity=granularity, threshold=threshold,
        scope="layer" if ablate == "uniform" else "global",
        average=ablate != "no_avg", resource_aware=resource_aware, **widths)
    return callback, importance


def structured_budget(spec, model, latency_fit=None):
    """"params:0.1" (fraction of dense parameters), "macs:0.15" (fraction of
    dense MACs), "latency:0.1" (fraction of dense's batch-1 LiteRT time, as
    `dkdp.fit_latency` estimates it) or "int8:58000" (bytes of int8
    weights)."""
    kind, value = spec.split(":")
    value = float(value)
    if kind == "params":
        return dkdp.Budget(max_params=int(value * model.count_params())), f"{value:g} params"
    if kind == "macs":
        macs = dkdp.count_macs(model, nonzero=False)
        return dkdp.Budget(max_macs=int(value * macs)), f"{value:g} MACs"
    if kind == "int8":
        return dkdp.Budget(max_bytes=int(value), bytes_per_param=1), f"{value / 1000:g} kB int8"
    if kind == "latency":
        # dkdp.fit_latency on this machine (or the plane of an earlier run:
        # the fixed time moved by a third between two passes here), F of
        # its time for the dense copy.
        fit = dkdp.fit_latency(model, "litert") if latency_fit is None else latency_fit
        dense_ms = fit.points[0][2]
        return (dkdp.Budget(max_latency_ms=value * dense_ms, latency_fit=fit),
                f"{value:g} LiteRT latency")
    raise SystemExit(f"unknown structured budget {spec!r}: params:F, macs:F, latency:F or "
                     "int8:BYTES")


def latency_fit(path):
    """The `LatencyFit` of a `.json` of a row that holds one ("latency_fit",
    as this script writes for a latency budget), or None."""
    if path is None:
        return None
    text = pathlib.Path(path).read_text()
    row = json.loads(text.splitlines()[0] if path.endswith(".jsonl") else text)
    return dkdp.LatencyFit.from_config(row["latency_fit"])


def unit_multiple(granularity, spec, given=None):
    """`(budget, multiple)` of a job: "int8:25000/1" is the budget
    "int8:25000" with widths in steps of 1 unit in that run alone; without
    "/N", the command line's `--unit-multiple` (None: the library's 16).
    Unstructured (weight) jobs have no widths to step."""
    spec, _, step = spec.partition("/")
    if granularity != "unit":
        return spec, None
    if step and not (step.isdigit() and int(step) >= 1):
        raise SystemExit(f"{spec}/{step}: the width step after '/' must be a positive integer")
    return spec, int(step) if step else given


def system_dkdp(run, args):
    """DKDP with the library's defaults: unstructured (weight) at each
    target, holding the same non-zero parameter count as the target; and
    structured (unit) under the given budgets, compacted, exported as
    float32 and full int8, with the student of the run."""
    dense_params = run.build().count_params()
    jobs = [("weight", f"params:{1 - t:g}", t) for t in args.targets]
    jobs += [("unit", spec, None) for spec in args.structured]
    for granularity, spec, target in jobs:
        spec, multiple = unit_multiple(granularity, spec, args.unit_multiple)
        kind = "unstructured" if granularity == "weight" else "structured"
        budget, label = structured_budget(spec, run.build(), latency_fit(args.latency_fit))
        stem = f"dkdp-{kind}-{spec.replace(':', '-')}"
        if multiple is not None:
            stem += f"-multiple-{multiple}"
            label += f", widths in steps of {multiple}"
        aware = args.resource_aware and granularity == "unit"
        if aware:
            stem += "-resource-aware"
            label += ", ranked per share of the budget"
        system = "dkdp"
        if args.ablate:
            stem += f"-ablate-{args.ablate}"
            label += f", {ABLATIONS[args.ablate]}"
            system = "ablation"
        if run.done(stem):
            continue
        keras.utils.set_random_seed(run.seed)
        model = dkdp.DKDPModel(run.build(), **dkdp_options(args))
        compile_(model)
        callback, importance = dkdp_callback(granularity, budget, args, run, multiple, aware)
        train_s = run.fit(model, [callback], stem=stem)
        model.save(run.dir / f"{stem}-dkdpmodel.keras")
        history = run.history
        kept = int(dkdp.count_params(dkdp.budget.deployed(model.teacher)))
        # The teacher as training left it (the epochs' mean, see
        # DKDPCallback(average=...)), on the validation images: the last
        # val_teacher_accuracy is of the last epoch's weights.
        final = model.evaluate(run.xv, run.yv, verbose=0, batch_size=256, return_dict=True)
        final_val = float(final["teacher_accuracy"])
        student_test = float(model.evaluate(run.xt, run.yt, verbose=0, batch_size=256,
                                            return_dict=True)["student_accuracy"])
        base = {"system": system, "target": 1 - kept / dense_params, "train_s": train_s,
                "resumed_after_epoch": run.resumed, "budget": spec, "ablation": args.ablate,
                "averaged_epochs": callback.averaged_epochs,
                "final_val_teacher_accuracy": round(final_val, 5),
                "final_val_student_accuracy": round(float(final["student_accuracy"]), 5),
                "student_test_acc": round(student_test, 5),
                "val_teacher_accuracy": [round(float(v), 5) for v in history["val_teacher_accuracy"]],
                "val_student_accuracy": [round(float(v), 5) for v in history["val_student_accuracy"]],
                "sparsity": [round(float(v), 5) for v in history["sparsity"]]}
        if multiple is not None:
            base["unit_multiple"] = multiple
        if isinstance(budget.latency_fit, dkdp.LatencyFit):
            base["latency_fit"] = budget.latency_fit.get_config()
            base["predicted_latency_ms"] = budget.measure(model.teacher)["latency_ms"]
        # Widths stepped by N units are compacted to multiples of N (no
        # zero channels beyond them: what a size budget counts is the file).
        small = model.compact_teacher(align=multiple or dkdp.compaction.ALIGN)
        if granularity == "unit":
            run.export(f"{stem}-int8", small,
                       {**base, "variant": f"{kind} {label}, full int8"}, quantize="int8")
            run.export(f"{stem}-student", model.student,
                       {**base, "variant": f"student, {kind} {label} run"})
        if granularity == "weight" and args.sparse_export:
            # The converter's sparse weight encoding: a smaller file (what
            # runs it, and how fast, is measured by run.py).
            run.export(f"{stem}-sparse", small, {**base, "variant": f"{kind} {label}, "
                                                 "sparse format"}, sparsity=True)
        run.export(stem, small, {**base, "variant": f"{kind} {label} ({importance})"})
        run.export_done(stem)


def system_dense_avg(run, args):
    """`dense+avg` (PROTOCOL.md, ablations): the dense model with DKDP's
    weight averaging and nothing else (masks that never prune, so the mean
    runs over every epoch end after the first, checked on the validation
    images against the last epoch as DKDP's is)."""
    if run.done("dense-avg"):
        return
    keras.utils.set_random_seed(run.seed)
    model = dkdp.prunable(run.build())
    compile_(model)
    callback = dkdp.DKDPCallback(threshold=dkdp.thresholds.ConstantSparsity(0.0),
                                 validation_data=(run.xv, run.yv), verbose=0)
    train_s = run.fit(model, [callback], stem="dense-avg")
    run.export("dense-avg", model, {"system": "dense_avg", "target": 0.0,
                                    "variant": "dense + weight averaging", "train_s": train_s,
                                    "resumed_after_epoch": run.resumed,
                                    "averaged_epochs": callback.averaged_epochs})
    run.export_done("dense-avg")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work")
    parser.add_argument("system", choices=("dense", "kd", "dkdp", "dense_avg"))
    parser.add_argument("--model", required=True, choices=protocol.MODELS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ablate", choices=sorted(ABLATIONS), default=None,
                        help="DKDP with one part removed (PROTOCOL.md, ablations)")
    parser.add_argument("--sparse-export", action="store_true",
                        help="also export unstructured models in the sparse weight format")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--widths", type=float, nargs="+", default=None,
                        help="kd students' widths (default: protocol.KD_WIDTHS)")
    parser.add_argument("--targets", type=float, nargs="*", default=[0.5, 0.8, 0.9, 0.95])
    parser.add_argument("--structured", nargs="*", default=["macs:0.15", "int8:58000"],
                        help="budgets of structured runs: params:F, macs:F, latency:F or "
                             "int8:BYTES, "
                             "each optionally /N for --unit-multiple N in that run alone")
    # Overrides of the library's defaults, for the method work.
    parser.add_argument("--finish-by", type=float, default=None)
    parser.add_argument("--student-width", type=float, default=None)
    parser.add_argument("--mutual", action="store_true")
    parser.add_argument("--initial-step", type=float, default=None)
    parser.add_argument("--lambda-kd", type=float, default=None)
    parser.add_argument("--hard-weight", type=float, default=None)
    parser.add_argument("--unit-multiple", type=int, default=None,
                        help="structured runs: widths step by this many units "
                             "(DKDPCallback's unit_multiple, default 16) and are compacted "
                             "to multiples of it (1: no zero channels, the smallest file)")
    parser.add_argument("--latency-fit", default=None,
                        help="a row (.json/.jsonl) whose latency_fit a latency:F budget uses "
                             "instead of fitting on this machine again")
    parser.add_argument("--resource-aware", action="store_true",
                        help="structured runs: rank units per share of the budget they take "
                             "(DKDPCallback(resource_aware=True))")
    parser.add_argument("--importance", default=None,
                        help="default: magnitude for weights, taylor for units; "
                             "'wanda': importance.Wanda on 2,048 training images")
    args = parser.parse_args()
    if args.widths is None:
        args.widths = list(protocol.KD_WIDTHS[args.model])
    run = Run(args.work, args.model, args.epochs, args.batch, args.seed)
    {"dense": system_dense, "kd": system_kd, "dkdp": system_dkdp,
     "dense_avg": system_dense_avg}[args.system](run, args)


if __name__ == "__main__":
    main()
