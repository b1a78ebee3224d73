"""Continual learning under a held budget (issue 24): Fashion-MNIST classes
0-4, then 5-9, one output layer (class-incremental), tutorial 04's data,
budget and epochs, the same class-balanced replay buffer for every method.

Methods (one row each per seed, in --out, JSONL):
- finetune: the plain model of the budget's size, fine-tuned on B + buffer;
- lwf: the same, plus distillation of its own task-A outputs on the old
  classes (`dkdp_keras.continual.old_class_distillation`, weight and
  temperature as DKDP's) and the same output aligning: LwF alone;
- dkdp_teacher, dkdp_student: `DKDPModel.next_task`, then B under the same
  budget (one fit: both rows from it), as shipped; --ewc sets next_task's
  EWC weight;
- dkdp_no_continual: DKDP on B + buffer without `next_task` (tutorial 04's
  run before the continual mode);
- joint: the plain model trained on A and B together for all the epochs
  (an upper bound).

λ_old, T and the EWC weight are chosen on validation images, never on
the test images: `--summary` reports each method at the setting whose mean
all-class validation accuracy over the seeds is highest (for DKDP, the mean
of teacher and student, one setting for both), and every setting tried.

Task A is trained once per seed (WORK/seed<S>/after_a_*.keras); a row that
is in --out is not run again, so an interrupted run continues.

    python benchmarks/continual.py --seeds 0 1 2
    python benchmarks/continual.py --summary
"""

import argparse
import json
import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dkdp_keras as dkdp  # noqa: E402
import protocol  # noqa: E402
from dkdp_keras import continual  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
OLD, NEW = np.arange(5), np.arange(5, 10)
SPLIT = "fashion_mnist:0-4>5-9"
METHODS = ("finetune", "lwf", "dkdp", "dkdp_no_continual", "joint")
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
FULL = {"task": 10000, "val": 2000, "epochs_a": 5, "epochs_b": 4, "buffer": 500}
QUICK = {"task": 1500, "val": 300, "epochs_a": 2, "epochs_b": 2, "buffer": 75}
WIDTH, BATCH = 0.3, 64


def data(settings):
    (x, y), (xt, yt) = dkdp.datasets.load("fashion_mnist", as_numpy=True)
    (x, y), (xv, yv) = dkdp.datasets.validation_split(x, y)

    def task(x, y, classes, n):
        keep = np.flatnonzero(np.isin(y, classes))[:n]
        return x[keep], y[keep]

    n, nv = settings["task"], settings["val"]
    return {"a": task(x, y, OLD, n), "b": task(x, y, NEW, n),
            "a_val": task(xv, yv, OLD, nv), "b_val": task(xv, yv, NEW, nv),
            "a_test": task(xt, yt, OLD, 5000), "b_test": task(xt, yt, NEW, 5000)}


def accuracy(net, x, y):
    return float(np.mean(net.predict(x, batch_size=512, verbose=0).argmax(-1) == y))


def budget():
    return dkdp.Budget(max_params=dkdp.zoo.reference_cnn(width=WIDTH).count_params())


def dkdp_callback():
    # Tutorial 04's: every model ends at its last epoch, as the plain ones.
    return dkdp.DKDPCallback(
        importance=dkdp.importance.Taylor(), granularity="unit",
        threshold=dkdp.thresholds.Adaptive(budget(), tolerance=0.01, restore_best=False),
        average=False, verbose=0)


def plain(seed):
    keras.utils.set_random_seed(seed)
    net = dkdp.zoo.reference_cnn(width=WIDTH, name="plain")
    net.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS, metrics=["accuracy"])
    return net


class LwF(keras.Model):
    """A plain network that also distils a frozen copy of itself on the old
    classes: CE + lambda_old · L_old, as DKDP's teacher in continual mode."""

    def __init__(self, net, previous, lambda_old, temperature):
        super().__init__()
        self.net, self.previous = net, previous
        self.lambda_old, self.temperature = lambda_old, temperature
        self.tracker = keras.metrics.Mean(name="loss")

    def call(self, x, training=False):
        return self.net(x, training=training)

    def train_step(self, data):
        x, y = data
        target = self.previous(x, training=False)
        with tf.GradientTape() as tape:
            logits = self.net(x, training=True)
            loss = LOSS(y, logits) + self.lambda_old * continual.old_class_distillation(
                target, logits, OLD.astype("int32"), self.temperature)
        variables = self.net.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        self.tracker.update_state(loss)
        return {"loss": self.tracker.result()}

    @property
    def metrics(self):
        return [self.tracker]


def after_a(seed, d, settings, work):
    """The DKDP model and the plain model after task A (trained once)."""
    work.mkdir(parents=True, exist_ok=True)
    paths = work / "after_a_dkdp.keras", work / "after_a_plain.keras"
    if not all(p.exists() for p in paths):
        (xa, ya), steps = d["a"], len(d["a"][0]) // BATCH
        keras.utils.set_random_seed(seed)
        model = dkdp.DKDPModel(dkdp.zoo.reference_cnn(),
                               student=dkdp.zoo.reference_cnn(width=WIDTH, name="student"))
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS, metrics=["accuracy"])
        model.fit(protocol.pipeline(xa, ya, BATCH, seed), steps_per_epoch=steps,
                  epochs=settings["epochs_a"], validation_data=d["a_val"],
                  callbacks=[dkdp_callback()], verbose=2)
        model.save(paths[0])
        net = plain(seed)
        net.fit(protocol.pipeline(xa, ya, BATCH, seed), steps_per_epoch=steps,
                epochs=settings["epochs_a"], verbose=2)
        net.save(paths[1])
    return [keras.saving.load_model(p) for p in paths]


def scores(net, d, prefix=""):
    old, new = accuracy(net, *d["a_test"]), accuracy(net, *d["b_test"])
    old_val, new_val = accuracy(net, *d["a_val"]), accuracy(net, *d["b_val"])
    called_new = float(np.mean(np.isin(net.predict(d["a_test"][0], verbose=0).argmax(-1), NEW)))
    return {"old_acc": old, "new_acc": new, "all_acc": (old + new) / 2,
            "old_val_acc": old_val, "new_val_acc": new_val, "all_val_acc": (old_val + new_val) / 2,
            "old_called_new": called_new}


def task_b(seed, d, settings):
    """`(replay, mix, steps, val)`: the class-balanced buffer of task A,
    task B's training pipeline with it and its steps an epoch, and the
    validation data (B's validation images and a 5% buffer of A's)."""
    replay = continual.ReplayBuffer.select(*d["a"], settings["buffer"], seed=seed)
    xb, yb = d["b"]
    mix = replay.mix(xb, yb, BATCH, seed=seed + 1)
    mix_val = continual.ReplayBuffer.select(*d["a_val"], int(0.05 * settings["val"]), seed=seed)
    val = (np.concatenate([d["b_val"][0], mix_val.x]), np.concatenate([d["b_val"][1], mix_val.y]))
    return replay, mix, replay.steps(xb, BATCH), val


def run_method(method, seed, d, settings, work, args):
    """The rows of one method on one seed."""
    model, net = after_a(seed, d, settings, work)
    replay, mix, steps, val = task_b(seed, d, settings)
    (xb, yb), epochs = d["b"], settings["epochs_b"]
    before = {"teacher": accuracy(model.teacher, *d["a_test"]),
              "student": accuracy(model.student, *d["a_test"]),
              "plain": accuracy(net, *d["a_test"])}
    keras.utils.set_random_seed(seed + 1)
    start = time.perf_counter()
    settings_row = {"lambda_old": args.lambda_old, "temperature": args.temperature,
                    "ewc": args.ewc if method == "dkdp" else 0.0, "buffer": len(replay)}
    if method == "finetune":
        net.fit(mix, steps_per_epoch=steps, epochs=epochs, verbose=0)
        nets = {"finetune": (net, "plain")}
    elif method == "lwf":
        previous = keras.models.clone_model(net)
        previous.set_weights(net.get_weights())
        previous.trainable = False
        trainer = LwF(net, previous, args.lambda_old, args.temperature)
        trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
        trainer.fit(mix, steps_per_epoch=steps, epochs=epochs, verbose=0)
        continual.align_classes(net, OLD, NEW)
        nets = {"lwf": (net, "plain")}
    elif method == "joint":
        net = plain(seed)
        x = np.concatenate([d["a"][0], xb])
        y = np.concatenate([d["a"][1], yb])
        net.fit(protocol.pipeline(x, y, BATCH, seed), steps_per_epoch=len(x) // BATCH,
                epochs=settings["epochs_a"] + epochs, verbose=0)
        nets = {"joint": (net, "plain")}
    else:
        if method == "dkdp":
            replay = model.next_task(*d["a"], buffer_size=settings["buffer"],
                                     lambda_old=args.lambda_old, temperature=args.temperature,
                                     ewc=args.ewc, seed=seed)
        history = model.fit(mix, steps_per_epoch=steps, epochs=epochs, validation_data=val,
                            callbacks=[dkdp_callback()], verbose=0)
        settings_row["budget_usage"] = max(history.history["budget_usage"])
        name = "dkdp_continual" if method == "dkdp" else method
        nets = {f"{name}_teacher": (model.teacher, "teacher"),
                f"{name}_student": (model.student, "student")}
    seconds = time.perf_counter() - start
    rows = []
    for name, (trained, role) in nets.items():
        params = (dkdp.count_params(dkdp.compact(trained)) if role == "teacher"
                  else trained.count_params())
        row = {"method": name, "seed": seed, "split": SPLIT, **scores(trained, d),
               "params": int(params), "budget": budget().max_params,
               "old_acc_after_a": before["plain" if method == "joint" else role],
               **settings_row, "seconds_b": round(seconds, 1)}
        row["forgetting"] = row["old_acc_after_a"] - row["old_acc"]
        rows.append(row)
    return rows


def setting(row):
    """The tuned values of a row: (λ_old, T, EWC weight)."""
    return row["lambda_old"], row["temperature"], row.get("ewc", 0.0)


def chosen(by, method):
    """The setting of `method` (and its partner, for DKDP's teacher and
    student) with the highest mean all-class validation accuracy over
    its seeds, and its rows."""
    family = [method.replace("_student", "_teacher"), method.replace("_teacher", "_student")]
    family = [m for m in dict.fromkeys(family) if m in by]
    scores = {}
    for m in family:
        for r in by[m]:
            scores.setdefault(setting(r), []).append(r["all_val_acc"])
    best = max(scores, key=lambda k: np.mean(scores[k]))
    return best, [r for r in by[method] if setting(r) == best]


def summary(rows):
    """Mean ± sd per method at its chosen setting, every setting tried,
    and the issue's targets against fine-tuning."""
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)

    def ms(values):
        return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1 if len(values) > 1 else 0):.1f}"

    def params(rs):
        low, high = min(r["params"] for r in rs), max(r["params"] for r in rs)
        return f"{low:,}" if low == high else f"{low:,}-{high:,}"

    def line(name, rs, extra=""):
        return (f"| {name}{extra} | {len(rs)} | {ms([r['old_acc'] for r in rs])} | "
                f"{ms([r['new_acc'] for r in rs])} | {ms([r['all_acc'] for r in rs])} | "
                f"{ms([r['forgetting'] for r in rs])} | {params(rs)} |")

    header = ["| method | seeds | old acc | new acc | all acc | forgetting | params |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    lines, picked = list(header), {}
    for method in by:
        best, rs = chosen(by, method)
        picked[method] = rs
        tuned = len({setting(r) for r in by[method]}) > 1
        note = f" (λ_old {best[0]:g}, T {best[1]:g}, EWC {best[2]:g})" if tuned else ""
        lines.append(line(method, rs, note))
    lines += ["", "Every setting tried (the test figures beside the validation figure "
              "that chose):", "",
              "| method | λ_old | T | EWC | seeds | all acc (val) | old acc | new acc | all acc |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, method_rows in by.items():
        settings = sorted({setting(r) for r in method_rows})
        if len(settings) < 2:
            continue
        for k in settings:
            rs = [r for r in method_rows if setting(r) == k]
            lines.append(f"| {method} | {k[0]:g} | {k[1]:g} | {k[2]:g} | {len(rs)} | "
                         f"{ms([r['all_val_acc'] for r in rs])} | {ms([r['old_acc'] for r in rs])} | "
                         f"{ms([r['new_acc'] for r in rs])} | {ms([r['all_acc'] for r in rs])} |")
    ft = {r["seed"]: r for r in picked.get("finetune", [])}
    for method in ("dkdp_continual_teacher", "dkdp_continual_student", "lwf", "joint"):
        pairs = [(r, ft[r["seed"]]) for r in picked.get(method, []) if r["seed"] in ft]
        if not pairs:
            continue
        gain = np.mean([r["all_acc"] - f["all_acc"] for r, f in pairs])
        forget = np.mean([r["forgetting"] for r, _ in pairs])
        forget_ft = np.mean([f["forgetting"] for _, f in pairs])
        new = np.mean([r["new_acc"] - f["new_acc"] for r, f in pairs])
        lines.append(f"\n{method} against finetune ({len(pairs)} seeds): all-class "
                     f"{100 * gain:+.1f} pp ({'met' if gain >= 0.10 else 'NOT met'}: >= +10); "
                     f"forgetting {100 * forget:.1f} against {100 * forget_ft:.1f} pp "
                     f"({'met' if forget <= forget_ft / 2 else 'NOT met'}: <= half); new-class "
                     f"{100 * new:+.1f} pp ({'met' if new >= -0.02 else 'NOT met'}: >= -2)")
    return "\n".join(lines)


def key(method, seed, args):
    """What identifies a run: λ_old and T only for the methods that use them."""
    tuned = method in ("lwf", "dkdp")
    ewc = (args.ewc,) if method == "dkdp" else ()
    return (method, seed) + ((args.lambda_old, args.temperature) + ewc if tuned else ())


def key_of(row):
    method = row["method"]
    for suffix in ("_teacher", "_student"):
        method = method[: -len(suffix)] if method.endswith(suffix) else method
    method = {"dkdp_continual": "dkdp"}.get(method, method)
    args = argparse.Namespace(lambda_old=row["lambda_old"], temperature=row["temperature"],
                              ewc=row.get("ewc", 0.0))
    return key(method, row["seed"], args)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--quick", action="store_true", help="small data, 2+2 epochs")
    parser.add_argument("--work", default=str(HERE / "work" / "continual"))
    parser.add_argument("--out", default=str(HERE / "results" / "continual.jsonl"))
    parser.add_argument("--lambda-old", type=float, default=3.0)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--ewc", type=float, default=0.0, help="next_task's EWC weight (dkdp)")
    parser.add_argument("--summary", action="store_true", help="only print the summary")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if not args.summary:
        settings = QUICK if args.quick else FULL
        d = data(settings)
        work = pathlib.Path(args.work) / ("quick" if args.quick else "full")
        for seed in args.seeds:
            for method in args.methods:
                if key(method, seed, args) in {key_of(r) for r in rows}:
                    continue
                print(f"== seed {seed}: {method}", flush=True)
                new = run_method(method, seed, d, settings, work / f"seed{seed}", args)
                out.parent.mkdir(parents=True, exist_ok=True)
                with open(out, "a") as f:
                    for row in new:
                        f.write(json.dumps(row) + "\n")
                        print(json.dumps(row), flush=True)
                rows += new
    print(summary(rows))


if __name__ == "__main__":
    main()
