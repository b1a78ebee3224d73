"""What a person can look at: which parts of a model matter and what was
pruned, as a table and as PNG plots."""

import pathlib
import warnings

import keras
import numpy as np
from keras import ops

from dkdp_keras import importance as importance_lib
from dkdp_keras.compaction import compact
from dkdp_keras.prunable import iter_layers, masked_layers


def importance_summary(model, criterion="magnitude", out_dir=None, decision=None):
    """Per-layer importance and sparsity of a masked model.

    Args:
        model: a masked model (or a DKDPModel: its teacher is summarised).
        criterion: the importance criterion whose scores are shown
            (its name, an object or a callable), when no `decision` is given.
        out_dir: if given, `layer_sparsity.png` (kept weights and units per
            layer) and `importance_histograms.png` (the distribution of the
            scores in each layer, kept against pruned) are written there.
        decision: a `DKDPCallback.last_decision`: show the scores the run's
            own criterion gave at its last pruning event, the ones the masks
            were decided from, instead of scoring the model now (scores of
            the trained, masked model say nothing about why a pruned unit
            was chosen: a masked unit scores 0 by construction).

    Returns:
        A `Summary`: `rows` (one dict per layer: layer, type, units,
        kept_units, weights, kept_weights, sparsity, shipped_units,
        shipped_weights, mean_score), `markdown` (the table as text) and
        `plots` (paths of the PNG files). `kept_*` count the masks;
        `shipped_*` count the compacted model (`dkdp_keras.compact`), which
        also drops the inputs that removed units of the layer before fed.
    """
    model = getattr(model, "teacher", model)
    layers = masked_layers(model)
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no masked layer to summarise: make it "
            "with dkdp_keras.prunable(model) (a stripped or compacted model "
            "has its importance baked in)."
        )
    if decision is None:
        criterion = importance_lib.get(criterion)
        criterion.prepare(model)
        name, granularity, step = type(criterion).__name__, "unit", None
    else:
        name, granularity = decision["criterion"], decision["granularity"]
        step = decision["step"]
    shipped = _shipped(model)
    rows, layer_scores = [], []
    for layer in layers:
        mask = ops.convert_to_numpy(layer.kernel_mask)
        units = mask.reshape(-1, layer.num_units).max(axis=0) > 0
        if decision is None:
            scores = np.asarray(ops.convert_to_numpy(criterion.score(layer, "unit")))
        else:
            scores = np.asarray(decision["scores"][layer.name], "float64")
        kept = units if scores.shape == units.shape else mask.reshape(scores.shape) > 0
        layer_scores.append((scores.ravel(), kept.ravel()))
        kept_weights = int(np.count_nonzero(mask))
        ship_units, ship_weights = shipped.get(layer.name, (None, None))
        rows.append({
            "layer": layer.name,
            "type": type(layer).__name__.replace("Masked", ""),
            "units": layer.num_units,
            "kept_units": int(units.sum()),
            "weights": int(mask.size),
            "kept_weights": kept_weights,
            "sparsity": 1.0 - kept_weights / mask.size,
            "shipped_units": ship_units,
            "shipped_weights": ship_weights,
            "mean_score": float(scores[kept].mean()) if kept.any() else 0.0,
        })
    summary = Summary(rows, name, granularity, step)
    if out_dir is not None:
        summary.plots = _plot(rows, layer_scores, pathlib.Path(out_dir), summary)
    return summary


def _shipped(model):
    """Layer name -> (units, non-zero kernel weights) in `compact(model)`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = compact(model)
    out = {}
    for layer in iter_layers(small):
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        values = ops.convert_to_numpy(kernel)
        units = int(values.shape[-1])
        if isinstance(layer, keras.layers.DepthwiseConv2D) or isinstance(
            layer, getattr(keras.layers, "DepthwiseConv1D", ())
        ):
            units = int(values.shape[-2] * values.shape[-1])
        out[layer.name] = (units, int(np.count_nonzero(values)))
    return out


class Summary:
    """The result of `importance_summary`."""

    def __init__(self, rows, criterion, granularity="unit", step=None):
        self.rows = rows
        self.criterion = criterion
        self.granularity = granularity
        self.step = step
        self.plots = []

    @property
    def title(self):
        at = "" if self.step is None else f" at the pruning decision of step {self.step}"
        return f"{self.criterion} scores of each {self.granularity}{at}"

    @property
    def markdown(self):
        head = (f"| layer | type | kept units | shipped units | shipped weights | "
                f"kept weights (masks) | mean {self.criterion} ({self.granularity}s "
                "kept) |\n|---|---|---:|---:|---:|---:|---:|\n")

        def count(value):
            return "?" if value is None else f"{value:,}"

        body = "".join(
            f"| {r['layer']} | {r['type']} | {r['kept_units']}/{r['units']} | "
            f"{count(r['shipped_units'])} | {count(r['shipped_weights'])} | "
            f"{r['kept_weights']:,}/{r['weights']:,} | {r['mean_score']:.4g} |\n"
            for r in self.rows
        )
        return head + body

    def __str__(self):
        return self.markdown


def _plot(rows, layer_scores, out_dir, summary):
    # Figures made without pyplot: the caller's matplotlib backend (a
    # notebook's inline plots) stays as it was, and nothing is left open.
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    names = [r["layer"] for r in rows]
    fig = Figure(figsize=(max(5, 1.2 * len(rows)), 3.5))
    ax = fig.subplots()
    x = np.arange(len(rows))
    shipped = [(r["shipped_weights"] if r["shipped_weights"] is not None
                else r["kept_weights"]) / r["weights"] for r in rows]
    ax.bar(x - 0.2, shipped, 0.4, label="weights shipped (compacted)")
    ax.bar(x + 0.2, [r["kept_units"] / r["units"] for r in rows], 0.4,
           label="units kept")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction kept")
    ax.set_title("What each layer keeps")
    ax.legend()
    fig.tight_layout()
    bars = out_dir / "layer_sparsity.png"
    fig.savefig(bars, dpi=100)

    cols = min(4, len(rows))
    nrows = int(np.ceil(len(rows) / cols))
    fig = Figure(figsize=(3.2 * cols, 2.6 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, row, (scores, kept) in zip(axes.flat, rows, layer_scores):
        # Entries pruned before the decision score exactly 0 (a masked
        # entry scores nothing); they are counted, not drawn.
        earlier = ~kept & (scores == 0)
        now = ~kept & ~earlier
        shown = scores[kept | now]
        log = shown.size and shown.min() > 0 and shown.max() > 1e3 * shown.min()
        if not shown.size:
            bins = 30
        elif log:
            bins = np.geomspace(shown.min(), shown.max(), 31)
            ax.set_xscale("log")
        else:
            bins = np.histogram_bin_edges(shown, 30)
        ax.hist(scores[kept], bins=bins, color="tab:blue", alpha=0.8,
                label=f"kept ({int(kept.sum()):,})")
        if now.any():
            ax.hist(scores[now], bins=bins, color="tab:red", alpha=0.8,
                    label=f"pruned ({int(now.sum()):,})")
        if earlier.any():
            ax.plot([], [], " ", label=f"pruned before: {int(earlier.sum()):,}")
        ax.set_title(row["layer"], fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle(summary.title + ": kept (blue) and pruned (red)")
    fig.tight_layout()
    hist = out_dir / "importance_histograms.png"
    fig.savefig(hist, dpi=100)
    return [bars, hist]


def write_summaries(writer, step, tau, result, layers, importance, granularity):
    """TensorBoard summaries of one pruning event: τ, sparsity overall and
    per layer, and the layers' importance scores."""
    import tensorflow as tf

    with writer.as_default(step=step):
        tf.summary.scalar("dkdp/tau", tau)
        tf.summary.scalar("dkdp/sparsity", result.sparsity)
        for layer in layers:
            mask = result.masks[layer.name]
            tf.summary.scalar(f"dkdp_layer_sparsity/{layer.name}",
                              float((mask == 0).mean()))
            try:
                scores = importance.score(layer, granularity)
                tf.summary.histogram(f"dkdp_importance/{layer.name}", scores)
            except ValueError:
                pass
