"""Mean and standard deviation over seeds (PROTOCOL.md version 2, seeds).

Reads the `.jsonl` files of runs that differ only in their seed (`run.py
--seed N` writes `<date>-seed<N>.jsonl`; seed 0 is the plain `<date>.jsonl`)
and prints a Markdown table: one line per (model, system, file stem), the
test accuracy of the TFLite file and the non-zero parameters as mean ± sample
standard deviation over the seeds found, and for each system its difference
to dense with a verdict: a difference under two standard deviations (the
larger of the two systems') is a tie.

    python benchmarks/seeds.py benchmarks/results/2026-12-01.jsonl \\
        benchmarks/results/2026-12-01-seed1.jsonl benchmarks/results/2026-12-01-seed2.jsonl
"""

import argparse
import collections
import json
import statistics
import sys


def load(paths):
    """{(model, file): [row per seed]} of the rows the files hold."""
    rows = collections.defaultdict(list)
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            rows[(r["model"], r["file"])].append(r)
    return rows


def stats(values):
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else float("nan")


def table(rows, reference="dense.tflite"):
    lines = ["| model | system | variant | seeds | TFLite test acc (%) | non-zero params "
             "| Δ vs dense (pp) | verdict |", "|---|---|---|---:|---:|---:|---:|---|"]
    for (model, name), runs in sorted(rows.items()):
        accs = [100 * r["tflite_test_acc"] for r in runs]
        mean, sd = stats(accs)
        nz, _ = stats([r["nonzero_params"] for r in runs])
        dense = rows.get((model, reference))
        delta, verdict = "", ""
        if dense and name != reference:
            d_mean, d_sd = stats([100 * r["tflite_test_acc"] for r in dense])
            diff = mean - d_mean
            spread = 2 * max(sd, d_sd)
            delta = f"{diff:+.2f}"
            verdict = ("tie" if abs(diff) < spread else
                       "better" if diff > 0 else "worse") + f" (2 sd = {spread:.2f})"
        lines.append(f"| {model} | {runs[0]['system']} | {runs[0]['variant']} | "
                     f"{len(runs)} ({', '.join(str(r.get('seed', 0)) for r in runs)}) | "
                     f"{mean:.2f} ± {sd:.2f} | {nz:,.0f} | {delta} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="one .jsonl per seed")
    args = parser.parse_args(argv)
    sys.stdout.write(table(load(args.files)))


if __name__ == "__main__":
    main()
