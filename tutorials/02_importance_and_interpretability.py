# %% [markdown]
# # Importance criteria and what they say about a model
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/dkdp-keras/dkdp-keras/blob/main/tutorials/02_importance_and_interpretability.ipynb)
#
# Pruning asks one question of every weight, neuron and filter: *how much
# does the model need it?* dkdp-keras answers with pluggable **importance
# criteria**. This notebook trains one CNN and puts six of them side by
# side:
#
# | criterion | scores a unit by | reads |
# |---|---|---|
# | `Magnitude` | L1 norm of its weights | weights |
# | `GradientMagnitude` | mean \|∂L/∂w\| | gradients |
# | `Taylor` | mean (Σ w·∂L/∂w)², the first-order loss change if removed | weights and gradients |
# | `ActivationFrequency` | how often its output is non-zero (1 − APoZ) | activations |
# | `OutputContribution` | how much the output changes when it is removed | calibration data |
# | `LearnedMask` | its trainable gate, pushed down by an L1 penalty | gates |
#
# We look at how far they agree, which units and layers each keeps, how
# much accuracy each one's choice costs, the plots of the `report` module,
# and finally at what the important units *do*.
#
# About four minutes on a CPU; `DKDP_TUTORIAL_QUICK=1` runs a small version.

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
OUT = pathlib.Path("tutorial_02")  # files this notebook writes
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
n_train, n_val = (3000, 1000) if QUICK else (15000, 3000)
x_train, y_train = x_train[:n_train], y_train[:n_train]
x_val, y_val = x_val[:n_val], y_val[:n_val]
EPOCHS = 2 if QUICK else 4
steps_per_epoch = len(x_train) // BATCH
train_ds = pipeline(x_train, y_train)

# %% [markdown]
# ## One model that keeps every statistic
#
# `dkdp.prunable` turns a Keras model into a masked copy with the same
# outputs. `track_statistics=True` keeps running means of activations and
# gradients in each masked layer; `learnable_mask=True` gives every unit a
# trainable gate, and `gate_l1` an L1 penalty on those gates (Network
# Slimming). We train it with a plain `fit`: no pruning yet.
#
# The running means average over all steps since they were last reset
# (`DKDPCallback` resets them after each pruning event). We reset them
# before the last epoch, so that they describe the trained model rather
# than its first steps.

# %%
model = dkdp.prunable(dkdp.zoo.reference_cnn(), track_statistics=True,
                      learnable_mask=True, gate_l1=1e-4)
model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS, metrics=["accuracy"])
layers = dkdp.masked_layers(model)
print("masked layers:", ", ".join(f"{l.name} ({l.num_units} units)" for l in layers))

model.fit(train_ds, steps_per_epoch=steps_per_epoch, epochs=EPOCHS - 1, verbose=2)
for layer in layers:
    layer.reset_statistics()
model.fit(train_ds, steps_per_epoch=steps_per_epoch, epochs=1, verbose=2)
dense_accuracy = accuracy(model, x_val, y_val)
print(f"validation accuracy: {dense_accuracy:.2%}")

# %% [markdown]
# A plain `fit` does not keep gradients (a `DKDPModel` folds them in
# during its own training step, for free). For a plain model,
# `collect_gradients` runs the loss on some calibration data and fills
# the gradient statistics that `GradientMagnitude` and `Taylor` read.
# `OutputContribution` removes each unit in turn on a calibration batch
# and measures how much the logits move.

# %%
calibration = (x_val[:128], y_val[:128]) if QUICK else (x_val[:512], y_val[:512])
dkdp.importance.collect_gradients(model, *calibration, loss=LOSS)

CRITERIA = {
    "Magnitude": dkdp.importance.Magnitude(),
    "Gradient": dkdp.importance.GradientMagnitude(),
    "Taylor": dkdp.importance.Taylor(),
    "Activation": dkdp.importance.ActivationFrequency(),
    # one forward pass per unit: 362 of them on a small calibration batch
    "Output contribution": dkdp.importance.OutputContribution(x_val[:32 if QUICK else 128]),
    "Learned mask": dkdp.importance.LearnedMask(),
}
scores = {}  # criterion -> layer name -> one score per unit
layer_scores = {}  # criterion -> layer name -> one score for the layer
for name, criterion in CRITERIA.items():
    criterion.prepare(model)  # OutputContribution measures here
    scores[name] = {l.name: np.asarray(criterion.score(l, "unit")) for l in layers}
    layer_scores[name] = {l.name: float(criterion.score(l, "layer")) for l in layers}
print({name: [s.shape[0] for s in by_layer.values()] for name, by_layer in scores.items()})

# %% [markdown]
# ## Which layers matter?
#
# At granularity `"layer"` a criterion gives one number per layer: the
# mean score of its units. Scales differ between criteria, so each column
# is divided by its mean over the layers (1.0 = an average layer).

# %%
names = [l.name for l in layers]
rows = []
for layer_name in names:
    row = [layer_name]
    for crit in CRITERIA:
        values = np.array([layer_scores[crit][n] for n in names])
        row.append(f"{layer_scores[crit][layer_name] / values.mean():.2f}")
    rows.append(row)
table(rows, ["layer"] + list(CRITERIA))

# %% [markdown]
# The columns disagree, and not only because the criteria differ: raw
# scores are not comparable across layers. A Dense unit's L1 norm sums
# 3,136 weights, a first-layer filter's only 9; Taylor scores are squared
# sums, so they span orders of magnitude. That is why the global
# threshold below compares LAMP-normalised scores, where each layer's
# own distribution decides, rather than raw ones.

# %% [markdown]
# ## Do the criteria agree on which units matter?
#
# Spearman rank correlation of the unit scores between each pair of
# criteria, in the second convolution (64 filters) and in the Dense(256)
# layer. 1 means the same ranking, 0 unrelated rankings.

# %%
def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


crit_names = list(CRITERIA)
fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
for ax, layer in zip(axes, [layers[1], layers[2]]):
    corr = np.array([[spearman(scores[a][layer.name], scores[b][layer.name])
                      for b in crit_names] for a in crit_names])
    im = ax.imshow(corr, vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_xticks(range(len(crit_names)), crit_names, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(crit_names)), crit_names, fontsize=8)
    for i in range(len(crit_names)):
        for j in range(len(crit_names)):
            ax.text(j, i, f"{corr[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(f"{layer.name} ({layer.num_units} units)")
fig.colorbar(im, ax=axes, shrink=0.8)
plt.show()

# %% [markdown]
# ## What each criterion keeps, and what it costs
#
# The same mechanism `DKDPCallback` uses turns scores into masks:
# `dkdp.thresholds.compute_masks` finds one global threshold τ over
# LAMP-normalised scores so that a target fraction of the weights falls
# below it, and each layer's own score distribution decides how much it
# loses. We prune whole units in one shot, *without* any retraining, and
# measure the validation accuracy left: the criterion whose choice hurts
# least has found the units the model relies on. (The output layer's
# units are never removed.)

# %%
SPARSITIES = [0.3, 0.5, 0.7, 0.8, 0.9]
output_layer = {layers[-1].name}
dense_masks = {l.name: np.ones(l.kernel_mask.shape, "float32") for l in layers}


def masks_for(crit, sparsity):
    return dkdp.thresholds.compute_masks(
        layers, [scores[crit][l.name] for l in layers], sparsity,
        granularity="unit", scope="global", normalize="lamp",
        protect_units=output_layer).masks


def apply(masks):
    dkdp.thresholds.apply_masks(layers, masks)
    dkdp.sync_batchnorm(model)  # removed filters are zeros after BatchNorm too


one_shot = {crit: [] for crit in CRITERIA}
kept_units = {}
for crit in CRITERIA:
    for s in SPARSITIES:
        apply(masks_for(crit, s))
        one_shot[crit].append(accuracy(model, x_val, y_val))
        if s == 0.9:
            kept_units[crit] = [int(l.unit_mask().numpy().sum()) for l in layers]
    apply(dense_masks)

fig, ax = plt.subplots(figsize=(6.5, 3.6))
for crit, accs in one_shot.items():
    ax.plot(SPARSITIES, accs, "o-", label=crit)
ax.axhline(dense_accuracy, color="gray", ls=":", label="unpruned")
ax.set(xlabel="fraction of weights removed (whole units)",
       ylabel="validation accuracy", title="One-shot unit pruning, no retraining")
ax.legend(fontsize=8)
plt.show()

table([[crit] + [f"{k}/{l.num_units}" for k, l in zip(kept_units[crit], layers)]
       for crit in CRITERIA], ["kept units at 90%"] + names)

# %% [markdown]
# Up to about 70% of the weights every criterion finds units the model
# can spare (mostly dead units of the Dense layer, see below); beyond
# that they part, and the table (units kept when 90% of the weights go)
# shows where. In this one-shot test, the criteria that measure a unit's
# effect on the output (output contribution) or its weights (magnitude)
# hold up best, and the two gradient-based ones, gradient and Taylor, do
# worst: a unit can have large gradients because it is not doing its
# job yet. Taylor, the default of
# `DKDPCallback`, is built for gradual pruning, where its statistics are
# refreshed between small steps, rather than for a 90% cut at once.
#
# The correlations above tell a related story: in the Dense layer the
# criteria mostly agree, while in the second convolution the weight
# magnitude is nearly unrelated to the data-driven criteria. The
# BatchNormalization after a convolution rescales each filter's output,
# so a filter's weight norm says little about its effect.
#
# A caveat on `LearnedMask` here: the convolutions are followed by
# BatchNormalization, which undoes any scaling of its input, so an L1
# penalty can shrink all gates of a convolution together without
# changing the function. Gates say most in layers with no normalisation
# after them (or put the penalty on BatchNorm's γ, as Network Slimming
# does).
#
# ## The report module
#
# After a Taylor pruning of 70% of the weights, `importance_summary`
# gives the per-layer table and two plots: what each layer keeps, and the
# distribution of unit scores in each layer (pruned units score 0).

# %%
apply(masks_for("Taylor", 0.7))
summary = dkdp.report.importance_summary(model, criterion="taylor", out_dir=OUT)
display(Markdown(summary.markdown))
for path in summary.plots:
    display(Image(filename=str(path), width=640))

# %% [markdown]
# ## What the kept units do
#
# Importance scores are also a way to read a model. The first
# convolution's 32 filters are edge and texture detectors; below are its
# 8 most and 8 least important by Taylor rank (top two rows, then bottom
# two), each with its response to one test image; red frames mark the
# filters that a 90% cut removes.

# %%
conv1 = layers[0]
kernels = conv1.kernel.numpy()[:, :, 0, :]  # 3x3 per filter
rank = np.argsort(np.argsort(-scores["Taylor"][conv1.name]))  # 0 = most important
mask = masks_for("Taylor", 0.9)[conv1.name]  # which filters a 90% cut removes
kept = mask.reshape(-1, conv1.num_units).max(axis=0) > 0
responses = keras.Model(model.inputs, conv1.output).predict(x_val[:1], verbose=0)[0]

order = np.argsort(rank)
shown = np.concatenate([order[:8], order[-8:]])  # 8 most, 8 least important
fig, axes = plt.subplots(4, 8, figsize=(9, 5), dpi=72)
for slot, f in enumerate(shown):
    row, col = 2 * (slot // 8), slot % 8
    axes[row, col].imshow(kernels[:, :, f], cmap="RdBu_r")
    axes[row + 1, col].imshow(responses[:, :, f], cmap="magma", interpolation="nearest")
    axes[row, col].set_title(f"#{rank[f] + 1}", fontsize=8,
                             color="black" if kept[f] else "tab:red")
    for ax in (axes[row, col], axes[row + 1, col]):
        ax.set_xticks([]); ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color("black" if kept[f] else "tab:red")
            spine.set_linewidth(0.5 if kept[f] else 2)
fig.suptitle("conv1: the 8 most and the 8 least important filters (Taylor rank)\n"
             "and their response to one image; red: removed when 90% of the weights go", fontsize=10)
fig.tight_layout()
plt.show()

# %% [markdown]
# Deeper in, the Dense(256) layer's units combine those features into
# evidence for classes. Here is the mean activation, per class, of its
# 12 most and 12 least important units (Taylor, on the unpruned model).
# Important units fire selectively, each mostly for one or a few
# classes: they are the features the output layer reads. The least
# important ones are silent for every class: "dead" ReLU units that no
# image switches on. Every criterion ranks them last, and removing them
# changes nothing; a good part of what pruning removes from this layer
# is of that kind.

# %%
apply(dense_masks)
fc = layers[2]
fc_out = keras.Model(model.inputs, fc.output).predict(x_val, batch_size=512, verbose=0)
per_class = np.stack([fc_out[y_val == c].mean(axis=0) for c in range(10)], axis=1)
order = np.argsort(-scores["Taylor"][fc.name])
picked = np.concatenate([order[:12], order[-12:]])

fig, ax = plt.subplots(figsize=(7, 6))
im = ax.imshow(per_class[picked], cmap="viridis", aspect="auto", interpolation="nearest")
ax.set_xticks(range(10), CLASSES, rotation=40, ha="right", fontsize=8)
ax.set_yticks(range(24), [f"unit {u}" for u in picked], fontsize=7)
ax.axhline(11.5, color="white", lw=2)
ax.set_title("mean activation per class: 12 most (top) and 12 least important units",
             fontsize=9)
fig.colorbar(im, ax=ax, shrink=0.8)
plt.show()

dead = int(np.sum(fc_out.max(axis=0) == 0))
print(f"mean activation: important units {per_class[order[:12]].mean():.3f}, "
      f"unimportant units {per_class[order[-12:]].mean():.3f}; "
      f"{dead} of {fc.num_units} units never fire on the validation images")

# %% [markdown]
# ## Check

# %%
for crit in CRITERIA:
    for layer in layers:
        s = scores[crit][layer.name]
        assert s.shape == (layer.num_units,) and np.all(np.isfinite(s)), (crit, layer.name)
# Pruning, then compacting, removes units for real with the same outputs.
apply(masks_for("Taylor", 0.7))
small = dkdp.compact(model)
assert small.count_params() < dkdp.count_params(model, nonzero=False) / 2
np.testing.assert_allclose(small.predict(x_val[:256], verbose=0),
                           model.predict(x_val[:256], verbose=0), atol=1e-4)
assert len(summary.plots) == 2 and all(p.exists() for p in summary.plots)
print("all checks passed")
