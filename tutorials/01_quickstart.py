# %% [markdown]
# # Quickstart: a smaller Fashion-MNIST classifier in one `fit`
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/dkdp-keras/dkdp-keras/blob/main/tutorials/01_quickstart.ipynb)
#
# dkdp-keras makes a model smaller *while* it trains. In one `model.fit`
# it scores how important each neuron and filter of the teacher is,
# prunes the least important ones until the model fits a resource
# budget, and distils the teacher into a smaller student, with the
# objective L_DKDP = L(M_t(x), y) + λ·L_KD(M_t(x), M_s(x)).
#
# In this notebook you will:
#
# 1. train a CNN on Fashion-MNIST with `DKDPModel` and `DKDPCallback`,
#    under a budget of 10% of its parameters;
# 2. compare the teacher and the student in accuracy and size;
# 3. export the pruned model to an int8 TFLite file, run it in the
#    LiteRT interpreter and classify a few test images.
#
# It runs on a CPU in about five minutes (no GPU needed). Setting the
# environment variable `DKDP_TUTORIAL_QUICK=1` runs the same cells on a
# small subset in well under a minute: the test suite does that.

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
OUT = pathlib.Path("tutorial_01")  # files this notebook writes
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

# %% [markdown]
# ## Data
#
# Fashion-MNIST: 28×28 grey images of ten kinds of clothing.
# `dkdp.datasets.load` reads the original files offline (on Colab it
# downloads them); the last 5,000 training images validate. To keep
# the CPU time modest we train on 20,000 images.

# %%
(x_train, y_train), (x_test, y_test) = dkdp.datasets.load(
    "fashion_mnist", as_numpy=True, download=IN_COLAB)
(x_train, y_train), (x_val, y_val) = dkdp.datasets.validation_split(x_train, y_train)

# %%
n_train, n_val, n_test = (3000, 1000, 1000) if QUICK else (20000, 5000, 10000)
x_train, y_train = x_train[:n_train], y_train[:n_train]
x_val, y_val = x_val[:n_val], y_val[:n_val]
x_test, y_test = x_test[:n_test], y_test[:n_test]
print(f"train {x_train.shape}, validation {x_val.shape}, test {x_test.shape}")

fig, axes = plt.subplots(1, 10, figsize=(12, 1.7))
for label, ax in enumerate(axes):
    ax.imshow(x_train[np.flatnonzero(y_train == label)[0], ..., 0], cmap="gray_r")
    ax.set_title(CLASSES[label], fontsize=8)
    ax.axis("off")
plt.show()

# %% [markdown]
# `fit` reads one shuffled `tf.data` pipeline that repeats forever, with
# `steps_per_epoch` saying where an epoch ends. With numpy arrays Keras
# builds a new input iterator every epoch, and with this TensorFlow the
# first step after it can stall for seconds.

# %%
EPOCHS = 2 if QUICK else 8
train_ds = pipeline(x_train, y_train)
steps_per_epoch = len(x_train) // BATCH
print(f"{EPOCHS} epochs of {steps_per_epoch} steps of {BATCH} images")

# %% [markdown]
# ## Teacher, student and the DKDP model
#
# The teacher is the reference CNN of the library's benchmark (two
# convolution blocks, a Dense(256) layer and the output layer). Any
# Sequential or Functional Keras model works the same way.
#
# `DKDPModel` wraps it: it makes the teacher *prunable* (each Dense and
# Conv layer computes with `kernel × mask`), builds a student (by default
# a narrower copy: every layer but the output at `student_width` of its
# width) and trains both in one step. One forward pass of the teacher serves its own loss and
# the student's distillation target; each has its own optimizer.

# %%
teacher = dkdp.zoo.reference_cnn()
dense_params = teacher.count_params()
dense_macs = dkdp.count_macs(teacher)
print(f"teacher: {dense_params:,} parameters, {dense_macs:,} multiply-accumulates per image")

model = dkdp.DKDPModel(teacher, student="auto", lambda_kd=1.0, temperature=4.0)
model.compile(teacher_optimizer=keras.optimizers.Adam(1e-3),
              student_optimizer=keras.optimizers.Adam(1e-3),
              loss=LOSS, metrics=["accuracy"])
print(f"student (width {model.student_width:g}): {model.student.count_params():,} parameters")

# %% [markdown]
# ## A budget, and the callback that meets it
#
# `DKDPCallback` prunes the teacher during `fit`. Here it scores whole
# units (neurons and filters) with the first-order **Taylor** criterion,
# |Σ w·∂L/∂w|², from gradients the training step already computes, and
# lets an **adaptive** threshold decide how much to prune:
#
# * after a warm-up epoch it raises the sparsity step by step toward the
#   budget, at each epoch end;
# * if the teacher's validation accuracy falls more than `tolerance`
#   below its best, it restores the last good masks and takes smaller
#   steps;
# * it meets the budget by 75% of the epochs, leaving the last epochs to
#   recover;
# * at the end the teacher takes the mean of its weights over the epochs
#   that trained with the final masks (the callback's `average`, on by
#   default), or, with fewer than three such epochs, the teacher of the
#   best validation epoch within the budget (`restore_best`).
#
# The budget is 10% of the teacher's parameters, counted as the model
# will be deployed: removed units gone, and with them the inputs they
# fed to the next layer.

# %%
BUDGET = dkdp.Budget(max_params=dense_params // 10)
callback = dkdp.DKDPCallback(
    importance=dkdp.importance.Taylor(),
    granularity="unit",
    threshold=dkdp.thresholds.Adaptive(budget=BUDGET, tolerance=0.01),
    verbose=1,  # one line per pruning event
)


def one_line(epoch, logs):
    print(f"epoch {epoch + 1}: val accuracy teacher {logs['val_teacher_accuracy']:.3f}, "
          f"student {logs['val_student_accuracy']:.3f} | sparsity {logs['sparsity']:.2f}, "
          f"kept params {int(logs['kept_params']):,}, budget usage {logs['budget_usage']:.2f}")


history = model.fit(
    train_ds, steps_per_epoch=steps_per_epoch, epochs=EPOCHS,
    validation_data=(x_val, y_val), verbose=0,
    callbacks=[callback, keras.callbacks.LambdaCallback(on_epoch_end=one_line)])

# %% [markdown]
# The callback added `tau`, `sparsity`, `kept_params`, `kept_macs` and
# `budget_usage` (measure / limit; at most 1 means within budget) to the
# epoch logs, so they are in `history` like any metric.

# %%
h = history.history
epochs = np.arange(1, len(h["loss"]) + 1)
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
left.plot(epochs, h["val_teacher_accuracy"], "o-", label="teacher")
left.plot(epochs, h["val_student_accuracy"], "s-", label="student")
left.set(xlabel="epoch", ylabel="validation accuracy", title="Accuracy")
left.legend()
right.plot(epochs, h["kept_params"], "o-", label="teacher (deployed)")
right.axhline(BUDGET.max_params, color="tab:red", ls="--", label="budget")
right.set(xlabel="epoch", ylabel="parameters", yscale="log", title="Size")
right.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Teacher and student on the test set
#
# `model.compact_teacher()` returns the pruned teacher as a plain Keras
# model in which the removed units are gone for real: smaller weight
# matrices, same outputs. The student is a separate, narrower network
# that learnt only from the teacher's softened outputs (`lambda_kd`; its
# own label loss is off by default).

# %%
small = model.compact_teacher()
rows = [
    ("teacher before training (dense)", f"{dense_params:,}", f"{dense_macs:,}", "-"),
    ("pruned teacher, compacted", f"{small.count_params():,}",
     f"{dkdp.count_macs(small):,}", f"{accuracy(small, x_test, y_test):.2%}"),
    (f"student (width {model.student_width:g})", f"{model.student.count_params():,}",
     f"{dkdp.count_macs(model.student):,}",
     f"{accuracy(model.student, x_test, y_test):.2%}"),
]
table(rows, ["model", "parameters", "MACs per image", "test accuracy"])
print(f"budget: {BUDGET.max_params:,} parameters; met: {BUDGET.is_met(model.teacher)}")

# %% [markdown]
# The budget holds the teacher: pruning chose which of its units to
# keep. The student's shape was fixed when it was built; it is not
# pruned, and it learnt from the teacher's outputs alone. To make a
# student of exactly the budget's size, pass your own `student=` network
# (notebook 04 does), or rebuild it from the pruned teacher during
# training with
# `DKDPCallback(student_refresh=dkdp.StudentRefresh(shrink=2.0,
# strategy="compact_teacher"))`.
#
# Which layers lost what? `dkdp.report.importance_summary` tells per
# layer (notebook 02 looks at it closely):

# %%
summary = dkdp.report.importance_summary(model, criterion="magnitude")
display(Markdown(summary.markdown))

# %% [markdown]
# ## Export to TFLite / LiteRT
#
# `export_tflite` compacts a masked model, converts it, then runs the file
# in the LiteRT interpreter against Keras on the check data: it raises if
# the int8 file disagrees with Keras on the top-1 class for more than 1%
# of the inputs. Full-integer quantisation needs a few hundred typical
# inputs to calibrate its ranges.

# %%
# The quick smoke run trains for seconds: its near-tied logits let int8
# rounding flip a few more top-1 classes, so it allows 5% instead of 1%.
MIN_AGREEMENT = 0.95 if QUICK else 0.99
report = dkdp.export_tflite(
    small, OUT / "fashion_cnn_int8.tflite", quantize="int8",
    representative_data=x_train[:500], check_data=(x_test, y_test),
    min_top1_agreement=MIN_AGREEMENT)
print(f"{report.path}: {report.bytes / 1024:.1f} KiB "
      f"(the dense float32 weights alone are {dense_params * 4 / 1024:.0f} KiB)")
print(f"TFLite accuracy {report.accuracy:.2%}, top-1 agreement with Keras "
      f"{report.top1_agreement:.2%} on {report.check_examples} images, "
      f"batch-1 latency {report.latency_ms:.3f} ms on one CPU thread")

# %% [markdown]
# ## Classify images with the LiteRT interpreter
#
# This is what an app does with the file. The int8 model takes float32
# images in [0, 1] and returns logits (the quantisation happens inside
# the file; notebook 03 shows an int8-in, int8-out file for
# microcontrollers).

# %%
from ai_edge_litert.interpreter import Interpreter

interpreter = Interpreter(model_path=report.path)
interpreter.allocate_tensors()
inp = interpreter.get_input_details()[0]
out = interpreter.get_output_details()[0]
print("input", inp["shape"], inp["dtype"].__name__, "| output", out["shape"], out["dtype"].__name__)


def classify(image):
    interpreter.set_tensor(inp["index"], image[None].astype(inp["dtype"]))
    interpreter.invoke()
    logits = interpreter.get_tensor(out["index"])[0]
    probs = np.exp(logits - logits.max())
    return int(logits.argmax()), float(probs.max() / probs.sum())


fig, axes = plt.subplots(2, 8, figsize=(12, 4.4))
for i, ax in enumerate(axes.flat):
    label, confidence = classify(x_test[i])
    ax.imshow(x_test[i, ..., 0], cmap="gray_r")
    ax.set_title(f"{CLASSES[label]}\n{confidence:.0%}", fontsize=8,
                 color="tab:green" if label == y_test[i] else "tab:red")
    ax.axis("off")
fig.suptitle("LiteRT predictions (green: right, red: wrong)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Check
#
# The last cell checks what this notebook claims, so that the test suite
# (which runs every tutorial) fails if a claim stops being true.

# %%
lite = np.array([classify(image)[0] for image in x_test[:300]])
keras_top1 = small.predict(x_test[:300], verbose=0).argmax(-1)
assert np.mean(lite == keras_top1) >= MIN_AGREEMENT - 0.02, np.mean(lite == keras_top1)
assert dkdp.count_params(small) <= BUDGET.max_params
assert history.history["budget_usage"][-1] <= 1.0
assert pathlib.Path(report.path).stat().st_size == report.bytes
assert report.bytes < dense_params  # smaller than one byte per dense weight
if not QUICK:
    assert accuracy(small, x_test, y_test) > 0.85
print("all checks passed")

# %% [markdown]
# ## Next
#
# * [02: importance and interpretability](02_importance_and_interpretability.ipynb):
#   the criteria side by side and what they say about the model.
# * [03: budgets and edge export](03_budgets_and_edge_export.ipynb):
#   parameters, bytes, MACs and latency; every TFLite format; what to
#   copy into an Android, iOS or microcontroller project.
# * [04: continual learning](04_continual_learning.ipynb): new classes
#   under the same budget.
