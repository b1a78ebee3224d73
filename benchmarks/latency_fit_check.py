"""How well `dkdp.fit_latency` predicts the batch-1 LiteRT time of pruned
files, against the estimate a latency budget used before it (dense's time ×
the MACs share).

The model is fitted on this machine (copies at several widths, timed in
LiteRT). Then the given files are timed in one pass with dense's file
first. Each file's MACs and parameters are of its shapes, counted on the
compacted `.keras` beside it (`train_keras3.py` writes it). This machine's speed has two states
(RESULTS.md, 2026-12-07, second), so predictions are compared as ratios to
dense: the fit's prediction for a file over its prediction for dense,
against the measured ratio of the pass.

    python benchmarks/latency_fit_check.py MODEL DENSE.tflite FILE.tflite ... [--out F]

DENSE.tflite `-`: the dense architecture, untrained, exported here (time does
not depend on the weights).
"""
import argparse
import datetime
import json
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import protocol  # noqa: E402


def counts(path):
    """(MACs, parameters) of the file's shapes, zeros included (what the
    runtime computes; `Budget` estimates latency from them): from the
    compacted `.keras` beside it, else the `.json`'s non-zero counts."""
    keras_file = pathlib.Path(path).with_suffix(".keras")
    if keras_file.is_file():
        import keras

        import dkdp_keras as dkdp

        model = keras.models.load_model(keras_file, compile=False)
        return dkdp.count_macs(model, nonzero=False), dkdp.count_params(model, nonzero=False)
    info = json.loads(pathlib.Path(path).with_suffix(".json").read_text())
    return info["macs"], info["params"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=protocol.MODELS)
    parser.add_argument("files", nargs="+", help="dense's .tflite first, then the others")
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import dkdp_keras as dkdp
    from dkdp_keras.export import measure_tflite_latencies_ms

    model = protocol.build(args.model)
    fit = dkdp.fit_latency(model, "litert")
    if args.files[0] == "-":
        args.files[0] = str(pathlib.Path(tempfile.mkdtemp()) / "dense-untrained.tflite")
        dkdp.export_tflite(model, args.files[0], latency_runs=1)
        pathlib.Path(args.files[0]).with_suffix(".json").write_text(json.dumps({
            "macs": dkdp.count_macs(model, nonzero=False),
            "params": dkdp.count_params(model, nonzero=False)}))
    ms = measure_tflite_latencies_ms(args.files, runs=args.runs)
    dense_macs, dense_params = counts(args.files[0])
    rows = []
    print(f"\n{'file':<58} {'MACs':>6} {'params':>6} {'measured':>8} {'fit':>6} {'MACs est':>8}")
    for path, t in zip(args.files, ms):
        macs, params = counts(path)
        row = {"file": pathlib.Path(path).name, "macs": macs, "params": params, "ms": t,
               "measured_x_dense": t / ms[0],
               "fit_x_dense": fit.predict(macs, params) / fit.predict(dense_macs, dense_params),
               "macs_share": macs / dense_macs}
        rows.append(row)
        print(f"{row['file']:<58} {macs / dense_macs:6.3f} {params / dense_params:6.3f} "
              f"{row['measured_x_dense']:8.3f} {row['fit_x_dense']:6.3f} {row['macs_share']:8.3f}")
    if args.out:
        protocol.write_json(pathlib.Path(args.out), {
            "model": args.model, "fit": fit.get_config(), "rows": rows,
            "command": "python benchmarks/latency_fit_check.py " + " ".join(
                argv if argv is not None else sys.argv[1:]),
            "measured_at": datetime.datetime.now().isoformat(timespec="seconds")})


if __name__ == "__main__":
    main()
