"""Cost of one DKDP epoch against one epoch of plain teacher training.

Protocol settings (../shared/benchmark/PROTOCOL.md): reference_cnn,
Fashion-MNIST, 55,000 training images, batch 128, Adam 1e-3, seed 0.
`dense` is the plain Keras model; `dkdp` is a DKDPModel with the library's
default student and a DKDPCallback as the benchmark runs it: an Adaptive
threshold to 10% of the parameters, magnitude scores for `--granularity
weight`, Taylor scores (gradient statistics collected) for `unit`; its
epoch-end pruning decisions are included. Each
system trains `--epochs` epochs, twice, alternating, in this one process; the
first epoch of each run (graph tracing) is left out and the ratio is that of
the medians of the others.

Both systems read one repeated, shuffled tf.data pipeline (one iterator for
the whole fit, `steps_per_epoch` batches per epoch). With a new iterator per
epoch (numpy arrays, or a finite dataset) TF 2.21 / Keras 3.15 here stall the
first step of some epochs for seconds (up to 15 s for DKDP's larger graph,
4 s seen for dense), which would measure that stall, not the training work.

    python benchmarks/epoch_cost.py --epochs 3
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dkdp_keras as dkdp  # noqa: E402


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self.start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--model", default="reference_cnn")
    parser.add_argument("--width", type=float, default=None,
                        help="student width (default: the library's)")
    parser.add_argument("--granularity", default="unit", choices=("weight", "unit"))
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    (x, y), _ = dkdp.datasets.load("fashion_mnist", as_numpy=True)
    (x, y), (xv, yv) = dkdp.datasets.validation_split(x, y)
    steps = int(np.ceil(len(x) / 128))

    def pipeline():
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        ds = ds.shuffle(len(x), seed=0, reshuffle_each_iteration=True)
        return ds.batch(128).repeat().prefetch(tf.data.AUTOTUNE)

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    build = getattr(dkdp.zoo, args.model)
    results = {}
    for system in ("dense", "dkdp", "dense", "dkdp"):
        keras.utils.set_random_seed(0)
        if system == "dense":
            model = build()
            model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss,
                          metrics=["accuracy"], jit_compile=False)
        else:
            options = {} if args.width is None else {"student_width": args.width}
            model = dkdp.DKDPModel(build(), **options)
            model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss,
                          metrics=["accuracy"])
        timer = EpochTimer()
        callbacks = [timer]
        if system == "dkdp":
            budget = dkdp.Budget(max_params=build().count_params() // 10)
            callbacks.insert(0, dkdp.DKDPCallback(
                importance="magnitude" if args.granularity == "weight" else "taylor",
                granularity=args.granularity, verbose=0,
                threshold=dkdp.thresholds.Adaptive(budget)))
        # Both validate on the same images each epoch, as the benchmark does.
        model.fit(pipeline(), steps_per_epoch=steps, epochs=args.epochs,
                  validation_data=(xv, yv), verbose=0, callbacks=callbacks)
        results.setdefault(system, []).extend(timer.times[1:])
        print(system, ["%.1f" % t for t in timer.times], flush=True)
    dense = float(np.median(results["dense"]))
    ours = float(np.median(results["dkdp"]))
    result = json.dumps({
        "model": args.model, "granularity": args.granularity,
        "student_width": args.width or dkdp.DKDPModel(build()).student_width,
        "dense_epoch_s": round(dense, 2), "dkdp_epoch_s": round(ours, 2),
        "ratio": round(ours / dense, 3),
    })
    print(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(result + "\n")


if __name__ == "__main__":
    main()
