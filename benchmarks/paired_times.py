"""Training wall time of DKDP against dense, in pairs of runs, and where it goes.

Each run is one process, as in the benchmark: `Run.fit` of
`benchmarks/train_keras3.py` (the protocol's data, pipeline and timer) trains
the dense model, then DKDP with the library's defaults at one budget, then
the dense model again, and so on, `--pairs` times, so that the machine's
drift between minutes falls on both. Besides the benchmark's `train_s`, each
run reports the seconds spent validating (`on_test_begin` to `on_test_end`)
and, for DKDP, in `DKDPCallback.on_epoch_end` (pruning decisions, averaging,
state). Prints one line per run and a table of the ratios; writes nothing.

    python benchmarks/paired_times.py --model lenet_300_100 --target 0.9 --pairs 3

`--work` must hold the benchmark's `data.npz` (`run.py` writes it; the
default is the full run's directory).
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


def one_run(args):
    """Train once in this process and print a JSON line of times."""
    sys.path.insert(0, str(HERE))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import train_keras3 as tk

    import dkdp_keras as dkdp

    spent = {"validation_s": 0.0, "epoch_end_s": 0.0}

    class Hooks(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            self.start = time.perf_counter()

        def on_test_end(self, logs=None):
            spent["validation_s"] += time.perf_counter() - self.start

    run = tk.Run(args.work, args.model, args.epochs, 128)
    keras.utils.set_random_seed(0)
    callbacks = [Hooks()]
    if args.system == "dense":
        model = run.build()
    else:
        # As the benchmark builds its unstructured runs (system_dkdp).
        model = dkdp.DKDPModel(run.build())
        budget, _ = tk.structured_budget(f"params:{1 - args.target:g}", run.build())
        defaults = argparse.Namespace(importance=None, initial_step=None, finish_by=None)
        callback, _ = tk.dkdp_callback("weight", budget, defaults)
        original = callback.on_epoch_end

        def timed(epoch, logs=None):
            start = time.perf_counter()
            original(epoch, logs)
            spent["epoch_end_s"] += time.perf_counter() - start

        callback.on_epoch_end = timed
        callbacks.insert(0, callback)
    tk.compile_(model)
    train_s = run.fit(model, callbacks)
    print(json.dumps({"system": args.system, "train_s": round(train_s, 2),
                      **{k: round(v, 2) for k, v in spent.items()}}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet_300_100")
    parser.add_argument("--target", type=float, default=0.9,
                        help="unstructured DKDP sparsity target (weight granularity)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--work", default=str(HERE / "work" / "full"))
    parser.add_argument("--one", choices=("dense", "dkdp"), dest="system",
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.system:
        return one_run(args)
    if not (pathlib.Path(args.work) / "data.npz").exists():
        raise SystemExit(f"{args.work}/data.npz is missing: run benchmarks/run.py "
                         "once, or pass --work with the benchmark's data.")
    rows = []
    for pair in range(args.pairs):
        row = {}
        for system in ("dense", "dkdp"):
            proc = subprocess.run(
                [sys.executable, __file__, "--one", system, "--model", args.model,
                 "--target", str(args.target), "--epochs", str(args.epochs),
                 "--work", args.work],
                capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
            if proc.returncode or not lines:
                raise SystemExit(f"{system} run failed:\n{proc.stderr[-3000:]}")
            row[system] = json.loads(lines[-1])
            print(f"pair {pair + 1}/{args.pairs}: {lines[-1]}", flush=True)
        rows.append(row)
    ratios = [r["dkdp"]["train_s"] / r["dense"]["train_s"] for r in rows]
    print(f"\n{args.model}, DKDP at {args.target:g} sparsity, {args.epochs} epochs: "
          f"train_s (validation s, DKDP epoch-end s)\n")
    print("| pair | dense | DKDP | DKDP / dense |")
    print("|---|---|---|---|")
    for i, (r, ratio) in enumerate(zip(rows, ratios), 1):
        d, k = r["dense"], r["dkdp"]
        print(f"| {i} | {d['train_s']:.1f} s ({d['validation_s']:.1f}) "
              f"| {k['train_s']:.1f} s ({k['validation_s']:.1f}, {k['epoch_end_s']:.1f}) "
              f"| {ratio:.2f}× |")
    print(f"\nmedian {statistics.median(ratios):.2f}×, range "
          f"{min(ratios):.2f}–{max(ratios):.2f}×")


if __name__ == "__main__":
    main()
