"""Method try (issue 23, LeNet at 20x): regrowth during gradual pruning.

After each pruning event of DKDP's Adaptive schedule, a fraction r of each
layer's kept weights is swapped: the r smallest |w| among the kept are
dropped and as many pruned weights come back, those with the largest dense
|dL/dw| on 2,048 training images (RigL, Evci et al. 2020; GraNet, Liu et al.
2021), at zero. Counts per layer, so the budget, are unchanged. r decays as
a half cosine over the epochs. NORMALIZE=none in the environment also sets
DKDPCallback(normalize="none") (global magnitude instead of LAMP).

    python benchmarks/lenet_regrow.py WORK RATE --model lenet_300_100 \
        --epochs 15 --seed 0 --targets 0.95 --structured [train_keras3 options]

WORK must hold the benchmark's data.npz. Not part of the library: it
replaces DKDPCallback in this process with a subclass.
"""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tensorflow as tf
import keras
from keras import ops

import dkdp_keras as dkdp
import train_keras3 as tk

RATE = float(sys.argv[2])
DATA = {}
Base = dkdp.DKDPCallback


class Regrow(Base):
    def __init__(self, *a, **k):
        if os.environ.get("NORMALIZE"):
            k["normalize"] = os.environ["NORMALIZE"]
        super().__init__(*a, **k)
        print("callback normalize", self.normalize, "rate", RATE, flush=True)

    def _prune(self, sparsity, scores=None, fill=False):
        result = super()._prune(sparsity, scores, fill)
        if result is not None and RATE > 0:
            self._swap()
        return result

    def _swap(self):
        teacher = self._teacher()
        layers = self._layers
        epoch = getattr(self, "_epochs_done", 0)
        rate = RATE * 0.5 * (1 + math.cos(math.pi * epoch / self._epochs))
        x, y = DATA["x"], DATA["y"]
        rng = np.random.default_rng(epoch)
        idx = rng.choice(len(x), 2048, replace=False)
        saved = [ops.convert_to_numpy(l.kernel).copy() for l in layers]
        masks = [ops.convert_to_numpy(l.kernel_mask).copy() for l in layers]
        for l, k, m in zip(layers, saved, masks):
            l.kernel.assign(k * m)
            l.kernel_mask.assign(np.ones_like(m))
        grads = [np.zeros_like(k) for k in saved]
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        for i in range(0, 2048, 256):
            xb, yb = x[idx[i:i + 256]], y[idx[i:i + 256]]
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, teacher(xb, training=False))
            g = tape.gradient(loss, [l.kernel for l in layers])
            for acc, gi in zip(grads, g):
                acc += np.abs(ops.convert_to_numpy(gi))
        moved = 0
        for l, k, m, g in zip(layers, saved, masks, grads):
            kept = m > 0
            n_kept = int(kept.sum())
            n = int(rate * n_kept)
            pruned = ~kept
            n = min(n, int(pruned.sum()))
            if n <= 0:
                l.kernel.assign(k)
                l.kernel_mask.assign(m)
                continue
            w = np.abs(k).ravel().copy()
            w[~kept.ravel()] = np.inf
            drop = np.argpartition(w, n)[:n]
            gg = g.ravel().copy()
            gg[kept.ravel()] = -np.inf
            grow = np.argpartition(-gg, n)[:n]
            newm = m.ravel().copy()
            newm[drop] = 0
            newm[grow] = 1
            newk = k.ravel().copy()
            newk[grow] = 0.0
            l.kernel.assign(newk.reshape(k.shape))
            l.kernel_mask.assign(newm.reshape(m.shape))
            moved += n
        print(f"regrow: epoch {epoch}, rate {rate:.3f}, swapped {moved} weights", flush=True)


tk.dkdp.DKDPCallback = Regrow
run_args = sys.argv[3:]


_orig_run = tk.Run.__init__


def init(self, *a, **k):
    _orig_run(self, *a, **k)
    DATA["x"], DATA["y"] = self.x, self.y


tk.Run.__init__ = init
sys.argv = ["train_keras3.py", sys.argv[1], "dkdp"] + run_args
tk.main()
