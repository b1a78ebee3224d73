"""The accuracy/size and accuracy/latency plot of one model's rows.

Each point carries a number; a key under the plots gives, for each number,
the system, the variant and the TFLite test accuracy. Names written beside the
points (the earlier plot) stacked into towers over the title once a model had
twenty rows at nearly one accuracy, as model 3 has.

The accuracy axis spans the band the models are in: a row far under the best
(model 3's plain dense at 58.64%, against 84-91% for every other row) would
squeeze that band into a strip. Such a row is drawn on the axis' floor as a
downward triangle; its accuracy is in the key.
"""
import math

COLORS = {"dense": "black", "tfmot": "tab:orange", "tfmot_xnnpack": "tab:brown",
          "kd": "tab:blue", "dkdp": "tab:red", "dense_avg": "tab:gray", "ablation": "tab:pink"}
BAND_PP = 10.0  # rows more than this under the best are drawn on the floor
WIDTH_IN = 11.0
KEY_LINE_IN = 0.15  # inches per line of the key
KEY_CHAR_IN = 6.5 * 0.6 / 72  # a monospace character at fontsize 6.5


def tick_label(value, unit):
    """A log-axis tick written plainly: "0.02" (ms), "300 kB", "1 MB"."""
    if unit == "bytes":
        return f"{value / 1e6:g} MB" if value >= 1e6 else f"{value / 1e3:g} kB"
    return f"{value:g}"


def plotted(rows, model, order):
    """The model's rows a plot shows, in the report table's order (`order`:
    system -> rank), each numbered from 1 as in the key."""
    pts = [r for r in rows if r["model"] == model and r["system"] in COLORS]
    pts.sort(key=lambda r: (order.get(r["system"], len(order)), r["target"], r["variant"]))
    return list(enumerate(pts, start=1))


def accuracy_range(accs):
    """(low, high, floor) of the accuracy axis, in %: the band of rows within
    BAND_PP of the best, with room above for the numbers; rows under `floor`
    are drawn on it."""
    best = max(accs)
    band = [a for a in accs if a >= best - BAND_PP]
    span = max(best - min(band), 1.0)
    low = min(band) - 0.15 * span
    return low, best + 0.25 * span, low + 0.03 * span


def number_apart(ax, points, xs, ys):
    """Write each point's number beside it, a number moved up by a line while
    it would cover one already placed."""
    placed = []  # (x0, x1, y) in points
    line, width = 7.5, 4.0  # points per line and per digit at fontsize 6.5
    per_pixel = 72.0 / ax.figure.dpi
    right = ax.get_window_extent().x1 * per_pixel
    for (n, _), x, y in sorted(zip(points, xs, ys), key=lambda p: (p[2], p[1])):
        px, py = ax.transData.transform((x, y)) * per_pixel
        size = width * len(str(n))
        left = px + 3 + size > right
        x0, x1 = (px - 3 - size, px - 3) if left else (px + 3, px + 3 + size)
        lift = 1.0
        while any(a < x1 and x0 < b and abs(py + lift - c) < line for a, b, c in placed):
            lift += line
        placed.append((x0, x1, py + lift))
        text = ax.annotate(str(n), (x, y), fontsize=6.5, xytext=(-3 if left else 3, lift),
                           textcoords="offset points", ha="right" if left else "left",
                           arrowprops=None if lift == 1.0 else {"arrowstyle": "-", "lw": 0.3,
                                                                "color": "0.5"})
        text.set_in_layout(False)


def pareto_plot(rows, model, path, order):
    """Write the plot of `model`'s rows to `path` (PNG); return its axes'
    labels (x, y) and legend entries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    points = plotted(rows, model, order)
    if not points:
        return
    entries = [f"{n:>2}  {r['system']}: {r['variant']}, {100 * r['tflite_test_acc']:.2f}%"
               for n, r in points]
    # As many columns as the longest entry leaves room for, at most three.
    column_in = max(len(e) for e in entries) * KEY_CHAR_IN + 0.25
    columns = max(1, min(3, int((WIDTH_IN - 0.2) // column_in)))
    per_column = math.ceil(len(points) / columns)
    key_in = KEY_LINE_IN * per_column + 0.35
    fig = plt.figure(figsize=(WIDTH_IN, 4 + key_in))
    axes = fig.subplots(1, 2)
    accs = [100 * r["tflite_test_acc"] for _, r in points]
    low, high, floor = accuracy_range(accs)
    # Milliseconds hold within one machine; a ledger's rows timed on several
    # are placed by their ratio to dense, timed beside each on its machine.
    machines = {r.get("machine") for _, r in points}
    latency = (("lat_b1_ms", "ms", (1.0, 2.0, 5.0), "batch-1 latency, ms (log)")
               if len(machines) <= 1 else
               ("lat_b1_x_dense", "x", (1.0, 2.0, 5.0),
                f"batch-1 latency × dense's on the same machine (log; {len(machines)} machines)"))
    ys = [max(a, floor) for a in accs]
    any_below = any(a < floor for a in accs)
    for ax, (key, unit, subs, label) in zip(
            axes, (("tflite_bytes", "bytes", (1.0, 3.0), "TFLite file size (log)"), latency)):
        xs = [r[key] for _, r in points]
        for system, color in COLORS.items():
            mine = [i for i, (_, r) in enumerate(points) if r["system"] == system]
            legend = system  # once per system, on whichever marker it shows first
            for marker, below in (("o", False), ("v", True)):
                sel = [i for i in mine if (accs[i] < floor) == below]
                if sel:
                    ax.scatter([xs[i] for i in sel], [ys[i] for i in sel], color=color, s=28,
                               marker=marker, label=legend, clip_on=False, zorder=3)
                    legend = None
        ax.set_xscale("log")
        ax.set_ylim(low, high)
        if any_below:
            ax.text(0.005, 0.005, f"▼ under {floor:.0f}%: at the floor, accuracy in the key",
                    transform=ax.transAxes, fontsize=6.5, color="0.35", va="bottom")
        # Plain labels ("300 kB", "0.02") at 1-3 ticks per decade for sizes (two
        # decades) and 1-2-5 for latencies (about one): matplotlib's default
        # labels every minor tick "2x10^-2", and on a short axis they overlap.
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=subs))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(
            lambda v, _, unit=unit: tick_label(v, unit)))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("TFLite test accuracy, %")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="center left" if any_below else "lower left")
    fig.suptitle(f"{model}: accuracy against size and latency (Fashion-MNIST test set)")
    height = 4 + key_in
    fig.tight_layout(rect=(0, key_in / height, 1, 1))
    fig.canvas.draw()  # the axes' final place, which number_apart measures
    for ax, key in zip(axes, ("tflite_bytes", latency[0])):
        number_apart(ax, points, [r[key] for _, r in points], ys)
    top = (key_in - 0.2) / height
    for i, ((_, r), entry) in enumerate(zip(points, entries)):
        column, line = divmod(i, per_column)
        fig.text(0.02 + column * column_in / WIDTH_IN, top - line * KEY_LINE_IN / height, entry,
                 fontsize=6.5, color=COLORS[r["system"]], va="top", family="monospace")
    fig.savefig(path, dpi=110)
    shown = [(ax.get_xlabel(), ax.get_ylabel()) for ax in axes], [
        t.get_text() for t in axes[0].get_legend().get_texts()]
    plt.close(fig)
    return shown
