"""Method try (issue 23, LeNet at 20x): the pruned network as its own teacher.

Two tries, each on `dkdp_keras.prunable(model)` with the benchmark's
`DKDPCallback` at one unstructured budget (as `paired_times.py --system
prune` builds it; with `mutual=False` DKDP's student never reaches the
pruned network, so this is the network the benchmark's unstructured rows
measure):

- `--alpha A`: progressive self-knowledge distillation (PS-KD, Kim et al.,
  ICCV 2021): each step's target is (1 - a) * one-hot + a * softmax of the
  network as it was at the end of the previous epoch, a rising linearly
  from 0 to A over the epochs. `--alpha 0` is plain cross-entropy, the
  reference the try is read against (it reproduces the benchmark's row).
- `--ema D`: an exponential moving average of the weights, decay D, taken
  at every step from the epoch after the budget is first met; its test
  accuracy is printed beside the network's own.

    python benchmarks/lenet_selfkd.py WORK --alpha 0.8 [--ema 0.999] [--seed 0]

WORK must hold the benchmark's data.npz. Prints one JSON line. Not part of
the library.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import ops  # noqa: E402

import dkdp_keras as dkdp  # noqa: E402
import train_keras3 as tk  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("work")
parser.add_argument("--model", default="lenet_300_100")
parser.add_argument("--target", type=float, default=0.95, help="sparsity of the budget")
parser.add_argument("--alpha", type=float, default=0.0)
parser.add_argument("--ema", type=float, default=0.0)
parser.add_argument("--finish-by", type=float, default=None)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--epochs", type=int, default=15)
args = parser.parse_args()

run = tk.Run(args.work, args.model, args.epochs, 128, seed=args.seed)
keras.utils.set_random_seed(args.seed)
network = dkdp.prunable(run.build())
previous = dkdp.prunable(run.build())
previous.set_weights(network.get_weights())
previous.trainable = False
alpha = keras.Variable(0.0, trainable=False, name="pskd_alpha")
classes = int(network.outputs[0].shape[-1])


class SelfKD(keras.Model):
    """Cross-entropy against the PS-KD target (plain labels while alpha=0)."""

    def train_step(self, data):
        x, y = data
        soft = ops.softmax(previous(x, training=False), axis=-1)
        target = (1.0 - alpha) * ops.one_hot(ops.cast(y, "int32"), classes) + alpha * soft
        with tf.GradientTape() as tape:
            out = self(x, training=True)
            loss = ops.mean(keras.losses.categorical_crossentropy(target, out, from_logits=True))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, out)
        return {m.name: m.result() for m in self.metrics}


model = SelfKD(inputs=network.inputs, outputs=network.outputs)


class Previous(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        previous.set_weights(model.get_weights())
        alpha.assign(args.alpha * (epoch + 1) / run.epochs)


class WeightEMA(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.average, self.on, self.steps = None, False, 0

    def on_epoch_end(self, epoch, logs=None):
        self.on = self.on or (logs or {}).get("budget_usage", 2.0) <= 1.0

    def on_train_batch_end(self, batch, logs=None):
        if not (self.on and args.ema):
            return
        now = [v.numpy() for v in model.trainable_variables]
        if self.average is None:
            self.average = now
        else:
            for mean, value in zip(self.average, now):
                mean *= args.ema
                mean += (1.0 - args.ema) * value
        self.steps += 1


def accuracy(x, y):
    return round(float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y)), 4)


budget, _ = tk.structured_budget(f"params:{1 - args.target:g}", run.build())  # as train_keras3.py
defaults = argparse.Namespace(importance=None, initial_step=None, finish_by=args.finish_by)
callback, _ = tk.dkdp_callback("weight", budget, defaults, run)
callback.validation_data = (run.xv, run.yv)
ema = WeightEMA()
tk.compile_(model)
start = time.perf_counter()
run.fit(model, [callback, Previous(), ema])
row = {"model": args.model, "target": args.target, "alpha": args.alpha, "ema": args.ema,
       "finish_by": args.finish_by, "seed": args.seed,
       "nonzeros": int(dkdp.count_params(model, nonzero=True)),
       "test_acc": accuracy(run.xt, run.yt), "train_s": round(time.perf_counter() - start)}
if ema.average is not None:
    for variable, mean in zip(model.trainable_variables, ema.average):
        variable.assign(mean)
    row.update(ema_steps=ema.steps, ema_val_acc=accuracy(run.xv, run.yv),
               ema_test_acc=accuracy(run.xt, run.yt))
print(json.dumps(row), flush=True)
