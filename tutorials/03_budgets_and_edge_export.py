# %% [markdown]
# # Budgets and edge export
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/dkdp-keras/dkdp-keras/blob/main/tutorials/03_budgets_and_edge_export.ipynb)
#
# A phone app cares about file size and latency; a microcontroller about
# bytes of flash and RAM and about multiply-accumulates. This notebook
# shows how to say that to dkdp-keras and what comes out:
#
# 1. the four budget measures: parameters, bytes, MACs, latency;
# 2. weight versus unit (structured) pruning, and why only the latter
#    shrinks the file and the latency;
# 3. the same model pruned under a **bytes** budget and under a
#    **latency** budget: different layers give way;
# 4. float32, dynamic-range, float16 and full-int8 TFLite files, sized and
#    timed;
# 5. what to copy into an Android, iOS or microcontroller project.
#
# Here we prune a model that is already trained, with `dkdp.prunable` and
# `DKDPCallback` on a plain Keras model (notebook 01 shows the full
# `DKDPModel` with a student). About six minutes on a CPU;
# `DKDP_TUTORIAL_QUICK=1` runs a small version.

# %%
# On Colab, install dkdp-keras first; anywhere else this cell does nothing.
import sys

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "git+https://github.com/dkdp-keras/dkdp-keras"], check=True)

# %% [markdown]
# ## Setup

# %%
import os
import pathlib
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # quieter TensorFlow
import keras
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf
from IPython.display import Image, Markdown, display

import dkdp_keras as dkdp

# Keras warns that fit's shuffle=True does not apply to a tf.data pipeline;
# ours shuffles itself.
warnings.filterwarnings("ignore", message="`shuffle=True` was passed")

tf.get_logger().setLevel("ERROR")
QUICK = os.environ.get("DKDP_TUTORIAL_QUICK") == "1"  # small smoke-test run
keras.utils.set_random_seed(0)
OUT = pathlib.Path("tutorial_03")  # files this notebook writes
OUT.mkdir(exist_ok=True)
print(f"dkdp-keras {dkdp.__version__}, Keras {keras.__version__}, "
      f"TensorFlow {tf.__version__}; quick mode: {QUICK}")

# %%
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
BATCH = 64
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def pipeline(x, y, batch_size=BATCH, seed=0):
    """One shuffled, repeated tf.data pipeline; fit draws steps_per_epoch
    batches from it each epoch."""
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).repeat().prefetch(tf.data.AUTOTUNE)


def accuracy(model, x, y):
    """Top-1 accuracy of a Keras model that outputs logits."""
    logits = model.predict(x, batch_size=512, verbose=0)
    return float(np.mean(logits.argmax(-1) == y))


def table(rows, headers):
    """Show a list of rows as a Markdown table."""
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    display(Markdown("\n".join(lines)))

# %%
(x_train, y_train), (x_test, y_test) = dkdp.datasets.load(
    "fashion_mnist", as_numpy=True, download=IN_COLAB)
(x_train, y_train), (x_val, y_val) = dkdp.datasets.validation_split(x_train, y_train)

# %%
n_train, n_val, n_test = (3000, 1000, 1000) if QUICK else (15000, 3000, 5000)
x_train, y_train = x_train[:n_train], y_train[:n_train]
x_val, y_val = x_val[:n_val], y_val[:n_val]
x_test, y_test = x_test[:n_test], y_test[:n_test]
steps_per_epoch = len(x_train) // BATCH
train_ds = pipeline(x_train, y_train)

# %% [markdown]
# ## A trained model to start from
#
# Any trained Sequential or Functional model will do; we train the
# reference CNN for a few epochs.

# %%
dense = dkdp.zoo.reference_cnn()
dense.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS, metrics=["accuracy"])
dense.fit(train_ds, steps_per_epoch=steps_per_epoch, epochs=1 if QUICK else 3, verbose=2)
dense_accuracy = accuracy(dense, x_test, y_test)
print(f"dense model: test accuracy {dense_accuracy:.2%}")

# %% [markdown]
# ## Four measures
#
# A `Budget` limits any of four measures, each counted over the model as
# it will be deployed (removed units gone, zeros not counted):
#
# * `max_params`: non-zero parameters;
# * `max_bytes`: parameters × `bytes_per_param` (4 float32, 2 float16,
#   1 int8): weight storage, before file overhead;
# * `max_macs`: multiply-accumulates per example, the compute;
# * `max_latency_ms`: batch-1 latency, *estimated* from what pruning
#   keeps. With `latency_fit="litert"`, or a `LatencyFit` as below, the
#   estimate is a plane, fixed time + time per MAC × MACs + time per
#   weight × weights, fitted to the model timed in LiteRT as eight
#   narrower copies (`dkdp.fit_latency`). Without it, the dense model's
#   Keras latency × kept MACs / dense MACs, which misses the fixed time a
#   small model pays whatever its widths.
#
# A budget whose limits are the dense model's own measures reports any
# model's usage as its fraction of the dense one.

# %%
dense_params = dkdp.count_params(dense)
dense_macs = dkdp.count_macs(dense)
fit = dkdp.fit_latency(dense, "litert", verbose=False)  # about 15 s here
dense_ms = fit.points[0][2]  # the widest copy: the dense model's time
REFERENCE = dkdp.Budget(max_params=dense_params, max_bytes=dense_params,
                        max_macs=dense_macs, bytes_per_param=1)
table([(f"{dense_params:,}", f"{dense_params / 1024:.0f} KiB", f"{dense_macs:,}",
        f"{dense_ms:.3f} ms", f"{fit.fixed_ms:.3f} ms")],
      ["parameters", "int8 bytes", "MACs per image", "LiteRT batch-1 latency",
       "of which fixed"])

fig, axes = plt.subplots(1, 2, figsize=(10, 2.8))
kernel_layers = [l for l in dense.layers if hasattr(l, "kernel")]


def layer_macs(layer):  # kernel entries x output positions
    return int(np.prod(layer.kernel.shape)) * int(np.prod(layer.output.shape[1:-1]))


share_p = [l.count_params() / dense_params for l in kernel_layers]
share_m = [layer_macs(l) / dense_macs for l in kernel_layers]
for ax, share, title in ((axes[0], share_p, "share of parameters"),
                         (axes[1], share_m, "share of MACs")):
    ax.barh([l.name for l in kernel_layers], share)
    ax.set_title(title)
    ax.invert_yaxis()
fig.tight_layout()
plt.show()

# %% [markdown]
# The two measures live in different places: nearly all parameters sit in
# the Dense(256) layer after Flatten, nearly all the compute in the
# second convolution. Keep this in mind for section 3.
#
# ## Weight versus unit pruning
#
# We prune 80% of the weights twice, ranking by magnitude: once weight by
# weight (unstructured), once whole units (neurons and filters), each
# during one epoch of fine-tuning with a gradual schedule
# (`PolynomialDecay`, Zhu & Gupta 2017). Then both are compacted and
# exported as float32 TFLite files.

# %%
def fine_tune(threshold, epochs, granularity="unit", importance="magnitude",
              steps=steps_per_epoch, **callback_args):
    """A masked copy of the dense model, pruned by DKDPCallback while it trains."""
    masked = dkdp.prunable(dense, track_statistics=importance != "magnitude")
    masked.compile(optimizer=keras.optimizers.Adam(5e-4), loss=LOSS, metrics=["accuracy"])
    callback = dkdp.DKDPCallback(importance=importance, granularity=granularity,
                                 threshold=threshold, verbose=0, **callback_args)
    history = masked.fit(train_ds, steps_per_epoch=steps, epochs=epochs,
                         validation_data=(x_val, y_val), callbacks=[callback], verbose=0)
    return masked, history


schedule = dkdp.thresholds.PolynomialDecay(0.0, 0.8, begin_step=0,
                                           end_step=steps_per_epoch // 2)
pruned = {g: fine_tune(schedule, 1, granularity=g,
                       frequency=max(1, steps_per_epoch // 4))[0]
          for g in ("weight", "unit")}

rows, files = [], {}
for label, net, sparse in (("dense", dense, False),
                           ("80% weights", pruned["weight"], False),
                           ("80% weights, sparse encoding", pruned["weight"], True),
                           ("80% as whole units", pruned["unit"], False)):
    stem = label.replace(" ", "_").replace("%", "").replace(",", "")
    r = dkdp.export_tflite(net, OUT / f"{stem}.tflite", sparsity=sparse,
                           check_data=(x_test, y_test), latency_runs=50)
    small = dkdp.compact(net) if net is not dense else dense
    files[label] = r
    rows.append((label, f"{dkdp.sparsity(net):.0%}", f"{small.count_params():,}",
                 f"{r.bytes / 1024:.0f} KiB", f"{r.gzip_bytes / 1024:.0f} KiB",
                 f"{r.latency_ms:.3f} ms", f"{r.accuracy:.2%}"))
table(rows, ["float32 model", "zeros", "params after compact", "file", "gzipped",
             "TFLite latency", "accuracy"])

# %% [markdown]
# (The pruned models trained one epoch more than the dense one, which
# is why they can score a little higher.)
#
# Zeros scattered through a kernel change nothing in a dense file: the
# weight-pruned file is as large and as slow as the dense one. They only
# pay off after compression: gzip, or the converter's sparse encoding
# (`export_tflite(..., sparsity=True)`), which shrinks the file but does
# not by itself make it faster: LiteRT densifies those weights when it loads
# the file, except where XNNPACK runs its sparse kernels (CPUs without AVX,
# such as ARM phones, and only MobileNet-like float32 graphs; `report.sparse`
# says what this machine does). Removing whole units makes every matrix smaller:
# fewer parameters, a smaller file and a faster model, with no special
# runtime. That is why the budgets below prune units.
#
# ## A bytes budget and a latency budget
#
# Two runs from the same trained model, each with the `Adaptive`
# threshold and Taylor importance (gradients from calibration data,
# since a plain model does not collect them while training):
#
# * **bytes**: at most 100 KB of int8 weights;
# * **latency**: at most a quarter of the dense model's latency.
#
# `Adaptive` decides at epoch ends; since we start from a trained model,
# each "epoch" here is half a pass over the data, which gives it more
# decision points per pass. It meets the budget by 75% of the epochs
# and fine-tunes in the rest.

# %%
BUDGETS = {
    "bytes <= 100 KB (int8)": dkdp.Budget(max_bytes=100_000, bytes_per_param=1),
    "latency <= 25% of dense": dkdp.Budget(max_latency_ms=0.25 * dense_ms, latency_fit=fit),
}
EPOCHS = 1 if QUICK else 4
runs = {}
for label, budget in BUDGETS.items():
    masked, history = fine_tune(
        dkdp.thresholds.Adaptive(budget, tolerance=0.01), EPOCHS, importance="taylor",
        steps=steps_per_epoch // 2, calibration_data=(x_val[:256], y_val[:256]))
    runs[label] = masked
    print(f"{label}: budget usage per epoch",
          [round(u, 2) for u in history.history["budget_usage"]])

# %%
rows = []
for label, masked in {"dense": dense, **runs}.items():
    usage = REFERENCE.usage(masked)
    small = dkdp.compact(masked) if masked is not dense else dense
    own = BUDGETS[label].usage(masked) if label in BUDGETS else {}
    rows.append((label, f"{small.count_params():,} ({usage['params']:.0%})",
                 f"{dkdp.count_macs(small):,} ({usage['macs']:.0%})",
                 ", ".join(f"{k} {v:.2f}" for k, v in own.items()) or "-",
                 f"{accuracy(small, x_test, y_test):.2%}"))
table(rows, ["model", "params (of dense)", "MACs (of dense)",
             "usage of its budget", "test accuracy"])

kernel_names = [l.name for l in dkdp.masked_layers(next(iter(runs.values())))]
fig, ax = plt.subplots(figsize=(7, 3))
width = 0.8 / len(runs)
for i, (label, masked) in enumerate(runs.items()):
    kept = [float(l.unit_mask().numpy().mean()) for l in dkdp.masked_layers(masked)]
    ax.bar(np.arange(len(kept)) + i * width, kept, width, label=label)
ax.set_xticks(np.arange(len(kernel_names)) + width / 2, kernel_names)
ax.set(ylabel="fraction of units kept", title="Where each budget cuts")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# Both budgets empty most of the Dense(256) layer, where the parameters
# are (each filter removed from the second convolution also takes 49 of
# its inputs along). The latency budget also has to remove convolution
# filters, where the compute is, and keeps far fewer of them. One
# criterion, one global threshold: the budget decides where the cut
# falls. A warning under the training cell that a run "ended below its
# best before pruning" means that budget is tight for this little
# fine-tuning: train longer, relax the budget or raise the tolerance.
# (Budgets at unit granularity are met with a margin: by default
# layers of 64 units or more keep a multiple of 16, widths that XNNPACK,
# LiteRT's CPU path, runs efficiently. When every byte counts, as for a
# microcontroller's flash, pass `unit_multiple=1` to `DKDPCallback` and
# `align=1` to `compact` and `export_tflite`: the budget then fills to
# the unit, and the file holds no zero channel.)
#
# A word on milliseconds: the latency budget's are LiteRT's on this
# machine, one thread, float32, as the fitted plane estimates them. The
# next cell exports the latency budget's model and times the file. On
# the project's CPU the plane came within −14% to +6% of pruned files'
# times (benchmarks/RESULTS.md), and a machine's speed drifts between
# two timings: leave a margin. The plane is of the machine it was timed
# on: for a phone or a board, time the model there at a few widths and
# pass `dkdp.LatencyFit.from_timings(macs, ms, params=...)` instead.

# %%
latency_model = dkdp.compact(runs["latency <= 25% of dense"])
timed = dkdp.export_tflite(latency_model, OUT / "model_latency.tflite",
                           check_data=(x_test, y_test), latency_runs=200)
estimate = BUDGETS["latency <= 25% of dense"].measure(runs["latency <= 25% of dense"])
table([(f"{0.25 * dense_ms:.4f} ms", f"{estimate['latency_ms']:.4f} ms",
        f"{timed.latency_ms:.4f} ms", f"{timed.latency_ms / dense_ms:.2f}×")],
      ["budget", "estimated", "measured (file)", "measured × dense"])

# %% [markdown]
# ## Four file formats
#
# The model of the bytes budget, exported four ways. The budget counts
# weights; the int8 file also holds int32 biases, quantisation scales and
# the graph, a few kilobytes more. Each file is run
# in the LiteRT interpreter against Keras; the quantised ones must agree
# with it on the top-1 class for 99% of the test images.

# %%
# The quick smoke run trains for seconds: its near-tied logits let int8
# rounding flip a few more top-1 classes, so it allows 5% instead of 1%.
MIN_AGREEMENT = 0.95 if QUICK else 0.99
chosen = dkdp.compact(runs["bytes <= 100 KB (int8)"])
formats = {}
for quantize in ("none", "dynamic", "float16", "int8"):
    formats[quantize] = dkdp.export_tflite(
        chosen, OUT / f"model_{quantize}.tflite", quantize=quantize,
        representative_data=x_train[:500], check_data=(x_test, y_test),
        min_top1_agreement=MIN_AGREEMENT, latency_runs=50)
table([(q, f"{r.bytes / 1024:.1f} KiB", f"{r.gzip_bytes / 1024:.1f} KiB",
        f"{r.latency_ms:.3f} ms", f"{r.accuracy:.2%}", f"{r.top1_agreement:.2%}",
        f"{r.max_abs_diff:.2g}") for q, r in formats.items()],
      ["quantize", "file", "gzipped", "latency (1 thread)", "accuracy",
       "top-1 agreement", "max logit diff"])

fig, (a, b) = plt.subplots(1, 2, figsize=(9, 2.8))
a.bar(formats.keys(), [r.bytes / 1024 for r in formats.values()], color="tab:blue")
a.set(ylabel="KiB", title="file size")
b.bar(formats.keys(), [r.latency_ms for r in formats.values()], color="tab:orange")
b.set(ylabel="ms", title="batch-1 latency")
fig.tight_layout()
plt.show()

# %% [markdown]
# * **float32** (`quantize=None`): exact, the largest file; the
#   reference.
# * **dynamic**: int8 weights, float activations; about 4× smaller, no
#   calibration data. Good default for phones.
# * **float16**: half-size weights; runs natively on GPUs and NPUs that
#   support float16.
# * **int8**: integers throughout (calibrated on 500 training images);
#   needed by microcontrollers, Edge TPUs and most NPUs. Its logits
#   come in coarse steps (the output scale), so they differ from Keras'
#   by more than the other formats' do; the top-1 class is what it
#   keeps.
#
# ## Into a project
#
# **Android** (LiteRT): put the file in `app/src/main/assets/`, add
# `implementation("com.google.ai.edge.litert:litert:1.4.0")` to Gradle
# and run it:
#
# ```kotlin
# val interpreter = Interpreter(FileUtil.loadMappedFile(context, "model_int8.tflite"))
# val input = Array(1) { Array(28) { Array(28) { FloatArray(1) } } }  // pixels / 255f
# val logits = Array(1) { FloatArray(10) }
# interpreter.run(input, logits)
# ```
#
# **iOS**: add the `TensorFlowLiteSwift` pod (LiteRT's Swift API), add
# the file to the app bundle, and call `Interpreter(modelPath:)`,
# `copy(_:toInputAt:)`, `invoke()` and `output(at:)`. Input: 28×28×1
# float32 in [0, 1]; output: 10 logits.
#
# **Microcontrollers** (LiteRT for Microcontrollers, the former TFLite
# Micro): use a full-int8 file whose input and output are int8 too
# (`int8_io=True`), compiled into the firmware as a C array, and an op
# resolver with exactly the operators the model uses:

# %%
from ai_edge_litert.interpreter import Interpreter, OpResolverType

mcu = dkdp.export_tflite(chosen, OUT / "model_mcu.tflite", quantize="int8",
                         int8_io=True, representative_data=x_train[:500],
                         check_data=(x_test, y_test), latency_runs=20,
                         min_top1_agreement=MIN_AGREEMENT)
# Without the default XNNPACK delegate, so that the operators are listed as they are.
interpreter = Interpreter(
    model_path=mcu.path,
    experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
interpreter.allocate_tensors()
inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
(in_scale, in_zero), (out_scale, out_zero) = inp["quantization"], out["quantization"]
# _get_ops_details is LiteRT's (private, long-standing) list of the graph's operators.
op_names = sorted({op["op_name"] for op in interpreter._get_ops_details()})

data = pathlib.Path(mcu.path).read_bytes()
hex_bytes = ",".join(f"0x{b:02x}" for b in data)
(OUT / "model_data.cc").write_text(
    '#include "model_data.h"\n'
    f"alignas(16) const unsigned char g_model[] = {{{hex_bytes}}};\n"
    f"const unsigned int g_model_len = {len(data)};\n")
(OUT / "model_data.h").write_text(
    "extern const unsigned char g_model[];\nextern const unsigned int g_model_len;\n")

print(f"model_data.cc: {len(data):,} bytes of flash for the model, "
      f"accuracy {mcu.accuracy:.2%}")
print(f"input:  int8 {inp['shape'].tolist()}, q = round(pixel / scale) + zero_point "
      f"with scale {in_scale:.6g}, zero_point {in_zero}")
print(f"output: int8 {out['shape'].tolist()}, logit = (q - zero_point) * scale "
      f"with scale {out_scale:.6g}, zero_point {out_zero}")


def micro_name(op):  # CONV_2D -> Conv2D, FULLY_CONNECTED -> FullyConnected
    return "".join(w.upper() if w[0].isdigit() else w.capitalize() for w in op.split("_"))


resolver = "".join(f"  resolver.Add{micro_name(n)}();\n" for n in op_names)
print(f"\nstatic tflite::MicroMutableOpResolver<{len(op_names)}> resolver;\n{resolver}")

# %% [markdown]
# The `Add...()` names follow the LiteRT operator names; check the
# spelling against `micro_mutable_op_resolver.h`. `SHAPE`,
# `STRIDED_SLICE` and `PACK` compute the Flatten's target shape at run
# time, because the exported signature keeps a variable batch size. The
# tensor arena (RAM for activations)
# is not known from Python: start with about 3× the largest activation
# (here the first convolution's 28×28×channels int8 output) and let
# `RecordingMicroInterpreter` report the exact figure on the device.
#
# ## Check

# %%
for label, masked in runs.items():
    assert BUDGETS[label].is_met(masked), label
sizes = {q: r.bytes for q, r in formats.items()}
assert sizes["int8"] < sizes["float16"] < sizes["none"]
assert sizes["dynamic"] < sizes["none"] / 2
assert files["80% as whole units"].bytes < files["80% weights"].bytes / 2
assert files["80% weights, sparse encoding"].bytes < files["80% weights"].bytes
assert all(r.top1_agreement >= MIN_AGREEMENT for r in formats.values())
assert formats["none"].max_abs_diff <= 1e-4
assert len(data) == mcu.bytes and (OUT / "model_data.cc").stat().st_size > 5 * len(data)
assert "CONV_2D" in op_names and "FULLY_CONNECTED" in op_names
print("all checks passed")
