"""Is there a post-hoc correction of the continual teacher's head that
meets issue 24's three targets at once? Reads the unaligned logits that
`continual_frontier.py --logits DIR` saves (test and validation images of
the old and new classes, one file per seed) and tries, on the same
networks, every point of a two-parameter family of the new classes'
logits: Weight Aligning's strength s (z + (g**s - 1)(z - b), as
`continual.align_classes` leaves them) and a shift beta subtracted from
them (the bias half of BiC, Wu et al. 2019). Prints how many (s, beta)
meet the three targets on the test images (means over seeds, against
fine-tuning's rows in results/continual.jsonl) and the point validation
chooses under the new-class constraint, with and without beta.

    python benchmarks/continual_posthoc.py DIR ROWS.jsonl [--role teacher]

ROWS.jsonl: the rows `continual_frontier.py` wrote for the same runs
(their old-class accuracy after task A).
"""

import argparse
import json
import pathlib

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
NEW = np.arange(5, 10)
STRENGTHS = np.round(np.linspace(0, 1, 21), 2)
SHIFTS = np.round(np.linspace(-6, 4, 51), 2)


def corrected(z, bias, gain, s, beta):
    z = z.copy()
    z[:, NEW] += (gain ** s - 1) * (z[:, NEW] - bias[NEW]) - beta
    return z


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logits")
    parser.add_argument("rows")
    parser.add_argument("--role", default="teacher", choices=("teacher", "student"))
    args = parser.parse_args()
    ft = {r["seed"]: r for r in map(json.loads, open(HERE / "results" / "continual.jsonl"))
          if r["method"] == "finetune"}
    bound = np.mean([f["old_acc_after_a"] - f["old_acc"] for f in ft.values()]) / 2
    after_a = {r["seed"]: r["old_acc_after_a"] for r in map(json.loads, open(args.rows))
               if r["role"] == args.role}
    runs = {int(f.name.split("-")[0][4:]): np.load(f)
            for f in sorted(pathlib.Path(args.logits).glob("seed*.npz"))}
    table = {}
    for s in STRENGTHS:
        for beta in SHIFTS:
            per_seed = []
            for seed, d in runs.items():
                gain, bias = float(d[f"{args.role}_gain"]), d[f"{args.role}_bias"]
                acc = {part: float(np.mean(corrected(d[f"{args.role}_{part}"], bias, gain, s, beta)
                                           .argmax(-1) == d[f"y_{part}"]))
                       for part in ("a_test", "b_test", "a_val", "b_val")}
                per_seed.append({
                    "old": acc["a_test"], "new": acc["b_test"],
                    "val_all": (acc["a_val"] + acc["b_val"]) / 2,
                    "val_new_vs_ft": acc["b_val"] - ft[seed]["new_val_acc"],
                    "all_vs_ft": (acc["a_test"] + acc["b_test"]) / 2 - ft[seed]["all_acc"],
                    "new_vs_ft": acc["b_test"] - ft[seed]["new_acc"],
                    "forgetting": after_a[seed] - acc["a_test"]})
            table[(s, beta)] = {k: np.mean([p[k] for p in per_seed]) for k in per_seed[0]}
    met = [k for k, m in table.items() if m["all_vs_ft"] >= 0.10
           and m["forgetting"] <= bound and m["new_vs_ft"] >= -0.02]
    print(f"{args.role}, {len(runs)} seeds, {len(table)} points (s, beta): "
          f"{len(met)} meet all three targets on the test images "
          f"(all-class >= +10 pp, forgetting <= {100 * bound:.1f} pp, new-class >= -2 pp)")
    kept = [k for k, m in table.items() if m["forgetting"] <= bound]
    if kept:
        k = max(kept, key=lambda k: table[k]["new_vs_ft"])
        print(f"closest: with forgetting within the bound, new-class at best "
              f"{100 * table[k]['new_vs_ft']:+.1f} pp vs fine-tuning (s {k[0]:g}, beta {k[1]:g}; "
              f"all {100 * table[k]['all_vs_ft']:+.1f} pp)")
    for name, points in (("s and beta", table), ("s alone", {k: v for k, v in table.items()
                                                             if k[1] == 0.0})):
        held = [k for k, m in points.items() if m["val_new_vs_ft"] >= -0.02]
        if not held:
            print(f"validation's choice ({name}): none keeps new-class within 2 pp")
            continue
        k = max(held, key=lambda k: points[k]["val_all"])
        m = points[k]
        print(f"validation's choice ({name}): s {k[0]:g}, beta {k[1]:g}: old {m['old']:.2%}, "
              f"new {m['new']:.2%}, all {100 * m['all_vs_ft']:+.1f} pp, forgetting "
              f"{100 * m['forgetting']:.1f} pp, new {100 * m['new_vs_ft']:+.1f} pp vs fine-tuning")


if __name__ == "__main__":
    main()
