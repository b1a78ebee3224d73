"""Training wall time of DKDP against dense, in pairs of runs, and where it goes.

Each run is one process, as in the benchmark: `Run.fit` of
`benchmarks/train_keras3.py` (the protocol's data, pipeline and timer) trains
the dense model, then DKDP with the library's defaults at one budget, then
the dense model again, and so on, `--pairs` times, so that the machine's
drift between minutes falls on both. Besides the benchmark's `train_s`, each
run reports the seconds spent validating (`on_test_begin` to `on_test_end`)
and, for DKDP, in `DKDPCallback.on_epoch_end` (pruning decisions, averaging,
state). Prints one line per run and a table of the ratios (and writes them
to `--out` as JSON).

    python benchmarks/paired_times.py --model lenet_300_100 --target 0.9 --pairs 3
    python benchmarks/paired_times.py --model mobilenet_v2 --structured macs:0.3
    python benchmarks/paired_times.py --model reference_cnn --system tfmot --target 0.95

`--system tfmot` pairs TFMOT (train_tfmot.py) with the same tf_keras model
trained without it: TFMOT's own cost ratio, which DKDP's must not exceed.
`--system prune` pairs dense with DKDP's pruning alone: the same callback on
`dkdp_keras.prunable(model)`, no student. With `mutual=False` (the default)
the student's loss never reaches the teacher, so this is what the pruned
model costs when the student is not wanted. Keras 3 runs also report their
(teacher's) accuracy on the test images.

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
    import numpy as np
    import train_keras3 as tk

    import dkdp_keras as dkdp

    spent = {"validation_s": 0.0, "epoch_end_s": 0.0}
    epoch_s = []  # each epoch's seconds, its validation and epoch-end work included

    class Hooks(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_s.append(round(time.perf_counter() - self.epoch_start, 2))

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
        # As the benchmark builds its runs (system_dkdp); `prune` without
        # the student, its averaging checked on the same validation data.
        model = (dkdp.DKDPModel(run.build()) if args.system == "dkdp"
                 else dkdp.prunable(run.build()))
        spec = args.structured or f"params:{1 - args.target:g}"
        budget, _ = tk.structured_budget(spec, run.build())
        defaults = argparse.Namespace(importance=None, initial_step=None, finish_by=None)
        granularity = "unit" if args.structured else "weight"
        callback, _ = tk.dkdp_callback(granularity, budget, defaults, run)
        if args.system == "prune":
            callback.validation_data = (run.xv, run.yv)
        original = callback.on_epoch_end

        def timed(epoch, logs=None):
            start = time.perf_counter()
            original(epoch, logs)
            spent["epoch_end_s"] += time.perf_counter() - start

        callback.on_epoch_end = timed
        callbacks.insert(0, callback)
    tk.compile_(model)
    train_s = run.fit(model, callbacks)
    network = model.teacher if args.system == "dkdp" else model
    test_acc = float(np.mean(np.argmax(network.predict(run.xt, verbose=0), -1) == run.yt))
    print(json.dumps({"system": args.system, "train_s": round(train_s, 2),
                      **{k: round(v, 2) for k, v in spent.items()},
                      "test_acc": round(test_acc, 4), "epoch_s": epoch_s}), flush=True)


def commands(args, system):
    """The one-process command of `system` in a pair: Keras 3 dense and DKDP
    through this file's `one_run`; TFMOT and its own dense baseline (the
    tf_keras model without TFMOT's wrappers) through train_tfmot.py."""
    if args.system == "tfmot":
        target = "0" if system == "dense" else str(args.target)
        return ([sys.executable, str(HERE / "train_tfmot.py"), args.work, "--model", args.model,
                 "--targets", target, "--epochs", str(args.epochs), "--time-only"],
                dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3"))
    cmd = [sys.executable, __file__, "--one", system, "--model", args.model,
           "--target", str(args.target), "--epochs", str(args.epochs), "--work", args.work]
    if args.structured:
        cmd += ["--structured", args.structured]
    return cmd, None


def done_pairs(out, what, here):
    """The pairs an earlier, interrupted run of the same measurement wrote to
    `out`, to go on from; none when `out` is unset or absent. A file of
    another measurement or machine is refused rather than mixed in: ratios
    hold only within one machine."""
    if not out or not pathlib.Path(out).exists():
        return []
    old = json.loads(pathlib.Path(out).read_text())
    differ = {k: (old.get(k), v) for k, v in what.items() if old.get(k) != v}
    if old.get("machine") not in (None, here):
        differ["machine"] = (old.get("machine"), here)
    if differ:
        raise SystemExit(f"{out} holds another measurement ({differ}, as (file, now)): "
                         "pass another --out, or remove it to start again.")
    print(f"going on from {out}: {len(old['pairs'])} pair(s) done", flush=True)
    return old["pairs"]


def ratios_of(rows, system):
    """Each pair's training time of `system` over dense's."""
    return [r[system]["train_s"] / r["dense"]["train_s"] for r in rows]


def write(out, what, here, rows, system):
    """Write the pairs so far to `out` (a temporary file renamed over it, so
    that an interrupt leaves the last complete file)."""
    if not out:
        return
    ratios = ratios_of(rows, system)
    path = pathlib.Path(out)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**what, "machine": here, "pairs": rows, "ratios": ratios,
                               "median": statistics.median(ratios)}, indent=1))
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet_300_100")
    parser.add_argument("--system", choices=("dkdp", "prune", "tfmot"), default="dkdp",
                        help="dkdp: against Keras 3 dense; prune: DKDP's pruning without "
                             "the student, against Keras 3 dense; tfmot: against the same "
                             "model in tf_keras without TFMOT (TFMOT's own ratio)")
    parser.add_argument("--target", type=float, default=0.9,
                        help="sparsity target (unstructured DKDP: of the parameters; TFMOT: "
                             "of the kernels)")
    parser.add_argument("--structured", default=None,
                        help="a structured DKDP budget instead (params:F, macs:F, int8:BYTES)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--work", default=str(HERE / "work" / "v2"))
    parser.add_argument("--out", default=None,
                        help="also write the pairs here as JSON, after each pair; run again "
                             "with the same --out to go on from the pairs it holds")
    parser.add_argument("--one", choices=("dense", "dkdp", "prune"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.system = args.one
        return one_run(args)
    if not (pathlib.Path(args.work) / "data.npz").exists():
        raise SystemExit(f"{args.work}/data.npz is missing: run benchmarks/run.py "
                         "once, or pass --work with the benchmark's data.")
    measurement = {"model": args.model, "system": args.system, "target": args.target,
                   "structured": args.structured, "epochs": args.epochs}
    here = None
    if args.out:  # the file names its machine (this imports TensorFlow)
        sys.path.insert(0, str(HERE))
        import run as protocol

        here = protocol.machine()
    rows = done_pairs(args.out, measurement, here)
    for pair in range(len(rows), args.pairs):
        row = {}
        for system in ("dense", args.system):
            cmd, env = commands(args, system)
            # Each run starts on an idle machine (with --out; psutil), and
            # says how busy it was, as the ledger's latency rows do.
            busy = protocol.wait_idle(to="time a training run") if args.out else None
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode or not lines:
                raise SystemExit(f"{system} run failed:\n{proc.stderr[-3000:]}")
            row[system] = {**json.loads(lines[-1]), "cpu_busy_pct_before": busy}
            print(f"pair {pair + 1}/{args.pairs}: {lines[-1]}", flush=True)
        rows.append(row)
        write(args.out, measurement, here, rows, args.system)
    ratios = ratios_of(rows, args.system)
    what = args.structured or f"{args.target:g}"
    print(f"\n{args.model}, {args.system} at {what}, {args.epochs} epochs: train_s "
          "(validation s, DKDP epoch-end s)\n")
    print(f"| pair | dense | {args.system} | ratio |")
    print("|---|---|---|---|")
    def spent(times):
        """The seconds validating (and in DKDP's epoch ends) of a Keras 3 run,
        in brackets; TFMOT's run reports none."""
        parts = [f"{times[key]:.1f}" for key in ("validation_s", "epoch_end_s") if key in times]
        return f" ({', '.join(parts)})" if parts else ""

    for i, (r, ratio) in enumerate(zip(rows, ratios), 1):
        d, k = r["dense"], r[args.system]
        print(f"| {i} | {d['train_s']:.1f} s{spent(d)} | {k['train_s']:.1f} s{spent(k)} "
              f"| {ratio:.2f}× |")
    median = statistics.median(ratios)
    print(f"\nmedian {median:.2f}×, range {min(ratios):.2f}–{max(ratios):.2f}×")


if __name__ == "__main__":
    main()
