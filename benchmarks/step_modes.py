"""How steady one training step's time is on this machine, process to process.

Starts `--runs` processes one after another, each training the benchmark's
dense `--model` on the protocol's batches for `--steps` steps after five
untimed ones, and prints each process's seconds a step. With `--inter N`
every other process runs with TensorFlow's inter-op thread pool set to N
threads (`TF_NUM_INTEROP_THREADS`), the others with TensorFlow's default,
so that the two settings alternate. Time it on an idle machine.

    python benchmarks/step_modes.py --model mobilenet_v2 --steps 25 --runs 6 --inter 1

Why (issue 23): the paired training times spread more than their code can
explain. On the 2-core AVX2 machine of 2026-12-07 a step took one of two
values, each repeating to the millisecond: reference_cnn 0.137-0.150 or
0.171 s, MobileNetV2 0.41-0.47 or 0.819 s, with either inter-op setting
(RESULTS.md, "2026-12-07, second").

`--work` must hold the benchmark's data.npz (default: the full run's).
"""

import argparse
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


def one(args):
    sys.path.insert(0, str(HERE))
    import keras
    import train_keras3 as tk

    run = tk.Run(args.work, args.model, 1, 128)
    keras.utils.set_random_seed(0)
    model = run.build()
    tk.compile_(model)
    data = run.pipeline().repeat()
    model.fit(data, steps_per_epoch=5, epochs=1, verbose=0)  # tracing, not timed
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)
    seconds = (time.perf_counter() - start) / args.steps
    threads = len(os.listdir(f"/proc/{os.getpid()}/task")) if os.path.isdir("/proc") else None
    print(f"{os.environ.get('TF_NUM_INTEROP_THREADS', 'default'):>7} inter-op, "
          f"{threads} threads: {seconds:.3f} s a step", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="reference_cnn")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--inter", type=int, default=None,
                        help="inter-op threads of every other process (default: all default)")
    parser.add_argument("--work", default=str(HERE / "work" / "v2"))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args)
    for i in range(args.runs):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        if args.inter is not None and i % 2 == 0:
            env["TF_NUM_INTEROP_THREADS"] = str(args.inter)
        subprocess.run([sys.executable, __file__, "--one", "--model", args.model,
                        "--steps", str(args.steps), "--work", args.work], env=env, check=True)


if __name__ == "__main__":
    main()
