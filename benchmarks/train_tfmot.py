"""The `tfmot` system of the protocol: TensorFlow Model Optimization
Toolkit's magnitude pruning, which needs tf_keras (Keras 2).

Run by `benchmarks/run.py` in a process of its own with
TF_USE_LEGACY_KERAS=1, so that tf_keras never meets Keras 3 (and
dkdp_keras is never imported here). Reads the protocol's data from the
run's `data.npz`, writes one `.tflite` and one `.json` per target. Every
epoch is backed up in WORK_DIR/<model>/backup/<stem>: an interrupted run
continues after its last completed epoch.

    TF_USE_LEGACY_KERAS=1 python benchmarks/train_tfmot.py WORK_DIR \
        --model reference_cnn --targets 0.5 0.8 0.9 0.95 --epochs 15
"""

import argparse
import json
import os
import pathlib
import shutil
import time

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras  # noqa: E402

from protocol import images, pipeline, write_json  # noqa: E402  (numpy only: no Keras 3 here)

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


def mobilenet_v2():
    return tf_keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=1.0, weights=None,
                                             classes=10, classifier_activation=None)


def xnnpack_ready(model):
    """The same MobileNetV2 (same weights' shapes, same activation shapes at
    32x32) in the form `PruneForLatencyOnXNNPack` accepts, which it refuses
    for `tf_keras.applications.MobileNetV2` as built: the first convolution
    as ZeroPadding2D(1) + a VALID convolution (built: SAME), every stride-2
    depthwise block padded (1, 1) on each side (built: (0, 1), which gives
    the same 16/8/4/2-pixel maps at 32x32), and the global pooling with
    keepdims=True followed by a Flatten (built: keepdims=False). XNNPACK's
    sparse subgraph runs from such a convolution to such a MEAN."""
    import copy

    cfg = copy.deepcopy(model.get_config())
    layers = cfg["layers"]
    for layer in list(layers):
        conf, kind = layer["config"], layer["class_name"]
        if layer["name"] == "Conv1":
            conf["padding"] = "valid"
            pad = {"class_name": "ZeroPadding2D", "name": "Conv1_pad",
                   "config": {"name": "Conv1_pad", "padding": ((1, 1), (1, 1)),
                              "trainable": True, "dtype": "float32"},
                   "inbound_nodes": layer["inbound_nodes"]}
            layer["inbound_nodes"] = [[["Conv1_pad", 0, 0, {}]]]
            layers.insert(layers.index(layer), pad)
        elif kind == "ZeroPadding2D":
            conf["padding"] = ((1, 1), (1, 1))
        elif kind == "GlobalAveragePooling2D":
            conf["keepdims"] = True
            flat = {"class_name": "Flatten", "name": f"{layer['name']}_flat",
                    "config": {"name": f"{layer['name']}_flat", "trainable": True,
                               "dtype": "float32"},
                    "inbound_nodes": [[[layer["name"], 0, 0, {}]]]}
            for other in layers:
                for node in other.get("inbound_nodes", []):
                    for edge in node:
                        if edge[0] == layer["name"]:
                            edge[0] = flat["name"]
            layers.insert(layers.index(layer) + 1, flat)
    return tf_keras.Model.from_config(cfg)


MODELS = {"reference_cnn": (reference_cnn, 824_746), "lenet_300_100": (lenet_300_100, 266_610),
          "mobilenet_v2": (mobilenet_v2, 2_270_794)}


def completed(backup):
    """(epochs completed, each one's training seconds) of a tf_keras
    BackupAndRestore directory and the epoch log beside it."""
    latest = tf.train.latest_checkpoint(str(backup / "chief"))
    if latest is None:
        return 0, []
    reader = tf.train.load_checkpoint(latest)
    epochs = int(reader.get_tensor("ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE")) + 1
    try:
        seconds = json.loads((backup / "epochs.json").read_text())[:epochs]
    except (OSError, ValueError):
        seconds = []
    return epochs, seconds


class EpochSeconds(tf_keras.callbacks.Callback):
    """Each epoch's seconds, written into the backup directory before the
    epoch is backed up (listed before BackupAndRestore)."""

    def __init__(self, path, before):
        super().__init__()
        self.path, self.seconds = path, list(before)

    def on_train_begin(self, logs=None):
        self.last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        self.seconds = self.seconds[:epoch] + [now - self.last]
        self.last = now
        write_json(self.path, self.seconds)


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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-only", action="store_true",
                        help="train, print the training seconds as JSON, write nothing "
                             "(benchmarks/paired_times.py); target 0 trains the tf_keras "
                             "model without TFMOT, TFMOT's own dense baseline")
    parser.add_argument("--policy", choices=("all", "xnnpack"), default="all",
                        help="xnnpack: PruneForLatencyOnXNNPack (1x1 convolutions only), "
                             "converted with EXPERIMENTAL_SPARSITY")
    args = parser.parse_args()
    work = pathlib.Path(args.work)
    data = np.load(work / "data.npz")
    x, y = images(data["x_train"], args.model), data["y_train"]
    xv, yv = images(data["x_val"], args.model), data["y_val"]
    xt, yt = images(data["x_test"], args.model), data["y_test"]
    steps = int(np.ceil(len(x) / args.batch))
    build, expected = MODELS[args.model]
    out_dir = work / args.model
    out_dir.mkdir(parents=True, exist_ok=True)
    for target in args.targets:
        xnnpack = args.policy == "xnnpack"
        stem = f"tfmot{'-xnnpack' if xnnpack else ''}-{target:g}"
        if (out_dir / f"{stem}.json").exists() and not args.time_only:
            print(f"tfmot {args.model} {stem}: done already, skipped", flush=True)
            continue
        tf_keras.utils.set_random_seed(args.seed)
        base = build()
        assert base.count_params() == expected, (base.count_params(), expected)
        policy = {}
        if xnnpack:
            base = xnnpack_ready(base)
            policy = {"pruning_policy": tfmot.sparsity.keras.PruneForLatencyOnXNNPack()}
        schedule = tfmot.sparsity.keras.PolynomialDecay(
            initial_sparsity=0.0, final_sparsity=target,
            begin_step=args.begin_epoch * steps,
            end_step=max(args.end_epoch, args.begin_epoch + 1) * steps,
            frequency=min(args.frequency, steps))
        model = base if target == 0 else tfmot.sparsity.keras.prune_low_magnitude(
            base, pruning_schedule=schedule, **policy)
        model.compile(optimizer=tf_keras.optimizers.Adam(1e-3),
                      loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        print(f"tfmot {args.model} target {target:g}: {args.epochs} epochs", flush=True)
        # Timed as train_keras3.TrainTimer: to the end of training, not of
        # the tf.data iterator's teardown as fit returns.
        # Every epoch end is backed up (not in --time-only runs): an
        # interrupted run resumes after its last completed epoch with the
        # batches it would have seen. BackupAndRestore comes before
        # UpdatePruningStep, which reads the restored step count.
        callbacks, start, before = [], 0, 0.0
        if not args.time_only:
            backup = out_dir / "backup" / stem
            start, earlier = completed(backup)
            before = sum(earlier)
            if start:
                print(f"tfmot {args.model} {stem}: resumes after epoch {start}", flush=True)
            callbacks = [EpochSeconds(backup / "epochs.json", earlier),
                         tf_keras.callbacks.BackupAndRestore(str(backup),
                                                             delete_checkpoint=False)]
        if target != 0:
            callbacks.append(tfmot.sparsity.keras.UpdatePruningStep())
        timer = TrainTimer()
        model.fit(pipeline(x, y, args.batch, args.seed, start), steps_per_epoch=steps,
                  epochs=args.epochs, validation_data=(xv, yv), verbose=2,
                  callbacks=[*callbacks, timer])
        train_s = before + timer.seconds
        if args.time_only:
            print(json.dumps({"system": "tfmot", "target": target,
                              "train_s": round(train_s, 2)}), flush=True)
            continue
        stripped = tfmot.sparsity.keras.strip_pruning(model)
        stripped.compile(loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                         metrics=["accuracy"])
        test_acc = float(stripped.evaluate(xt, yt, verbose=0, batch_size=256)[1])
        weights = stripped.get_weights()
        converter = tf.lite.TFLiteConverter.from_keras_model(stripped)
        if xnnpack:
            converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
        (out_dir / f"{stem}.tflite").write_bytes(converter.convert())
        record = {
            "model": args.model, "seed": args.seed,
            "system": "tfmot_xnnpack" if xnnpack else "tfmot", "target": target,
            "variant": (f"PruneForLatencyOnXNNPack {target:g}, sparse format" if xnnpack
                        else f"prune_low_magnitude {target:g}"),
            "test_acc": test_acc, "sparse_format": xnnpack,
            "params": int(sum(w.size for w in weights)),
            "nonzero_params": int(sum(np.count_nonzero(w) for w in weights)),
            "train_s": train_s, "resumed_after_epoch": start, "file": f"{stem}.tflite",
            "quantize": "none",
        }
        (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=1))
        shutil.rmtree(out_dir / "backup" / stem, ignore_errors=True)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
