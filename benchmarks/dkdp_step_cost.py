"""Where a DKDP training step's time goes, against a plain Keras step.

Four models train on the same batches, in blocks of `--block` steps taken in
turn (dense, masked, dkdp-tiny, dkdp, dense, ...), so that the machine's
drift between minutes falls on all of them alike:

- `dense`: the reference model, plain Keras;
- `masked`: the same model made prunable (`dkdp_keras.prunable`), plain
  Keras: the cost of the masks alone;
- `dkdp-tiny`: a DKDPModel whose student is one Dense layer: the cost of
  DKDP's step without a real student (the distillation loss, the second
  optimizer, the finiteness check, the extra logs);
- `dkdp`: a DKDPModel with its defaults (the width-0.25 student).

Each step runs `model.train_function` on the next batch of a cached
dataset, as `fit` does, without the per-step work of `fit` itself (its
callbacks and logs), which is the same for all four; the first 30 steps
(tracing) are left out. Gradient statistics are off, as under the magnitude
criterion of the benchmark's unstructured runs. Prints the median and the
fastest block per step, and their ratios to `dense`.

    python benchmarks/dkdp_step_cost.py --model lenet_300_100

With `--ops` it times nothing: it counts the operations of one traced
training step of each model (its branches included; constants, placeholders
and identities left out), which a busy machine cannot change:

    python benchmarks/dkdp_step_cost.py --model lenet_300_100 --ops

(`step_cost.py` times the forward and backward passes of each model alone,
without optimizers.)
"""

import argparse
import collections
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dkdp_keras as dkdp  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from train_keras3 import compile_  # noqa: E402  (the protocol's optimizer, loss, metrics)

SYSTEMS = ("dense", "masked", "dkdp-tiny", "dkdp")


def tiny_student(teacher):
    inputs = keras.Input(teacher.inputs[0].shape[1:])
    outputs = keras.layers.Dense(teacher.outputs[0].shape[-1])(
        keras.layers.Flatten()(inputs))
    return keras.Model(inputs, outputs, name="tiny_student")


def build(system, model_name):
    keras.utils.set_random_seed(0)
    teacher = getattr(dkdp.zoo, model_name)()
    if system == "dense":
        model = teacher
    elif system == "masked":
        model = dkdp.prunable(teacher)
    else:
        student = tiny_student if system == "dkdp-tiny" else "auto"
        model = dkdp.DKDPModel(teacher, student=student)
    compile_(model)
    if isinstance(model, dkdp.DKDPModel):
        model.request_statistics(())
    return model


#: Graph nodes that do no work when a step runs.
FREE_OPS = {"Const", "Placeholder", "Identity", "NoOp"}


def step_ops(model, x, y):
    """The operations of one training step of `model` on a batch shaped like
    `x`, `y`, by type: the step's graph and the functions it calls (the
    branches of a `tf.cond`), without the FREE_OPS."""
    model.train_on_batch(x, y)  # builds the optimizer's and metrics' state
    spec = (tf.TensorSpec(x.shape, x.dtype), tf.TensorSpec(y.shape, y.dtype))
    graph = tf.function(model.train_step).get_concrete_function(spec).graph.as_graph_def()
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    return collections.Counter(n.op for n in nodes if n.op not in FREE_OPS)


def print_ops(model_name, x, y):
    counts = {s: step_ops(build(s, model_name), x, y) for s in SYSTEMS}
    print(f"{model_name}, batch {len(x)}: operations of one training step\n")
    print("| model | operations | × dense | most added over dense |")
    print("|---|---:|---:|---|")
    dense = counts["dense"]
    for s in SYSTEMS:
        total = sum(counts[s].values())
        added = ", ".join(f"{op} {n}" for op, n in (counts[s] - dense).most_common(6))
        print(f"| {s} | {total} | {total / sum(dense.values()):.2f} | {added} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet_300_100")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=50, help="steps per timed block")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--ops", action="store_true",
                        help="count each step's operations instead of timing it")
    args = parser.parse_args()
    (x, y), _ = dkdp.datasets.load("fashion_mnist", as_numpy=True)
    x, y = x[: args.batch * 20], y[: args.batch * 20]
    if args.ops:
        print_ops(args.model, x[: args.batch], y[: args.batch])
        return

    runs = {}
    for system in SYSTEMS:
        model = build(system, args.model)
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch)
        iterator = iter(data.cache().repeat())
        model.make_train_function()
        for _ in range(30):
            model.train_function(iterator)
        runs[system] = (model, iterator)

    times = {system: [] for system in SYSTEMS}
    for r in range(args.rounds):
        for system in SYSTEMS:
            model, iterator = runs[system]
            start = time.perf_counter()
            for _ in range(args.block):
                logs = model.train_function(iterator)
            # Wait for the last step: its logs are its last outputs.
            [np.asarray(v) for v in tf.nest.flatten(logs)]
            times[system].append((time.perf_counter() - start) / args.block * 1000)
        print(f"round {r + 1}/{args.rounds}", end="\r", flush=True)
    print()

    median = {s: float(np.median(t)) for s, t in times.items()}
    fastest = {s: float(np.min(t)) for s, t in times.items()}
    print(f"{args.model}, batch {args.batch}: ms per training step, "
          f"{args.rounds} blocks of {args.block} steps each\n")
    print("| model | median ms | × dense | fastest ms | × dense |")
    print("|---|---|---|---|---|")
    for s in SYSTEMS:
        print(f"| {s} | {median[s]:.2f} | {median[s] / median['dense']:.2f} "
              f"| {fastest[s]:.2f} | {fastest[s] / fastest['dense']:.2f} |")


if __name__ == "__main__":
    main()
