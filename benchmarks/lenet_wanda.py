"""Method try (issue 23, LeNet at 20x): weights scored by |w| times the
root-mean-square of the input they multiply (Wanda, Sun et al., ICLR 2024,
there per output row; here ranked as the library ranks magnitude, LAMP
within each layer and one global threshold).

Why: in the benchmark's LeNet-300-100 at 5% of the weights (magnitude
scores), the first layer keeps more weights on the pixels that are rarely
lit: the number kept per pixel correlates -0.72 with how often the pixel is
non-zero, and the 62 pixels lit in at most 5% of the training images hold
1,258 of its 7,132 weights. A weight on an input that is mostly zero moves
the output little, whatever its size.

`--importance magnitude` is the benchmark's own scoring in the same harness
(it reproduces the benchmark's row); `--importance wanda` scores with
`dkdp_keras.importance.Wanda`, the input norms taken at every pruning event
from 2,048 training images.

    python benchmarks/lenet_wanda.py WORK --importance wanda [--finish-by F] [--seed 0]

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

import dkdp_keras as dkdp  # noqa: E402
import train_keras3 as tk  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("work")
parser.add_argument("--model", default="lenet_300_100")
parser.add_argument("--target", type=float, default=0.95, help="sparsity of the budget")
parser.add_argument("--importance", choices=("magnitude", "wanda"), default="wanda")
parser.add_argument("--finish-by", type=float, default=None)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--epochs", type=int, default=15)
args = parser.parse_args()

run = tk.Run(args.work, args.model, args.epochs, 128, seed=args.seed)
keras.utils.set_random_seed(args.seed)
network = dkdp.prunable(run.build())

budget, _ = tk.structured_budget(f"params:{1 - args.target:g}", run.build())  # as train_keras3.py
options = argparse.Namespace(importance=args.importance, initial_step=None,
                             finish_by=args.finish_by)
callback, _ = tk.dkdp_callback("weight", budget, options, run)
callback.validation_data = (run.xv, run.yv)
tk.compile_(network)
start = time.perf_counter()
run.fit(network, [callback])
test = float(np.mean(np.argmax(network.predict(run.xt, verbose=0), -1) == run.yt))
first = dkdp.masked_layers(network)[0]
print(json.dumps({"model": args.model, "target": args.target, "importance": args.importance,
                  "finish_by": args.finish_by, "seed": args.seed,
                  "nonzeros": int(dkdp.count_params(network, nonzero=True)),
                  "first_layer_kept": int(np.sum(first.kernel_mask.numpy())),
                  "test_acc": round(test, 4), "train_s": round(time.perf_counter() - start)}),
      flush=True)
