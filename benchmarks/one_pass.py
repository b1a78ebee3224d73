"""Batch-1 latencies of several `.tflite` files timed in one pass, as ratios
to the first file, repeated.

A ledger's rows are timed in separate passes, each beside its own dense
reference; this machine's speed has two states (RESULTS.md, 2026-12-07,
second), so two rows' ratios can differ by several percent for the same
file. Comparisons between rows whose ratios are close (DKDP's structured
files against keras.distillation's students on the latency plot) are
checked here in one pass instead.

With `--pause`, training processes of the benchmark (`train_keras3.py`,
`train_tfmot.py`, `run.py`) are stopped (SIGSTOP) for the time of the
measurement and continued after, so that a queue does not have to end for
a file to be timed on an idle machine.

    python benchmarks/one_pass.py DIR dense.tflite kd-w0.35.tflite ... [--reps 3] [--pause] [--out F]
"""
import argparse
import json
import os
import signal
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

TRAINING = ("train_keras3.py", "train_tfmot.py", "run.py")


def training_processes():
    import psutil

    me = os.getpid()
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["pid"] != me and "python" in cmd and any(t in cmd for t in TRAINING):
            found.append(p)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir")
    parser.add_argument("files", nargs="+", help="the first is the reference of the ratios")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--pause", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import psutil

    from dkdp_keras.export import measure_tflite_latencies_ms

    paths = [os.path.join(args.dir, f) for f in args.files]
    paused = training_processes() if args.pause else []
    reps = []
    try:
        for p in paused:
            p.send_signal(signal.SIGSTOP)
        time.sleep(3)
        busy = psutil.cpu_percent(interval=2)
        print(f"{len(paused)} training processes paused; {busy:.0f}% of the CPUs busy", flush=True)
        for rep in range(args.reps):
            ms = measure_tflite_latencies_ms(paths, runs=args.runs, warmup=args.runs // 10)
            reps.append(ms)
            print(f"pass {rep}: " + ", ".join(f"{f} {m / ms[0]:.3f}x"
                                               for f, m in zip(args.files, ms)), flush=True)
    finally:
        for p in paused:
            p.send_signal(signal.SIGCONT)
    from run import machine

    record = {"machine": machine(), "dir": args.dir, "files": args.files, "b1_ms": reps,
              "cpu_busy_pct_before": busy, "ratios": [[m / ms[0] for m in ms] for ms in reps],
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
