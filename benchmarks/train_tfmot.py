"""The `tfmot` system of the protocol: TensorFlow Model Optimization
Toolkit's magnitude pruning, which needs tf_keras (Keras 2).

Run by `benchmarks/run.py` in a process of its own with
TF_USE_LEGACY_KERAS=1, so that tf_keras never meets Keras 3 (and
dkdp_keras is never imported here). Reads the protocol's data from the
run's `data.npz`, writes one `.tflite` and one `.json` per target.

    TF_USE_LEGACY_KERAS=1 python benchmarks/train_tfmot.py WORK_DIR \
        --model reference_cnn --targets 0.5 0.8 0.9 0.95 --epochs 15
"""

import argparse
import json
import os
import pathlib
import time

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras  # noqa: E402

L = tf_keras.layers


def reference_cnn():
    """The protocol's reference CNN, layer for layer as dkdp_keras.zoo."""
    inputs = tf_keras.Input((28, 28, 1))
    x = L.Conv2D(32, 3, padding="same", use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.MaxPooling2D(2)(x)
    x = L.Conv2D(64, 3, padding="same", use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.MaxPooling2D(2)(x)
    x = L.Flatten()(x)
    x = L.Dense(256, activation="relu")(x)
    x = L.Dropout(0.3)(x)
    return tf_keras.Model(inputs, L.Dense(10)(x))


def lenet_300_100():
    inputs = tf_keras.Input((28, 28, 1))
    x = L.Flatten()(inputs)
    x = L.Dense(300, activation="relu")(x)
    x = L.Dense(100, activation="relu")(x)
    return tf_keras.Model(inputs, L.Dense(10)(x))


MODELS = {"reference_cnn": (reference_cnn, 824_746), "lenet_300_100": (lenet_300_100, 266_610)}


def pipeline(x, y, batch, seed):
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch).repeat().prefetch(tf.data.AUTOTUNE)


class TrainTimer(tf_keras.callbacks.Callback):
    """Listed last: seconds from its creation to the end of training."""

    def __init__(self):
        super().__init__()
        self.start = time.perf_counter()

    def on_train_end(self, logs=None):
        self.seconds = time.perf_counter() - self.start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work")
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--targets", type=float, nargs="+", required=True)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--begin-epoch", type=int, default=1)
    parser.add_argument("--end-epoch", type=int, default=10)
    parser.add_argument("--frequency", type=int, default=100,
                        help="steps between pruning steps (TFMOT's default 100)")
    args = parser.parse_args()
    work = pathlib.Path(args.work)
    data = np.load(work / "data.npz")
    x, y = data["x_train"].astype("float32") / 255.0, data["y_train"]
    xv, yv = data["x_val"].astype("float32") / 255.0, data["y_val"]
    xt, yt = data["x_test"].astype("float32") / 255.0, data["y_test"]
    steps = int(np.ceil(len(x) / args.batch))
    build, expected = MODELS[args.model]
    out_dir = work / args.model
    out_dir.mkdir(parents=True, exist_ok=True)
    for target in args.targets:
        stem = f"tfmot-{target:g}"
        if (out_dir / f"{stem}.json").exists():
            print(f"tfmot {args.model} {target:g}: done already, skipped", flush=True)
            continue
        tf_keras.utils.set_random_seed(0)
        base = build()
        assert base.count_params() == expected, (base.count_params(), expected)
        schedule = tfmot.sparsity.keras.PolynomialDecay(
            initial_sparsity=0.0, final_sparsity=target,
            begin_step=args.begin_epoch * steps,
            end_step=max(args.end_epoch, args.begin_epoch + 1) * steps,
            frequency=min(args.frequency, steps))
        model = tfmot.sparsity.keras.prune_low_magnitude(base, pruning_schedule=schedule)
        model.compile(optimizer=tf_keras.optimizers.Adam(1e-3),
                      loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        print(f"tfmot {args.model} target {target:g}: {args.epochs} epochs", flush=True)
        # Timed as train_keras3.TrainTimer: to the end of training, not of
        # the tf.data iterator's teardown as fit returns.
        timer = TrainTimer()
        model.fit(pipeline(x, y, args.batch, 0), steps_per_epoch=steps, epochs=args.epochs,
                  validation_data=(xv, yv), verbose=2,
                  callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), timer])
        train_s = timer.seconds
        stripped = tfmot.sparsity.keras.strip_pruning(model)
        stripped.compile(loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                         metrics=["accuracy"])
        test_acc = float(stripped.evaluate(xt, yt, verbose=0, batch_size=256)[1])
        weights = stripped.get_weights()
        converter = tf.lite.TFLiteConverter.from_keras_model(stripped)
        (out_dir / f"{stem}.tflite").write_bytes(converter.convert())
        record = {
            "model": args.model, "system": "tfmot", "target": target,
            "variant": f"prune_low_magnitude {target:g}", "test_acc": test_acc,
            "params": int(sum(w.size for w in weights)),
            "nonzero_params": int(sum(np.count_nonzero(w) for w in weights)),
            "train_s": train_s, "file": f"{stem}.tflite", "quantize": "none",
        }
        (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=1))
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
