"""The `dkdp` command: parsing and dispatch.

    dkdp run [--dataset fashion_mnist] [--model reference_cnn] [--quick] ...
    dkdp run --resume DIR
    dkdp export MODEL.keras --out FILE.tflite [--quantize int8]
    dkdp inspect MODEL.keras

Bad input exits with status 2 and one line that names the bad value.

What `dkdp run` does (a dense baseline, the DKDP model, the exports, the
report; resumable after an interruption) is `dkdp_keras.pipeline.run`,
callable from Python with the same options.
"""

import argparse
import json
import os
import pathlib
import sys

from dkdp_keras import pipeline
from dkdp_keras._inputs import (
    DATASETS,
    GRANULARITY,
    MODELS,
    QUANTIZE,
    _check_out_dir,
    _check_out_file,
    _data,
    _first_line,
    _load_keras,
)
from dkdp_keras.pipeline import MIN_STEPS, PipelineError

#: Bad command-line input: reported in one line, exit status 2.
UsageError = PipelineError


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
    run.add_argument("--max-bytes", type=float, default=None,
                     help="bytes of weights as --quantize stores them (1 a weight for "
                          "int8 and dynamic, 2 for float16, 4 for none); widths then "
                          "step one unit at a time, for a file of about this size "
                          "plus its scales and graph")
    run.add_argument("--max-macs", type=float, default=None)
    run.add_argument("--max-latency-ms", type=float, default=None,
                     help="batch-1 LiteRT time of the float32 file on this machine, "
                          "estimated from a plane fitted before training to the teacher "
                          "timed at eight widths (an int8 file runs faster)")
    run.add_argument("--importance", default="taylor")
    run.add_argument("--granularity", default="unit", choices=GRANULARITY)
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




def _explicit_run_options(argv):
    """The `dkdp run` options that `argv` gives (not left to their default)."""
    run = _parser().run_parser
    unset = object()
    names = vars(run.parse_args([]))
    given = run.parse_args(argv[argv.index("run") + 1:],
                           namespace=argparse.Namespace(**{n: unset for n in names}))
    return {name for name, value in vars(given).items() if value is not unset}


def cmd_run(args):
    """`dkdp_keras.pipeline.run` with the parsed options; `args.checkpoint`
    tells `main` what an interruption leaves."""
    pipeline._run(args, getattr(args, "explicit", set()))
    return 0


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
