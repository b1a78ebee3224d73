"""The `dkdp` command: compress a model end to end and write a report.

    dkdp run [--dataset fashion_mnist] [--model reference_cnn] [--quick] ...
    dkdp run --resume DIR
    dkdp export MODEL.keras --out FILE.tflite [--quantize int8]
    dkdp inspect MODEL.keras

Bad input exits with status 2 and one line that names the bad value.

`dkdp run` trains a dense baseline (a fresh copy of the teacher, same
epochs, optimizer and data) unless `--no-dense`, then the DKDP model, then
exports all of them. Each training is backed up at every epoch end
(`keras.callbacks.BackupAndRestore` in OUT/backup and OUT/backup_dense), its
settings are in OUT/settings.json, and its epoch logs in OUT/history*.json,
so `dkdp run --resume OUT` rebuilds the same models and continues from the
last completed epoch, with the batches the uninterrupted run would have seen.
"""

import argparse
import json
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
import zipfile

DATASETS = ("fashion_mnist", "mnist", "cifar10", "digits")
MODELS = ("reference_cnn", "lenet_300_100")
QUANTIZE = ("none", "dynamic", "float16", "int8")
MIN_STEPS = 40
#: The options of `dkdp run` that OUT/settings.json keeps for --resume.
SETTINGS = ("dataset", "model", "max_params", "max_bytes", "max_macs",
            "max_latency_ms", "importance", "granularity", "lambda_kd",
            "temperature", "epochs", "batch_size", "quantize", "seed", "quick",
            "no_dense")


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


def _parser():
    parser = argparse.ArgumentParser(
        prog="dkdp",
        description="Dynamic Knowledge Distillation and Pruning for Keras 3.",
    )
    parser.add_argument("--version", action="store_true", help="print the version")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="train, prune and distil; write a report")
    run.add_argument("--dataset", default="fashion_mnist",
                     help=f"one of {', '.join(DATASETS)}, or a .npz path")
    run.add_argument("--model", default="reference_cnn",
                     help=f"one of {', '.join(MODELS)}, or a .keras path")
    run.add_argument("--max-params", type=float, default=None,
                     help="parameter budget (default: 10%% of the teacher's)")
    run.add_argument("--max-bytes", type=float, default=None)
    run.add_argument("--max-macs", type=float, default=None)
    run.add_argument("--max-latency-ms", type=float, default=None)
    run.add_argument("--importance", default="taylor")
    run.add_argument("--granularity", default="unit", choices=("weight", "unit"))
    run.add_argument("--lambda-kd", type=float, default=1.0)
    run.add_argument("--temperature", type=float, default=4.0)
    run.add_argument("--epochs", type=int, default=15)
    run.add_argument("--batch-size", type=int, default=None,
                     help="default: 128, or the power of two that gives an epoch at least "
                          f"{MIN_STEPS} steps on a smaller training set (digits: 32), "
                          "so that BatchNormalization's moving statistics settle")
    run.add_argument("--quantize", default="int8", choices=QUANTIZE)
    run.add_argument("--out", default="dkdp_run")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--quick", action="store_true",
                     help="a small run (10,000 images, at most 6 epochs): same pipeline")
    run.add_argument("--no-dense", action="store_true",
                     help="skip the dense baseline (a fresh copy of the teacher "
                          "trained alone with the same settings)")
    run.add_argument("--resume", default=None, metavar="DIR",
                     help="continue the interrupted run in DIR with its saved "
                          "settings (DIR/settings.json)")
    parser.run_parser = run

    export = sub.add_parser("export", help="convert a .keras model to .tflite")
    export.add_argument("model")
    export.add_argument("--out", required=True)
    export.add_argument("--quantize", default="none", choices=QUANTIZE)
    export.add_argument("--dataset", default="fashion_mnist",
                        help="representative and check data for the file")
    export.add_argument("--fixed-batch", action="store_true",
                        help="batch size 1 in the file (static shapes, for microcontrollers)")

    inspect = sub.add_parser("inspect", help="importance and sparsity of a .keras model")
    inspect.add_argument("model")
    inspect.add_argument("--importance", default="magnitude")
    inspect.add_argument("--out", default=None, help="directory for the plots")

    bench = sub.add_parser(
        "bench", help="run the benchmark protocol (benchmarks/run.py of a source checkout)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER,
                       help="passed to benchmarks/run.py: --quick, --systems, --models, ...")
    return parser


def _check_keras_file(path):
    """`path` is a .keras archive (a zip with config.json), checked without
    TensorFlow: Keras reports an empty or corrupt file as "File not found"."""
    if not os.path.isfile(path):
        raise UsageError(f"no model file at {path!r}")
    try:
        size = os.path.getsize(path)
        if size == 0:
            problem = "it is empty (0 bytes)"
        elif not zipfile.is_zipfile(path):
            problem = f"it is corrupt ({size:,} bytes, not a zip archive)"
        else:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
            problem = None if "config.json" in names else "it is a zip without config.json"
    except (OSError, zipfile.BadZipFile) as error:
        problem = f"it cannot be read ({_first_line(error)})"
    if problem:
        raise UsageError(
            f"{path!r} is not a readable .keras archive: {problem}; save the model "
            "again with model.save('NAME.keras')"
        )


def _load_keras(path):
    _check_keras_file(path)
    import keras

    import dkdp_keras  # noqa: F401  (registers the masked layers)

    try:
        return keras.saving.load_model(path)
    except Exception as error:  # unreadable, not a .keras file, ...
        raise UsageError(
            f"cannot read {path!r} as a Keras model: {_first_line(error)}"
        ) from None


def _check_out_dir(flag, path):
    """`path` is, or can be made, a directory this process writes in.
    Checked with a probe directory, created and removed at once, in `path`
    or its nearest existing parent: os.access alone says yes to root for
    places such as /sys and /proc, where nobody can create a directory."""
    out = pathlib.Path(path)
    try:
        if out.exists() and not out.is_dir():
            raise UsageError(
                f"{flag} {path} is a file, not a directory: choose a directory "
                "(it is created if missing)"
            )
        existing = out.absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise UsageError(
                f"{flag} {path} is inside {existing}, which is a file: choose a "
                "directory path"
            )
        _probe(existing, flag, path)
    except OSError as error:  # e.g. a parent that cannot be listed
        raise UsageError(f"{flag} {path} cannot be used: {_first_line(error)}") from None


def _probe(directory, flag, path):
    """UsageError unless a directory can be created (and removed) in `directory`."""
    if pathlib.Path(path).absolute() == directory:
        lead = f"{flag} {path} is not writable"
    else:
        lead = f"{flag} {path} cannot be created there: {directory} is not writable"
    reason = "permission denied"
    writable = os.access(directory, os.W_OK | os.X_OK)
    if writable:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".dkdp-probe-", dir=directory))
        except OSError as error:
            writable, reason = False, error.strerror or _first_line(error)
    if not writable:
        raise UsageError(f"{lead} ({reason}): choose a directory you can write to")


def _check_out_file(flag, path, suffix):
    """`path` names a file (not a directory) with `suffix`, in an existing
    directory this process writes in."""
    target = pathlib.Path(path)
    if target.is_dir():
        raise UsageError(
            f"{flag} {path} is a directory: give the file to write, for example "
            f"{target / ('model' + suffix)}"
        )
    if target.suffix != suffix:
        raise UsageError(
            f"{flag} must end in {suffix}, got {path} (for example "
            f"{target.with_suffix(suffix)})"
        )
    parent = target.absolute().parent
    if not parent.is_dir():
        raise UsageError(
            f"{flag} {path}: its directory {parent} does not exist: create it first"
        )
    _probe(parent, flag, path)


def _data(name, quick):
    from dkdp_keras import datasets

    if not (name in DATASETS or name.endswith(".npz")):
        raise UsageError(
            f"unknown dataset {name!r}: use one of {', '.join(DATASETS)} or a .npz path"
        )
    try:
        (x, y), (xt, yt) = datasets.load(name, as_numpy=True)
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise UsageError(_first_line(error)) from None
    if len(x) < 10:  # a tenth of the training set validates
        raise UsageError(
            f"dataset {name!r} has {len(x)} training examples; dkdp run needs at "
            "least 10 (the last tenth validates)"
        )
    (x, y), (xv, yv) = datasets.validation_split(x, y, size=min(5000, len(x) // 10))
    if quick:
        x, y, xv, yv, xt, yt = x[:10000], y[:10000], xv[:2000], yv[:2000], xt[:2000], yt[:2000]
    return (x, y), (xv, yv), (xt, yt)


def _teacher(name, input_shape, classes):
    from dkdp_keras import zoo

    if name in MODELS:
        try:
            return getattr(zoo, name)(input_shape=input_shape, num_classes=classes)
        except ValueError as error:  # e.g. pooling below 1×1
            raise UsageError(
                f"model {name!r} cannot take inputs of shape {tuple(input_shape)}: "
                f"{_first_line(error)}; use a dataset with larger images or "
                "another --model"
            ) from None
    if name.endswith(".keras"):
        import dkdp_keras as dkdp

        model = _load_keras(name)
        if isinstance(model, dkdp.DKDPModel):
            raise UsageError(
                f"--model {name!r} is a saved DKDPModel (a teacher with its student), "
                "not a model to compress: pass a plain Keras model, such as the "
                "teacher_compact.keras or student.keras of the same run"
            )
        try:
            inputs, outputs = list(model.inputs), list(model.outputs)
        except (AttributeError, TypeError, ValueError):
            raise UsageError(
                f"--model {name!r} is a {type(model).__name__} without a graph of "
                "inputs and outputs: dkdp run takes a Sequential or Functional model"
            ) from None
        if len(inputs) != 1 or len(outputs) != 1:
            raise UsageError(
                f"--model {name!r} has {len(inputs)} input(s) and {len(outputs)} "
                "outputs; dkdp run trains a classifier with one input and one output "
                "(logits, one per class): keep one head, or concatenate the heads"
            )
        if tuple(inputs[0].shape[1:]) != tuple(input_shape):
            raise UsageError(
                f"model {name!r} takes inputs of shape {tuple(inputs[0].shape[1:])}, "
                f"the dataset has {tuple(input_shape)}"
            )
        out_shape = tuple(outputs[0].shape[1:])
        if len(out_shape) != 1 or out_shape[0] is None or out_shape[0] < classes:
            raise UsageError(
                f"--model {name!r} outputs shape {out_shape}, but the dataset's labels "
                f"are 0 to {classes - 1}: the model needs one output of shape "
                f"({classes},) or more, the logits of the classes"
            )
        return model
    raise UsageError(f"unknown model {name!r}: use one of {', '.join(MODELS)} or a .keras path")


def _first_line(error):
    """The informative line of an exception's message, without colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith("Exception encountered")]
    return (useful or lines or [type(error).__name__])[0]


def _pipeline(x, y, batch, seed, start=0, epochs=1):
    """Shuffled batches for epochs `start` .. `epochs - 1`, one repeated
    pipeline. Epoch e's order depends only on (seed, e), so a run resumed at
    epoch `start` sees the batches the uninterrupted run would have seen."""
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((x, y))
    ds = None
    for epoch in range(start, max(start + 1, epochs)):
        one = data.shuffle(len(x), seed=seed * 100_003 + epoch).batch(batch)
        ds = one if ds is None else ds.concatenate(one)
    return ds.repeat().prefetch(tf.data.AUTOTUNE)


IMPORTANCE = ("magnitude", "gradient", "gradient_magnitude", "taylor", "activation",
              "activation_frequency", "learned_mask")


def _default_batch_size(examples):
    """128, or smaller so that an epoch has at least MIN_STEPS steps: with
    few steps, BatchNormalization's moving statistics (momentum 0.99) stay
    near their initial values and inference-mode accuracy is near chance."""
    batch = 128
    while batch > 8 and examples < batch * MIN_STEPS:
        batch //= 2
    return batch


def _check_run_args(args):
    """Everything that can be checked before TensorFlow is imported."""
    if not (args.dataset in DATASETS or args.dataset.endswith(".npz")):
        raise UsageError(
            f"unknown dataset {args.dataset!r}: use one of {', '.join(DATASETS)} "
            "or a .npz path"
        )
    if args.dataset.endswith(".npz") and not os.path.isfile(args.dataset):
        raise UsageError(f"No dataset file at {args.dataset}.")
    if args.model not in MODELS and not args.model.endswith(".keras"):
        raise UsageError(
            f"unknown model {args.model!r}: use one of {', '.join(MODELS)} or a .keras path"
        )
    if args.model.endswith(".keras"):
        _check_keras_file(args.model)
    if args.importance.lower() not in IMPORTANCE:
        raise UsageError(
            f"Unknown importance criterion {args.importance!r}; known names: "
            f"{', '.join(IMPORTANCE)}"
        )
    if args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    for name in ("max_params", "max_bytes", "max_macs", "max_latency_ms"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {value:g}")
        if value is not None and not math.isfinite(value):
            raise UsageError(
                f"--{name.replace('_', '-')} must be a finite number, got {value:g}: "
                "give the budget itself, for example --max-params 60000"
            )
        if value is not None and float(value).is_integer():
            setattr(args, name, int(value))
    if not (math.isfinite(args.lambda_kd) and args.lambda_kd >= 0):
        raise UsageError(
            f"--lambda-kd must be a finite number >= 0 (the weight of the distillation "
            f"loss; 0 turns it off), got {args.lambda_kd:g}"
        )
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UsageError(
            f"--temperature must be a finite number > 0 (the distillation softmax "
            f"temperature; 1 is none, 4 the default), got {args.temperature:g}"
        )
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in 0 .. 2**32 - 1 (4294967295), got {args.seed}")
    _check_out_dir("--out", args.out)


def _explicit_run_options(argv):
    """The `dkdp run` options that `argv` gives (not left to their default)."""
    run = _parser().run_parser
    unset = object()
    names = vars(run.parse_args([]))
    given = run.parse_args(argv[argv.index("run") + 1:],
                           namespace=argparse.Namespace(**{n: unset for n in names}))
    return {name for name, value in vars(given).items() if value is not unset}


def _same(name, given, saved):
    if name in ("dataset", "model") and isinstance(given, str) and isinstance(saved, str):
        if given.endswith((".npz", ".keras")):
            return os.path.abspath(given) == os.path.abspath(saved)
    if isinstance(given, (int, float)) and isinstance(saved, (int, float)) \
            and not isinstance(given, bool) and not isinstance(saved, bool):
        return float(given) == float(saved)
    return given == saved


def _resume_settings(args, explicit):
    """Take the interrupted run's settings from DIR/settings.json; options
    given with --resume must agree with them."""
    directory = pathlib.Path(args.resume)
    path = directory / "settings.json"
    if not path.is_file():
        raise UsageError(
            f"nothing to resume in {args.resume!r}: it has no settings.json "
            "(dkdp run --out DIR writes one when it starts)"
        )
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read {path}: {error}") from None
    if (directory / "metrics.json").is_file():
        raise UsageError(
            f"the run in {args.resume!r} has finished (see its report.md); "
            "nothing to resume"
        )
    conflicts = []
    if "out" in explicit and os.path.abspath(args.out) != os.path.abspath(directory):
        conflicts.append(f"--out {args.out} (the run is in {args.resume})")
    for name in SETTINGS:
        if name in explicit and name in saved and not _same(name, getattr(args, name),
                                                            saved[name]):
            flag = "--" + name.replace("_", "-")
            value = "" if isinstance(getattr(args, name), bool) else f" {getattr(args, name)}"
            conflicts.append(f"{flag}{value} (the run has {saved[name]})")
    if conflicts:
        raise UsageError(
            f"--resume {args.resume} continues with the run's own settings, and "
            f"{'; '.join(conflicts)} would change them: drop "
            f"{'it' if len(conflicts) == 1 else 'them'}, or start a new run with "
            "another --out"
        )
    for name in SETTINGS:
        if name in saved:
            setattr(args, name, saved[name])
    args.out = str(directory)


def _check_not_interrupted(out):
    """A new run must not overwrite an interrupted one."""
    if (out / "settings.json").is_file() and not (out / "metrics.json").is_file():
        raise UsageError(
            f"{str(out)!r} holds an interrupted run: continue it with "
            f"dkdp run --resume {out}, or choose another --out"
        )


def _clear_finished(out):
    """Remove what an earlier, finished run in `out` left that a new run
    would otherwise read back (backups, epoch logs, baseline, the finished
    mark)."""
    for name in ("backup", "backup_dense"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.json", "dense.keras", "history.json", "history_dense.json"):
        (out / name).unlink(missing_ok=True)


def _saved_settings(args):
    settings = {name: getattr(args, name) for name in SETTINGS}
    for name, suffix in (("dataset", ".npz"), ("model", ".keras")):
        if settings[name].endswith(suffix):
            settings[name] = os.path.abspath(settings[name])
    return settings


def _completed_epochs(backup_dir):
    """Epochs a BackupAndRestore directory holds (0 if none)."""
    try:
        return int(json.loads(
            (backup_dir / "training_metadata.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _epoch_log(path, fresh):
    """A callback that keeps each completed epoch's logs and duration in
    `path` (JSON), across interrupted and resumed fits."""
    import keras

    class EpochLog(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.entries = []
            if not fresh and path.is_file():
                self.entries = json.loads(path.read_text())
            self._first = True

        def on_epoch_begin(self, epoch, logs=None):
            if self._first:  # forget epochs the checkpoint does not hold
                self._first = False
                self.entries = [e for e in self.entries if e["epoch"] < epoch]
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.entries.append({
                "epoch": epoch, "seconds": time.perf_counter() - self._start,
                "logs": {k: float(v) for k, v in (logs or {}).items()}})
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.entries, indent=1))
            os.replace(tmp, path)

        @property
        def history(self):
            keys = [k for k in (self.entries[0]["logs"] if self.entries else {})
                    if all(k in e["logs"] for e in self.entries)]
            return {k: [e["logs"][k] for e in self.entries] for k in keys}

        @property
        def seconds(self):
            return sum(e["seconds"] for e in self.entries)

    return EpochLog()


def _fit(model, tag, data, args, out, extra_callbacks=(), resuming=False):
    """Train with a checkpoint, a backup and an epoch log; returns the log."""
    import keras

    (x, y), (xv, yv) = data
    suffix = "" if tag == "dkdp" else "_" + tag
    backup_dir = out / ("backup" + suffix)
    checkpoint = out / f"checkpoint{suffix}.keras"
    args.checkpoint = checkpoint  # what an interruption leaves, for the message
    log = _epoch_log(out / f"history{suffix}.json", fresh=not resuming)
    start = _completed_epochs(backup_dir) if resuming else 0
    if start:
        print(f"dkdp run: {tag} training resumes after epoch {start} of {args.epochs}",
              flush=True)
    steps = int((len(x) + args.batch_size - 1) // args.batch_size)
    callbacks = list(extra_callbacks) + [
        log,
        keras.callbacks.ModelCheckpoint(str(checkpoint)),
        # Last, so that it backs up each epoch after the pruning event and
        # the log of that epoch; kept until the report is written.
        keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=False),
    ]
    model.fit(_pipeline(x, y, args.batch_size, args.seed, start, args.epochs),
              steps_per_epoch=steps, epochs=args.epochs, validation_data=(xv, yv),
              shuffle=False, callbacks=callbacks, verbose=1)
    return log


def cmd_run(args):
    resuming = args.resume is not None
    if resuming:
        _resume_settings(args, getattr(args, "explicit", set()))
    _check_run_args(args)
    out = pathlib.Path(args.out)
    if not resuming:
        _check_not_interrupted(out)
    import keras

    import dkdp_keras as dkdp

    criterion = dkdp.importance.get(args.importance)
    if args.quick:
        args.epochs = min(args.epochs, 6)
    keras.utils.set_random_seed(args.seed)
    (x, y), (xv, yv), (xt, yt) = _data(args.dataset, args.quick)
    classes = int(max(y.max(), yt.max()) + 1)
    if args.batch_size is None:
        args.batch_size = _default_batch_size(len(x))
    teacher = _teacher(args.model, x.shape[1:], classes)
    dense_params = teacher.count_params()
    limits = dict(max_params=args.max_params, max_bytes=args.max_bytes,
                  max_macs=args.max_macs, max_latency_ms=args.max_latency_ms)
    if all(v is None for v in limits.values()):
        limits["max_params"] = dense_params // 10
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    try:
        budget = dkdp.Budget(**{k: v for k, v in limits.items() if v is not None})
        model = dkdp.DKDPModel(teacher, lambda_kd=args.lambda_kd,
                               temperature=args.temperature)
        callback = dkdp.DKDPCallback(
            importance=criterion, granularity=args.granularity,
            threshold=dkdp.thresholds.Adaptive(budget, tolerance=0.005))
        # Before the dense baseline trains: what fit would refuse at its start.
        callback.check_budget(model)
    except (ValueError, TypeError) as error:
        raise UsageError(_first_line(error)) from None
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not resuming:
            _clear_finished(out)
            (out / "settings.json").write_text(json.dumps(_saved_settings(args), indent=2))
    except OSError as error:  # checked up front; this is a race or a full disk
        raise UsageError(f"--out {args.out}: {_first_line(error)}") from None
    print(f"dkdp run: {args.model} on {args.dataset}, {len(x):,} training images, "
          f"{args.epochs} epochs, budget {budget}"
          + ("" if args.no_dense else ", after a dense baseline"), flush=True)
    data = ((x, y), (xv, yv))

    dense, dense_log = None, None
    if not args.no_dense:
        if resuming and (out / "dense.keras").is_file():
            print("dkdp run: the dense baseline is trained already (dense.keras)", flush=True)
            dense = _load_keras(str(out / "dense.keras"))
        else:
            keras.utils.set_random_seed(args.seed)  # the teacher's initial weights
            dense = keras.models.clone_model(teacher)
            dense.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss,
                          metrics=["accuracy"])
            print("dkdp run: dense baseline", flush=True)
            _fit(dense, "dense", data, args, out, resuming=resuming)
            dense.save(out / "dense.keras")
        dense_log = _epoch_log(out / "history_dense.json", fresh=False)

    keras.utils.set_random_seed(args.seed)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    print("dkdp run: DKDP (pruned teacher and student)", flush=True)
    log = _fit(model, "dkdp", data, args, out, extra_callbacks=[callback],
               resuming=resuming)
    history = log.history

    small = model.compact_teacher()
    model.save(out / "dkdp_model.keras")
    small.save(out / "teacher_compact.keras")
    model.student.save(out / "student.keras")
    rows = []
    models = [("pruned teacher (compacted)", "teacher", small),
              ("student", "student", model.student)]
    if dense is not None:
        models.insert(0, ("dense teacher", "dense", dense))
    for name, stem, net in models:
        kwargs = {}
        if args.quantize == "int8":
            kwargs["representative_data"] = x[:500]
        # The agreement with Keras is reported, not enforced, so that a run
        # always ends with its files; the table shows it.
        report = dkdp.export_tflite(
            net, out / f"{stem}.tflite",
            quantize=None if args.quantize == "none" else args.quantize,
            check_data=(xt, yt), latency_runs=50, min_top1_agreement=0.0,
            max_abs_diff=1e30, **kwargs)
        (out / f"{stem}.export.json").write_text(json.dumps(report.as_dict(), indent=2))
        rows.append({"model": name, "file": f"{stem}.tflite", "params": net.count_params(),
                     "macs": dkdp.count_macs(net, nonzero=False),
                     "tflite_acc": report.accuracy, "tflite_bytes": report.bytes,
                     "agreement": report.top1_agreement,
                     "latency_ms": report.latency_ms})
    train_s = log.seconds + (dense_log.seconds if dense_log is not None else 0.0)
    metrics = {"settings": _saved_settings(args),
               "dense_params": dense_params, "train_s": train_s,
               "history": history,
               "dense_history": dense_log.history if dense_log is not None else None,
               "tau_events": callback.history,
               "models": rows}
    # The scores the run's own criterion gave at its last decision, kept
    # against pruned; per-layer counts as the compacted teacher ships them.
    summary = dkdp.report.importance_summary(
        model, criterion=criterion, out_dir=out, decision=callback.last_decision)
    _history_plot(history, out / "training.png",
                  dense_log.history if dense_log is not None else None)
    _size_plot(rows, out / "size_accuracy.png", args.quantize)
    table = ("| model | params | MACs | TFLite acc | agrees with Keras | TFLite bytes "
             "| latency ms |\n|---|---:|---:|---:|---:|---:|---:|\n" + "".join(
                 f"| {r['model']} | {r['params']:,} | {r['macs']:,} | {r['tflite_acc']:.2%} "
                 f"| {r['agreement']:.2%} | {r['tflite_bytes']:,} | {r['latency_ms']:.3f} |\n"
                 for r in rows))
    steps = int((len(x) + args.batch_size - 1) // args.batch_size)
    events = _events_table(callback.history, steps, callback.normalize)
    (out / "report.md").write_text(
        f"# dkdp run\n\n{table}\nDense teacher: {dense_params:,} parameters. "
        f"Training: {train_s:.0f} s. Files: `.tflite` ({args.quantize}), "
        "accuracy on the test split.\n\n"
        f"Settings: `{json.dumps(metrics['settings'], default=str)}`\n\n"
        f"## Pruning events\n\n{events}\n"
        "![accuracy against size](size_accuracy.png)\n\n"
        f"## Layers\n\n{summary.title}; units and weights as the compacted "
        f"teacher ships them (a removed unit's inputs to the next layer go "
        f"too).\n\n{summary.markdown}\n"
        "![training](training.png)\n![layers](layer_sparsity.png)\n"
        "![importance](importance_histograms.png)\n")
    # Last: metrics.json marks the run finished (--resume refuses it then).
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    for name in ("backup", "backup_dense"):
        shutil.rmtree(out / name, ignore_errors=True)
    print("\n" + table + f"\nWrote {out}/report.md, metrics.json, plots, .keras and "
          ".tflite files.")
    return 0


def _events_table(history, steps_per_epoch, normalize):
    """The pruning events as a Markdown table a reader can follow: when,
    how much of what was kept each removed, what was left, and τ."""
    if not history:
        return "No pruning event.\n"
    lines = ["| event | after epoch (step) | sparsity of the masks | removed of "
             "the kept weights | kept parameters (compacted) | τ |",
             "|---:|---:|---:|---:|---:|---:|"]
    previous = 0.0
    for i, h in enumerate(history, 1):
        before = h.get("before")
        before = previous if before is None or before != before else before
        after = h["sparsity"]
        removed = (after - before) / (1.0 - before) if before < 1.0 else 0.0
        epoch = h["step"] / max(1, steps_per_epoch)
        when = f"{epoch:.0f}" if float(epoch).is_integer() else f"{epoch:.2f}"
        lines.append(f"| {i} | {when} ({h['step']:,}) | {before:.1%} -> {after:.1%} | "
                     f"{removed:+.1%} | {h['kept_params']:,} | {h['tau']:.3g} |")
        previous = after
    unit = {
        "lamp": "a LAMP score (Lee et al. 2021): within each layer an entry's "
                "squared score over the sum of the squares of the entries at "
                "least as important, so each layer's best entry scores 1 and "
                "one τ fits all layers; entries below τ were pruned",
        "mean": "a score divided by its layer's mean: 1 is as important as the "
                "layer's average entry; entries below τ were pruned",
        "l2": "a score divided by its layer's L2 norm; entries below τ were pruned",
        "none": "the criterion's raw score; entries below τ were pruned",
    }.get(normalize, "")
    return ("\n".join(lines) + f"\n\nτ is {unit}. The last event's 'removed' "
            "can be negative: the event that reaches the budget takes the best "
            "pruned units back while the budget holds.\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _history_plot(history, path, dense_history=None):
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    curves = [(history, "val_teacher_accuracy", "pruned teacher"),
              (history, "val_student_accuracy", "student"),
              (dense_history or {}, "val_accuracy", "dense teacher")]
    for source, key, label in curves:
        if key in source:
            a.plot(range(1, len(source[key]) + 1), source[key], label=label)
    a.set_xlabel("epoch"); a.set_ylabel("validation accuracy"); a.legend(fontsize=8)  # noqa: E702
    if "sparsity" in history:
        b.plot(range(1, len(history["sparsity"]) + 1), history["sparsity"], color="tab:red")
    b.set_xlabel("epoch"); b.set_ylabel("teacher sparsity")  # noqa: E702
    from matplotlib.ticker import MaxNLocator

    for axis in (a, b):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _size_plot(rows, path, quantize):
    """Test accuracy of each .tflite file against its size, one labelled point
    per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for row in rows:
        kib, acc = row["tflite_bytes"] / 1024, 100 * row["tflite_acc"]
        ax.scatter([kib], [acc], s=40)
        ax.annotate(row["model"], (kib, acc), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"TFLite file size, KiB ({quantize}, log scale)")
    ax.set_ylabel("test accuracy, %")
    ax.margins(x=0.3, y=0.2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_export(args):
    _check_out_file("--out", args.out, ".tflite")
    import dkdp_keras as dkdp

    model = _load_keras(args.model)
    if hasattr(model, "teacher"):
        model = model.compact_teacher()
    kwargs = {}
    if args.quantize == "int8":
        (x, _), _, _ = _data(args.dataset, quick=True)
        kwargs["representative_data"] = x[:500]
    try:
        report = dkdp.export_tflite(
            model, args.out, quantize=None if args.quantize == "none" else args.quantize,
            fixed_batch=args.fixed_batch, **kwargs)
    except (ValueError, OSError) as error:  # a bad path, unwritable, ...
        raise UsageError(_first_line(error)) from None
    print(json.dumps(report.as_dict(), indent=2))
    return 0


def cmd_inspect(args):
    if args.out is not None:
        _check_out_dir("--out", args.out)
    import dkdp_keras as dkdp

    model = _load_keras(args.model)
    try:
        summary = dkdp.report.importance_summary(model, args.importance, out_dir=args.out)
    except ValueError as error:
        raise UsageError(str(error)) from None
    print(summary.markdown)
    return 0


def cmd_bench(args):
    """Run benchmarks/run.py of the source checkout this package runs from:
    the benchmark needs TFMOT's tf_keras in processes of its own, so it
    lives beside the package, not in it."""
    import subprocess

    runner = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
    if not runner.is_file():
        print("dkdp bench: the benchmark runs from a source checkout (benchmarks/run.py "
              "was not found next to this installation): git clone the repository, "
              "pip install -e \".[bench]\" and run dkdp bench there.", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(runner), *args.bench_args])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        # Everything after "bench" belongs to benchmarks/run.py, options too.
        return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.version:
        from dkdp_keras import __version__

        print(f"dkdp {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "bench":
        return cmd_bench(args)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.command == "run":
        args.explicit = _explicit_run_options(list(argv))
        args.checkpoint = None
    try:
        return {"run": cmd_run, "export": cmd_export, "inspect": cmd_inspect}[args.command](args)
    except UsageError as error:
        print(f"dkdp {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ndkdp {args.command}: interrupted.", file=sys.stderr)
        if args.command == "run" and args.checkpoint is not None:
            done = (f"the last completed epoch is in {args.checkpoint}"
                    if args.checkpoint.is_file() else "no epoch was completed")
            print(f"dkdp run: {done}; continue with: dkdp run --resume {args.out}",
                  file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
