"""What a person can look at: which parts of a model matter and what was
pruned, as a table and as PNG plots."""

import pathlib

import numpy as np
from keras import ops

from dkdp_keras import importance as importance_lib
from dkdp_keras.prunable import masked_layers


def importance_summary(model, criterion="magnitude", out_dir=None):
    """Per-layer importance and sparsity of a masked model.

    Args:
        model: a masked model (or a DKDPModel: its teacher is summarised).
        criterion: the importance criterion whose scores are shown
            (its name, an object or a callable).
        out_dir: if given, `layer_sparsity.png` (kept weights and units per
            layer) and `importance_histograms.png` (the distribution of unit
            scores in each layer, pruned units apart) are written there.

    Returns:
        A `Summary`: `rows` (one dict per layer: layer, type, units,
        kept_units, weights, kept_weights, sparsity, mean_score), `markdown`
        (the table as text) and `plots` (paths of the PNG files).
    """
    model = getattr(model, "teacher", model)
    layers = masked_layers(model)
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no masked layer to summarise: make it "
            "with dkdp_keras.prunable(model) (a stripped or compacted model "
            "has its importance baked in)."
        )
    criterion = importance_lib.get(criterion)
    criterion.prepare(model)
    rows, unit_scores = [], []
    for layer in layers:
        mask = ops.convert_to_numpy(layer.kernel_mask)
        units = mask.reshape(-1, layer.num_units).max(axis=0) > 0
        scores = np.asarray(ops.convert_to_numpy(criterion.score(layer, "unit")))
        unit_scores.append((scores, units))
        kept_weights = int(np.count_nonzero(mask))
        rows.append({
            "layer": layer.name,
            "type": type(layer).__name__.replace("Masked", ""),
            "units": layer.num_units,
            "kept_units": int(units.sum()),
            "weights": int(mask.size),
            "kept_weights": kept_weights,
            "sparsity": 1.0 - kept_weights / mask.size,
            "mean_score": float(scores[units].mean()) if units.any() else 0.0,
        })
    summary = Summary(rows, type(criterion).__name__)
    if out_dir is not None:
        summary.plots = _plot(rows, unit_scores, pathlib.Path(out_dir),
                              summary.criterion)
    return summary


class Summary:
    """The result of `importance_summary`."""

    def __init__(self, rows, criterion):
        self.rows = rows
        self.criterion = criterion
        self.plots = []

    @property
    def markdown(self):
        head = (f"| layer | type | kept units | kept weights | sparsity | "
                f"mean {self.criterion} (kept units) |\n"
                "|---|---|---:|---:|---:|---:|\n")
        body = "".join(
            f"| {r['layer']} | {r['type']} | {r['kept_units']}/{r['units']} | "
            f"{r['kept_weights']:,}/{r['weights']:,} | {r['sparsity']:.1%} | "
            f"{r['mean_score']:.4g} |\n"
            for r in self.rows
        )
        return head + body

    def __str__(self):
        return self.markdown


def _plot(rows, unit_scores, out_dir, criterion):
    # Figures made without pyplot: the caller's matplotlib backend (a
    # notebook's inline plots) stays as it was, and nothing is left open.
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    names = [r["layer"] for r in rows]
    fig = Figure(figsize=(max(5, 1.2 * len(rows)), 3.5))
    ax = fig.subplots()
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [1 - r["sparsity"] for r in rows], 0.4, label="kept weights")
    ax.bar(x + 0.2, [r["kept_units"] / r["units"] for r in rows], 0.4,
           label="kept units")
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
    for ax, row, (scores, kept) in zip(axes.flat, rows, unit_scores):
        bins = 30
        ax.hist(scores[kept], bins=bins, color="tab:blue", label="kept")
        if (~kept).any():
            ax.hist(scores[~kept], bins=bins, color="tab:red", label="pruned")
        ax.set_title(row["layer"], fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle(f"Unit importance ({criterion})")
    fig.tight_layout()
    hist = out_dir / "importance_histograms.png"
    fig.savefig(hist, dpi=100)
    return [bars, hist]
