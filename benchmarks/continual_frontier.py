"""The old/new balance of the continual mode, measured (issue 24): one
DKDP continual fit per seed (benchmarks/continual.py's split, budget,
replay and epochs; next_task's defaults, λ_old 3, EWC 100), then every
alignment strength s in 0, 0.1, ..., 1 applied to the same trained
networks (`continual.align_classes(..., strength=s)` on the output layer
as it was before the end-of-fit aligning), with and without
`next_task(regrow=budget)`. `--train-align S` passes `align=S` to
next_task, so that the student distils the teacher's logits aligned at
strength S during the fit (the default, 1, is next_task's).

One row per (seed, regrow, train_align, role, strength) in --out (JSONL);
a (seed, regrow, train_align) already there is not trained again. `--summary` prints the
means over seeds against plain fine-tuning (the rows of
benchmarks/results/continual.jsonl) with the issue's three targets, and
the strength that validation images choose under the issue's new-class
constraint (the highest all-class validation accuracy whose new-class
validation accuracy is within 2 pp of fine-tuning's).

    python benchmarks/continual_frontier.py --seeds 0 1 2
    python benchmarks/continual_frontier.py --seeds 0 1 2 --regrow no --train-align 0.3
    python benchmarks/continual_frontier.py --summary
"""

import argparse
import json
import pathlib

import keras
import numpy as np

import continual as bench
import dkdp_keras as dkdp
from dkdp_keras import continual

HERE = pathlib.Path(__file__).resolve().parent
STRENGTHS = [round(s, 1) for s in np.linspace(0, 1, 11)]


class Unaligned(keras.callbacks.Callback):
    """Keeps the output kernels as training left them: `fit` aligns them
    after its callbacks' `on_train_end`."""

    def __init__(self, model):
        super().__init__()
        self.dkdp_model = model

    def on_train_end(self, logs=None):
        self.kernels = {role: keras.ops.convert_to_numpy(continual.output_layer(
            getattr(self.dkdp_model, role)).kernel) for role in ("teacher", "student")}


def run(seed, regrow, d, settings, work, train_align=1.0, logits=None, lambda_old=3.0):
    model, _ = bench.after_a(seed, d, settings, work / f"seed{seed}")
    before = {r: bench.accuracy(getattr(model, r), *d["a_test"]) for r in ("teacher", "student")}
    _, mix, steps, val = bench.task_b(seed, d, settings)
    budget = bench.budget()
    model.next_task(*d["a"], buffer_size=settings["buffer"], seed=seed,
                    regrow=budget if regrow else None, align=train_align,
                    lambda_old=lambda_old)
    params_after_next_task = dkdp.count_params(dkdp.compact(model.teacher))
    keep = Unaligned(model)
    keras.utils.set_random_seed(seed + 1)
    model.fit(mix, steps_per_epoch=steps, epochs=settings["epochs_b"],
              validation_data=val, callbacks=[bench.dkdp_callback(), keep], verbose=0)
    rows, saved = [], {}
    for role in ("teacher", "student"):
        net = getattr(model, role)
        layer = continual.output_layer(net)
        for s in STRENGTHS:
            layer.kernel.assign(keep.kernels[role])
            factor = continual.align_classes(net, bench.OLD, bench.NEW, strength=s)
            if logits is not None and s == 0.0:  # unaligned: any post-hoc correction, offline
                saved[f"{role}_bias"] = keras.ops.convert_to_numpy(layer.bias)
                for part in ("a_test", "b_test", "a_val", "b_val"):
                    saved[f"{role}_{part}"] = net.predict(d[part][0], verbose=0)
            if s == 1.0:
                saved[f"{role}_gain"] = np.float32(factor)  # g, at full strength
            row = {"seed": seed, "regrow": regrow, "train_align": train_align,
                   "lambda_old": lambda_old,
                   "role": role, "strength": s,
                   **bench.scores(net, d), "old_acc_after_a": before[role],
                   "teacher_params_after_next_task": params_after_next_task,
                   "budget": budget.max_params}
            row["forgetting"] = row["old_acc_after_a"] - row["old_acc"]
            rows.append(row)
        print(role, [(r["strength"], round(r["old_acc"], 3), round(r["new_acc"], 3))
                     for r in rows if r["role"] == role], flush=True)
    if logits is not None:
        pathlib.Path(logits).mkdir(parents=True, exist_ok=True)
        np.savez(pathlib.Path(logits) / f"seed{seed}-regrow{int(regrow)}-align{train_align:g}"
                 f"-lambda_old{lambda_old:g}.npz",
                 **saved, **{f"y_{part}": d[part][1] for part in
                             ("a_test", "b_test", "a_val", "b_val")})
    return rows


def setting(row):
    """What a continual fit was run with: (regrow, next_task's align,
    lambda_old); rows written before --train-align and --lambda-old had
    next_task's defaults, 1 and 3."""
    return row["regrow"], row.get("train_align", 1.0), row.get("lambda_old", 3.0)


def summary(rows, finetune):
    ft = {r["seed"]: r for r in finetune}
    ft_forget = np.mean([f["old_acc_after_a"] - f["old_acc"] for f in ft.values()])
    lines = [f"fine-tuning ({len(ft)} seeds): forgetting {100 * ft_forget:.1f} pp; targets: "
             "all-class ≥ +10 pp, forgetting ≤ half of fine-tuning's, new-class ≥ −2 pp", ""]
    runs = {(*setting(r), r["role"]) for r in rows}
    for regrow, train_align, lambda_old, role in sorted(
            runs, key=lambda k: (k[0], -k[1], k[2], k[3])):
        mine = [r for r in rows if (*setting(r), r["role"]) == (regrow, train_align,
                                                                 lambda_old, role)]
        seeds = sorted({r["seed"] for r in mine} & set(ft))
        if not seeds:
            continue
        lines += [f"### {role}, regrow {regrow}, trained at align {train_align:g}, "
                  f"lambda_old {lambda_old:g} ({len(seeds)} seeds)", "",
                  "| s | old | new | all | all − ft | forgetting | new − ft | val all "
                  "| val new − ft | targets |", "|---:|" + "---:|" * 9]
        table = []
        for s in STRENGTHS:
            at = [next(r for r in mine if r["seed"] == k and r["strength"] == s)
                  for k in seeds]
            m = {key: np.mean([r[key] for r in at]) for key in
                 ("old_acc", "new_acc", "all_acc", "forgetting", "all_val_acc")}
            gain = np.mean([r["all_acc"] - ft[r["seed"]]["all_acc"] for r in at])
            new = np.mean([r["new_acc"] - ft[r["seed"]]["new_acc"] for r in at])
            val_new = np.mean([r["new_val_acc"] - ft[r["seed"]]["new_val_acc"] for r in at])
            met = [gain >= 0.10, m["forgetting"] <= ft_forget / 2, new >= -0.02]
            table.append((s, m, val_new, met))
            lines.append(
                f"| {s:.1f} | {m['old_acc']:.2%} | {m['new_acc']:.2%} | {m['all_acc']:.2%} "
                f"| {100 * gain:+.1f} | {100 * m['forgetting']:.1f} | {100 * new:+.1f} "
                f"| {m['all_val_acc']:.2%} | {100 * val_new:+.1f} "
                f"| {''.join('✓' if x else '✗' for x in met)} |")
        free = max(table, key=lambda t: t[1]["all_val_acc"])
        held = [t for t in table if t[2] >= -0.02]
        chosen = max(held, key=lambda t: t[1]["all_val_acc"]) if held else None
        lines += ["", f"validation's choice: s {free[0]:.1f} (highest all-class); under the "
                  "new-class constraint: " + (f"s {chosen[0]:.1f}" if chosen else "none"),
                  f"all three targets at once at any s: "
                  f"{'yes' if any(all(t[3]) for t in table) else 'no'}", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--regrow", choices=("no", "yes", "both"), default="both")
    parser.add_argument("--work", default=str(HERE / "work" / "continual" / "full"))
    parser.add_argument("--out", default=str(HERE / "results" / "continual_frontier.jsonl"))
    parser.add_argument("--train-align", type=float, default=1.0,
                        help="next_task's align during the fit (the student's target)")
    parser.add_argument("--lambda-old", type=float, default=3.0,
                        help="next_task's lambda_old (the old-class distillation's weight)")
    parser.add_argument("--logits", default=None,
                        help="also save each run's unaligned logits (test and validation) here")
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if not args.summary:
        settings, work = bench.FULL, pathlib.Path(args.work)
        d = bench.data(settings)
        for seed in args.seeds:
            for regrow in {"no": [False], "yes": [True], "both": [False, True]}[args.regrow]:
                wanted = (regrow, args.train_align, args.lambda_old)
                if any(r["seed"] == seed and setting(r) == wanted for r in rows):
                    continue
                print(f"== seed {seed}, regrow {regrow}, align {args.train_align:g}", flush=True)
                new = run(seed, regrow, d, settings, work, args.train_align, args.logits,
                          args.lambda_old)
                with open(out, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in new)
                rows += new
    finetune = [json.loads(line) for line in
                (HERE / "results" / "continual.jsonl").read_text().splitlines()]
    print(summary(rows, [r for r in finetune if r["method"] == "finetune"]))


if __name__ == "__main__":
    main()
