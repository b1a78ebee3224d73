"""A/B (issue 23): one magnitude-pruned LeNet-300-100 compacted without width
alignment (compaction.ALIGN = 1) and with it (16), batch-1 LiteRT latency of
both files and of dense, interleaved in one process.

    python benchmarks/align_ab.py 0.98   # the global sparsity

Needs benchmarks/work/v2/data.npz (benchmarks/run.py writes it)."""
import os; os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, keras, dkdp_keras as dkdp
from dkdp_keras import compaction
from dkdp_keras.export import measure_tflite_latencies_ms
d = np.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "work", "v2", "data.npz"))
x = d["x_train"].astype("float32")[..., None] / 255.0 if d["x_train"].ndim == 3 else d["x_train"].astype("float32") / 255.0
y = d["y_train"]
keras.utils.set_random_seed(0)
model = dkdp.prunable(dkdp.zoo.lenet_300_100())
model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(x, y, epochs=3, batch_size=128, verbose=0)
import sys
sp = float(sys.argv[1])
layers = dkdp.masked_layers(model)
scores = [dkdp.importance.Magnitude().score(l, "weight") for l in layers]
dkdp.thresholds.apply_masks(layers, dkdp.thresholds.compute_masks(layers, scores, sp).masks)
model.fit(x, y, epochs=1, batch_size=128, verbose=0)  # masked fine-tune: dead units stay dead
paths = []
for align in (1, 16):
    compaction.ALIGN = align
    small = dkdp.compact(model)
    widths = [l.units for l in small.layers if hasattr(l, "units")]
    p = f"/tmp/align-lenet-{sp}-align{align}.tflite"
    dkdp.export_tflite(small, p, check_data=x[:64], latency_runs=1)
    print("align", align, "widths", widths, "nonzero", dkdp.count_params(small, nonzero=True))
    paths.append(p)
dense = dkdp.zoo.lenet_300_100(); dkdp.export_tflite(dense, "/tmp/align-dense.tflite", check_data=x[:64], latency_runs=1)
lat = measure_tflite_latencies_ms(["/tmp/align-dense.tflite"] + paths, runs=500, warmup=50, batch=1)
print("b1 ms dense / align1 / align16:", [round(v, 4) for v in lat], "ratios", [round(v / lat[0], 2) for v in lat])
