"""The `dkdp` command: compress a model end to end and write a report.

    dkdp run [--dataset fashion_mnist] [--model reference_cnn] [--quick] ...
    dkdp export MODEL.keras --out FILE.tflite [--quantize int8]
    dkdp inspect MODEL.keras

Bad input exits with status 2 and one line that names the bad value.
"""

import argparse
import json
import os
import pathlib
import sys
import time

DATASETS = ("fashion_mnist", "mnist", "cifar10")
MODELS = ("reference_cnn", "lenet_300_100")
QUANTIZE = ("none", "dynamic", "float16", "int8")


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
    run.add_argument("--batch-size", type=int, default=128)
    run.add_argument("--quantize", default="int8", choices=QUANTIZE)
    run.add_argument("--out", default="dkdp_run")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--quick", action="store_true",
                     help="a small run (10,000 images, at most 6 epochs): same pipeline")

    export = sub.add_parser("export", help="convert a .keras model to .tflite")
    export.add_argument("model")
    export.add_argument("--out", required=True)
    export.add_argument("--quantize", default="none", choices=QUANTIZE)
    export.add_argument("--dataset", default="fashion_mnist",
                        help="representative and check data for the file")

    inspect = sub.add_parser("inspect", help="importance and sparsity of a .keras model")
    inspect.add_argument("model")
    inspect.add_argument("--importance", default="magnitude")
    inspect.add_argument("--out", default=None, help="directory for the plots")

    sub.add_parser("bench", help="run the benchmark protocol (coming)")
    return parser


def _load_keras(path):
    import keras

    import dkdp_keras  # noqa: F401  (registers the masked layers)

    if not os.path.isfile(path):
        raise UsageError(f"no model file at {path!r}")
    try:
        return keras.saving.load_model(path)
    except Exception as error:  # unreadable, not a .keras file, ...
        raise UsageError(f"cannot read {path!r} as a Keras model: {error}") from None


def _data(name, quick):
    from dkdp_keras import datasets

    if not (name in DATASETS or name.endswith(".npz")):
        raise UsageError(
            f"unknown dataset {name!r}: use one of {', '.join(DATASETS)} or a .npz path"
        )
    try:
        (x, y), (xt, yt) = datasets.load(name, as_numpy=True)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    (x, y), (xv, yv) = datasets.validation_split(x, y, size=min(5000, len(x) // 10))
    if quick:
        x, y, xv, yv, xt, yt = x[:10000], y[:10000], xv[:2000], yv[:2000], xt[:2000], yt[:2000]
    return (x, y), (xv, yv), (xt, yt)


def _teacher(name, input_shape, classes):
    from dkdp_keras import zoo

    if name in MODELS:
        return getattr(zoo, name)(input_shape=input_shape, num_classes=classes)
    if name.endswith(".keras"):
        model = _load_keras(name)
        if tuple(model.inputs[0].shape[1:]) != tuple(input_shape):
            raise UsageError(
                f"model {name!r} takes inputs of shape {tuple(model.inputs[0].shape[1:])}, "
                f"the dataset has {tuple(input_shape)}"
            )
        return model
    raise UsageError(f"unknown model {name!r}: use one of {', '.join(MODELS)} or a .keras path")


def _pipeline(x, y, batch, seed):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch).repeat().prefetch(tf.data.AUTOTUNE)


IMPORTANCE = ("magnitude", "gradient", "gradient_magnitude", "taylor", "activation",
              "activation_frequency", "learned_mask")


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
    if args.model.endswith(".keras") and not os.path.isfile(args.model):
        raise UsageError(f"no model file at {args.model!r}")
    if args.importance.lower() not in IMPORTANCE:
        raise UsageError(
            f"Unknown importance criterion {args.importance!r}; known names: "
            f"{', '.join(IMPORTANCE)}"
        )
    if args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    for name in ("max_params", "max_bytes", "max_macs", "max_latency_ms"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {value:g}")
        if value is not None and float(value).is_integer():
            setattr(args, name, int(value))


def cmd_run(args):
    _check_run_args(args)
    import keras

    import dkdp_keras as dkdp

    criterion = dkdp.importance.get(args.importance)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.epochs = min(args.epochs, 6)
    keras.utils.set_random_seed(args.seed)
    (x, y), (xv, yv), (xt, yt) = _data(args.dataset, args.quick)
    classes = int(max(y.max(), yt.max()) + 1)
    teacher = _teacher(args.model, x.shape[1:], classes)
    dense_params = teacher.count_params()
    limits = dict(max_params=args.max_params, max_bytes=args.max_bytes,
                  max_macs=args.max_macs, max_latency_ms=args.max_latency_ms)
    if all(v is None for v in limits.values()):
        limits["max_params"] = dense_params // 10
    budget = dkdp.Budget(**{k: v for k, v in limits.items() if v is not None})
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = dkdp.DKDPModel(teacher, lambda_kd=args.lambda_kd, temperature=args.temperature)
    try:
        budget.check_feasible(model.teacher)
    except ValueError as error:
        raise UsageError(str(error)) from None
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    callback = dkdp.DKDPCallback(
        importance=criterion, granularity=args.granularity,
        threshold=dkdp.thresholds.Adaptive(budget, tolerance=0.005))
    checkpoint = keras.callbacks.ModelCheckpoint(str(out / "checkpoint.keras"))
    steps = int((len(x) + args.batch_size - 1) // args.batch_size)
    print(f"dkdp run: {args.model} on {args.dataset}, {len(x):,} training images, "
          f"{args.epochs} epochs, budget {budget}", flush=True)
    start = time.perf_counter()
    history = model.fit(_pipeline(x, y, args.batch_size, args.seed), steps_per_epoch=steps,
                        epochs=args.epochs, validation_data=(xv, yv),
                        callbacks=[callback, checkpoint], verbose=1)
    train_s = time.perf_counter() - start

    small = model.compact_teacher()
    model.save(out / "dkdp_model.keras")
    small.save(out / "teacher_compact.keras")
    model.student.save(out / "student.keras")
    rows = []
    for name, net in (("pruned teacher (compacted)", small), ("student", model.student)):
        stem = "teacher" if name.startswith("pruned") else "student"
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
        rows.append({"model": name, "params": net.count_params(),
                     "macs": dkdp.count_macs(net, nonzero=False),
                     "tflite_acc": report.accuracy, "tflite_bytes": report.bytes,
                     "agreement": report.top1_agreement,
                     "latency_ms": report.latency_ms})
    metrics = {"settings": {k: v for k, v in vars(args).items()},
               "dense_params": dense_params, "train_s": train_s,
               "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
               "models": rows}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    summary = dkdp.report.importance_summary(model, criterion="magnitude", out_dir=out)
    _history_plot(history.history, out / "training.png")
    table = ("| model | params | MACs | TFLite acc | agrees with Keras | TFLite bytes "
             "| latency ms |\n|---|---:|---:|---:|---:|---:|---:|\n" + "".join(
                 f"| {r['model']} | {r['params']:,} | {r['macs']:,} | {r['tflite_acc']:.2%} "
                 f"| {r['agreement']:.2%} | {r['tflite_bytes']:,} | {r['latency_ms']:.3f} |\n"
                 for r in rows))
    tau = ", ".join(f"{h['tau']:.3g}@{h['step']}" for h in callback.history)
    (out / "report.md").write_text(
        f"# dkdp run\n\n{table}\nDense teacher: {dense_params:,} parameters. "
        f"Training: {train_s:.0f} s.\n\nSettings: `{json.dumps(metrics['settings'], default=str)}`\n\n"
        f"τ over pruning events (value@step): {tau}\n\n## Layers\n\n{summary.markdown}\n"
        "![training](training.png)\n![layers](layer_sparsity.png)\n"
        "![importance](importance_histograms.png)\n")
    print("\n" + table + f"\nWrote {out}/report.md, metrics.json, plots, .keras and .tflite files.")
    return 0


def _history_plot(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key in ("val_teacher_accuracy", "val_student_accuracy"):
        if key in history:
            a.plot(range(1, len(history[key]) + 1), history[key], label=key)
    a.set_xlabel("epoch"); a.set_ylabel("accuracy"); a.legend(fontsize=8)  # noqa: E702
    if "sparsity" in history:
        b.plot(range(1, len(history["sparsity"]) + 1), history["sparsity"], color="tab:red")
    b.set_xlabel("epoch"); b.set_ylabel("teacher sparsity")  # noqa: E702
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_export(args):
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
            model, args.out, quantize=None if args.quantize == "none" else args.quantize, **kwargs)
    except (ValueError, FileNotFoundError, PermissionError) as error:
        raise UsageError(str(error)) from None
    print(json.dumps(report.as_dict(), indent=2))
    return 0


def cmd_inspect(args):
    import dkdp_keras as dkdp

    model = _load_keras(args.model)
    try:
        summary = dkdp.report.importance_summary(model, args.importance, out_dir=args.out)
    except ValueError as error:
        raise UsageError(str(error)) from None
    print(summary.markdown)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
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
        print("dkdp: 'bench' is not available yet in this version; "
              "see benchmarks/ for the measurement scripts.", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        return {"run": cmd_run, "export": cmd_export, "inspect": cmd_inspect}[args.command](args)
    except UsageError as error:
        print(f"dkdp {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ndkdp {args.command}: interrupted; the last completed epoch is in "
              "checkpoint.keras in the output directory.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
