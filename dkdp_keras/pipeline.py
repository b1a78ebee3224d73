"""What `dkdp run` does, callable from Python: compress a model end to end
and write a report.

    import dkdp_keras.pipeline
    metrics = dkdp_keras.pipeline.run(dataset="digits", model="lenet_300_100")

`run` trains a dense baseline (a fresh copy of the teacher, same epochs,
optimizer and data) unless `no_dense`, then the DKDP model, then exports all
of them. Each training is backed up at every epoch end
(`keras.callbacks.BackupAndRestore` in OUT/backup and OUT/backup_dense), its
settings are in OUT/settings.json, and its epoch logs in OUT/history*.json,
so `run(resume=OUT)` rebuilds the same models and continues from the last
completed epoch, with the batches the uninterrupted run would have seen.

Bad input raises `PipelineError` (a ValueError) with one line that names the
bad value, before TensorFlow trains anything; messages name the options as
`dkdp run` spells them (`--epochs`).
"""

import inspect
import json
import os
import pathlib
import shutil
import time
import types

from dkdp_keras._inputs import (  # noqa: F401  (PipelineError: raised to run's caller)
    SETTINGS,
    PipelineError,
    _check_not_interrupted,
    _check_run_args,
    _data,
    _first_line,
    _load_keras,
    _resume_settings,
    _teacher,
)

MIN_STEPS = 40
#: Bytes a weight takes in the files of each --quantize (dynamic: int8 weights).
BYTES_PER_PARAM = {"none": 4, "float16": 2, "dynamic": 1, "int8": 1}


def run(dataset="fashion_mnist", model="reference_cnn", out="dkdp_run", *,
        max_params=None, max_bytes=None, max_macs=None, max_latency_ms=None,
        importance="taylor", granularity="unit", lambda_kd=1.0, temperature=4.0,
        epochs=15, batch_size=None, quantize="int8", seed=0, quick=False,
        no_dense=False, resume=None):
    """Run `dkdp run` with these options; returns what OUT/metrics.json holds.

    Args:
        dataset: one of "fashion_mnist", "mnist", "cifar10", "digits", or a
            .npz path (x_train, y_train, x_test, y_test).
        model: "reference_cnn", "lenet_300_100", or a .keras path.
        out: the directory for the report, models, files and backups.
        max_params, max_bytes, max_macs, max_latency_ms: the budget
            (default: 10% of the teacher's parameters). `max_latency_ms` is
            the float32 file's batch-1 LiteRT time on this machine, as a
            plane fitted before training to the teacher timed at eight widths
            (`dkdp_keras.latency`); an int8 file runs faster. `max_bytes` counts
            the weights at the bytes `quantize` stores them in (1 for
            "int8" and "dynamic", 2 for "float16", 4 for "none"); with it,
            widths step one unit at a time and the compacted teacher keeps
            no zero channel, so the file is the budget plus its scales,
            biases and graph (about 7 kB for reference_cnn in int8).
        importance, granularity, lambda_kd, temperature: of the DKDP fit.
        epochs, batch_size, seed: of both trainings (batch_size default:
            128, or smaller so that an epoch has at least 40 steps).
        quantize: "none", "dynamic", "float16" or "int8", of the .tflite files.
        quick: a small run (10,000 images, at most 6 epochs).
        no_dense: skip the dense baseline.
        resume: continue the interrupted run in this directory with its
            saved settings; any other argument not left to its default must
            agree with them.

    Raises:
        PipelineError: bad input, in one line, before anything trains.

    Example:

    ```python
    import dkdp_keras.pipeline
    metrics = dkdp_keras.pipeline.run(dataset="digits", model="lenet_300_100",
                                      epochs=2, no_dense=True, quantize="none",
                                      out="digits_run")
    print(metrics["models"][0]["tflite_acc"])
    ```
    """
    given = dict(locals())
    given.update({name: os.fspath(value) for name, value in given.items()
                  if isinstance(value, os.PathLike)})  # dataset, model, out, resume
    defaults = inspect.signature(run).parameters
    explicit = {name for name, value in given.items() if name != "resume" and not (
        value is defaults[name].default or (type(value) is type(defaults[name].default)
                                            and value == defaults[name].default))}
    return _run(types.SimpleNamespace(**given, checkpoint=None), explicit)


def _run(args, explicit):
    """What `run` and `dkdp run` do with the options in `args`, a namespace
    (its `checkpoint` tells an interruption what the last epoch left);
    `explicit`: the options given, not left to their defaults. Returns the
    metrics."""
    resuming = args.resume is not None
    if resuming:
        _resume_settings(args, explicit)
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
    # A byte budget is of the files written: weights at the bytes --quantize
    # stores them in, widths in steps of one unit and no zero channels kept
    # for XNNPACK (steps of 16 left 30% of a 25 kB int8 budget unused).
    align = 1 if args.max_bytes is not None else dkdp.compaction.ALIGN
    try:
        # A latency is of the file this run writes: fitted on LiteRT here.
        budget = dkdp.Budget(**{k: v for k, v in limits.items() if v is not None},
                             bytes_per_param=BYTES_PER_PARAM[args.quantize],
                             latency_fit="litert" if args.max_latency_ms else None)
        model = dkdp.DKDPModel(teacher, lambda_kd=args.lambda_kd,
                               temperature=args.temperature)
        callback = dkdp.DKDPCallback(
            importance=criterion, granularity=args.granularity, unit_multiple=align,
            threshold=dkdp.thresholds.Adaptive(budget, tolerance=0.005))
        # Before the dense baseline trains: what fit would refuse at its start.
        callback.check_budget(model)
    except (ValueError, TypeError) as error:
        raise PipelineError(_first_line(error)) from None
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not resuming:
            _clear_finished(out)
            (out / "settings.json").write_text(json.dumps(_saved_settings(args), indent=2))
    except OSError as error:  # checked up front; this is a race or a full disk
        raise PipelineError(f"--out {args.out}: {_first_line(error)}") from None
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

    small = model.compact_teacher(align=align)
    model.save(out / "dkdp_model.keras")
    small.save(out / "teacher_compact.keras")
    model.student.save(out / "student.keras")
    models = [("pruned teacher (compacted)", "teacher", small),
              ("student", "student", model.student)]
    if dense is not None:
        models.insert(0, ("dense teacher", "dense", dense))
    rows = _export(models, args, out, x[:500], (xt, yt))
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
    steps = int((len(x) + args.batch_size - 1) // args.batch_size)
    events = _events_table(callback.history, steps, callback.normalize)
    _write_report(out, args.quantize, metrics, events, summary)
    return metrics


def _export(models, args, out, representative, test):
    """Each (name, stem, model) to OUT/stem.tflite and its report; the rows
    of the report's table."""
    import dkdp_keras as dkdp

    rows = []
    for name, stem, net in models:
        kwargs = {}
        if args.quantize == "int8":
            kwargs["representative_data"] = representative
        # The agreement with Keras is reported, not enforced, so that a run
        # always ends with its files; the table shows it.
        report = dkdp.export_tflite(
            net, out / f"{stem}.tflite",
            quantize=None if args.quantize == "none" else args.quantize,
            check_data=test, latency_runs=50, min_top1_agreement=0.0,
            max_abs_diff=1e30, **kwargs)
        (out / f"{stem}.export.json").write_text(json.dumps(report.as_dict(), indent=2))
        rows.append({"model": name, "file": f"{stem}.tflite", "params": net.count_params(),
                     "macs": dkdp.count_macs(net, nonzero=False),
                     "tflite_acc": report.accuracy, "tflite_bytes": report.bytes,
                     "agreement": report.top1_agreement,
                     "latency_ms": report.latency_ms})
    return rows


def _write_report(out, quantize, metrics, events, summary):
    """The plots, report.md and, last, metrics.json (the mark of a finished
    run); then the backups go."""
    rows, dense_params = metrics["models"], metrics["dense_params"]
    _history_plot(metrics["history"], out / "training.png", metrics["dense_history"])
    _size_plot(rows, out / "size_accuracy.png", quantize)
    table = ("| model | params | MACs | TFLite acc | agrees with Keras | TFLite bytes "
             "| latency ms |\n|---|---:|---:|---:|---:|---:|---:|\n" + "".join(
                 f"| {r['model']} | {r['params']:,} | {r['macs']:,} | {r['tflite_acc']:.2%} "
                 f"| {r['agreement']:.2%} | {r['tflite_bytes']:,} | {r['latency_ms']:.3f} |\n"
                 for r in rows))
    (out / "report.md").write_text(
        f"# dkdp run\n\n{table}\nDense teacher: {dense_params:,} parameters. "
        f"Training: {metrics['train_s']:.0f} s. Files: `.tflite` ({quantize}), "
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



def _default_batch_size(examples):
    """128, or smaller so that an epoch has at least MIN_STEPS steps: with
    few steps, BatchNormalization's moving statistics (momentum 0.99) stay
    near their initial values and inference-mode accuracy is near chance."""
    batch = 128
    while batch > 8 and examples < batch * MIN_STEPS:
        batch //= 2
    return batch



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


