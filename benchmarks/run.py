"""The benchmark of ../shared/benchmark/PROTOCOL.md: DKDP against dense
training, TFMOT magnitude pruning and keras.distillation students.

    python benchmarks/run.py               # the full protocol (about 1.5 h here)
    python benchmarks/run.py --quick       # a few minutes: same pipeline, tiny
    dkdp bench [--quick]                   # the same, from a source checkout

Every system trains in a process of its own (`train_keras3.py`,
`train_tfmot.py`; TFMOT's tf_keras never meets Keras 3), on one copy of the
protocol's data written to WORK/data.npz. Each exported model leaves a
`.tflite` and a `.json` in WORK/<model>/; a model already there is not
trained again, so an interrupted run continues with the same command. Then
this process measures every `.tflite` file in the LiteRT interpreter (test
accuracy on all test images, bytes, gzip -9 bytes, batch-1 and batch-64
latency, one thread: median of 500 after 50 warm-up, the files of a model
interleaved in 5 rounds of 100), in one stretch so that ratios against
`dense` hold, and writes:

- RESULTS/<date>.jsonl: one JSON object per exported model;
- RESULTS/<date>-<model>-pareto.png: test accuracy against TFLite bytes and
  against batch-1 latency;
- benchmarks/RESULTS.md (with --report): the tables, the checks of the
  benchmark issue, the command and the machine.

A run longer than a session (model 3: about twelve hours here) keeps a
ledger, `--ledger results/model3-ledger.jsonl`: each training command's
files are measured as it ends, beside a dense reference timed in the same
pass, and appended with the machine's name and the command. WORK does not
outlive a new machine; the committed ledger does: a command whose rows are
in it is not run again, and `--measure-only --ledger ...` reports from it.
`benchmarks/model3.sh` is model 3's queue.
"""

import argparse
import datetime
import gzip
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import pareto  # noqa: E402
import protocol  # noqa: E402

SYSTEMS = ("dense", "kd", "tfmot", "tfmot_xnnpack", "dkdp", "dense_avg", "ablation")
# `run.py` alone runs the protocol's systems; the ablations (PROTOCOL.md
# version 2) are asked for by name: --systems dense_avg ablation.
DEFAULT_SYSTEMS = ("dense", "kd", "tfmot", "tfmot_xnnpack", "dkdp")
MODELS = protocol.MODELS
ABLATIONS = ("uniform", "poly", "no_avg", "no_kd")
# DKDP's structured budgets aim at the targets: 15%, 20% and 25% of
# dense's MACs for batch-1 latency <= 0.2x dense and for the kd width-0.5
# student's latency, about 0.3x dense (a parameter budget says nothing of
# latency: Adaptive's budget fill spends it on cheap-in-parameters conv
# channels, which cost MACs), 15% of the parameters, 58 kB of int8 weights
# for a file <= 1/50 of dense's; 7% of dense's MACs and 6.3% of its
# parameters are the kd width-0.25 student's (to compare at its latency and
# size). On LeNet, 0.917 is the 12x of Han et al. (2015). 25 kB of int8
# weights, in widths of one unit and compacted with no zero channels ("/1"),
# is for a file <= 1/100 of dense's (33 kB with its ~7 kB of scales, biases
# and graph): in steps of 16 units the budget kept 17,818 of 25,500.
FULL = {"epochs": 15, "targets": [0.5, 0.8, 0.9, 0.95],
        "structured": ["params:0.15", "int8:58000", "int8:25000/1", "macs:0.07",
                       "params:0.063", "macs:0.15", "macs:0.2", "macs:0.25"],
        "extra_targets": {"lenet_300_100": [0.917]},
        "ablation_targets": [0.9, 0.95],
        # Model 3 (PROTOCOL.md version 2): TFMOT's targets but 0.95, XNNPACK's
        # policy at 0.8 and 0.9, DKDP structured under MACs budgets and
        # unstructured with a sparse-format export beside each file.
        "mobilenet_v2": {"targets": [0.5, 0.8, 0.9], "xnnpack_targets": [0.8, 0.9],
                         "structured": ["macs:0.5", "macs:0.3", "macs:0.2"],
                         "sparse_export": True},
        "runs": 500, "warmup": 50}
QUICK = {"epochs": 2, "targets": [0.9], "structured": ["params:0.1"], "runs": 20, "warmup": 5,
         "train": 2000, "val": 500, "test": 500, "ablation_targets": [0.9],
         # Model 3 at its smallest: the systems only it has (tests/
         # test_applications.py trains it structured, with a student).
         "mobilenet_v2": {"targets": [0.9], "xnnpack_targets": [0.9], "structured": [],
                          "sparse_export": True, "skip": ["kd", "tfmot"]}}


def for_model(settings, model):
    """The settings of one model: the protocol's, with model 3's own."""
    mine = dict(settings)
    mine.update(settings.get(model, {}))
    mine.update(settings.get("given", {}))  # the command line's, for every model
    mine.setdefault("xnnpack_targets", [])
    return mine


def write_data(work, quick):
    """The protocol's split, once, as uint8 images: every system reads it."""
    path = work / "data.npz"
    if path.exists():
        return path
    import numpy as np

    from dkdp_keras import datasets

    (x, y), (xt, yt) = datasets.load("fashion_mnist", as_numpy=True)
    (x, y), (xv, yv) = datasets.validation_split(x, y, size=5000)
    if quick:
        x, y = x[: QUICK["train"]], y[: QUICK["train"]]
        xv, yv = xv[: QUICK["val"]], yv[: QUICK["val"]]
        xt, yt = xt[: QUICK["test"]], yt[: QUICK["test"]]
    as_u8 = lambda a: np.round(a * 255).astype("uint8")  # noqa: E731
    np.savez(path, x_train=as_u8(x), y_train=y, x_val=as_u8(xv), y_val=yv,
             x_test=as_u8(xt), y_test=yt)
    return path


def commands(system, model, work, settings):
    """The training command(s) of one system on one model (none where the
    protocol does not run that system on that model)."""
    settings = for_model(settings, model)
    if system in settings.get("skip", ()):
        return []
    py = [sys.executable]
    common = ["--epochs", str(settings["epochs"]), "--seed", str(settings.get("seed", 0))]
    if system in ("tfmot", "tfmot_xnnpack"):
        targets = settings["targets"] if system == "tfmot" else settings["xnnpack_targets"]
        if not targets:
            return []
        return [py + [str(HERE / "train_tfmot.py"), str(work), "--model", model,
                      "--targets", *map(str, targets)] + common
                + (["--policy", "xnnpack"] if system == "tfmot_xnnpack" else [])
                + (["--begin-epoch", "0", "--end-epoch", "1"] if settings.get("quick") else [])]
    if system == "ablation" and model != "reference_cnn":
        return []
    if system == "dense_avg" and model == "lenet_300_100":
        # On model 3 it tells what DKDP's BatchNormalization momentum and
        # averaging give a dense MobileNetV2, whose momentum-0.999
        # statistics lag its weights for the first ten of the 15 epochs.
        return []
    cmd = py + [str(HERE / "train_keras3.py"), str(work), system, "--model", model] + common
    if system == "ablation":
        targets = map(str, settings["ablation_targets"])
        base = cmd[:3] + ["dkdp"] + cmd[4:] + ["--targets", *targets, "--structured"]
        return [base + ["--ablate", name] for name in ABLATIONS]
    if system == "dkdp":
        extra = settings.get("extra_targets", {}).get(model, [])
        cmd += ["--targets", *map(str, settings["targets"] + extra)]
        structured = settings["structured"] if model != "lenet_300_100" else []
        cmd += ["--structured", *map(str, structured)]
        if settings.get("sparse_export"):
            cmd += ["--sparse-export"]
    return [cmd]


def command_key(cmd):
    """A training command as a ledger names it: the script and its
    arguments, without the interpreter and WORK (which differ by machine)."""
    return " ".join([pathlib.Path(cmd[1]).name, *cmd[3:]])


def train(systems, models, work, settings, log, ledger=None):
    failures = []
    for system in systems:
        for model in models:
            for cmd in commands(system, model, work, settings):
                key = command_key(cmd)
                if key in {r.get("command") for r in read_ledger(ledger)}:
                    # Measured on an earlier machine: WORK may not hold its files.
                    print(f"\n== {system} on {model}: in the ledger already, skipped: {key}",
                          flush=True)
                    continue
                env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
                if system.startswith("tfmot"):
                    env["TF_USE_LEGACY_KERAS"] = "1"
                print(f"\n== {system} on {model}: {' '.join(cmd[1:])}", flush=True)
                log_path = work / "logs" / f"{system}-{model}.log"
                log_path.parent.mkdir(exist_ok=True)
                start = time.perf_counter()
                with open(log_path, "a", buffering=1) as log_file:  # live, line by line
                    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True)
                    for line in proc.stdout:
                        log_file.write(line)
                        if log or not line.startswith(("WARNING", "I0000", "E0000")):
                            print(line, end="", flush=True)
                    proc.wait()
                print(f"== {system} on {model}: exit {proc.returncode} after "
                      f"{time.perf_counter() - start:.0f} s (log: {log_path})", flush=True)
                if proc.returncode != 0:
                    failures.append(f"{system} on {model} (exit {proc.returncode}, "
                                    f"see {log_path})")
                elif ledger is not None:
                    measure(work, [model], settings, ledger, command=key)
    return failures


def measure(work, models, settings, ledger=None, command=None):
    """Measure every exported `.tflite` in this one process.

    With `ledger` (a `.jsonl` path), only the files not already in it are
    measured, each model's beside a dense reference timed in the same pass
    (the dense run's own file when it is in WORK, else the same architecture
    untrained: the same operators and shapes run the same kernels), and
    their rows are appended to it with the machine they were timed on. A
    committed ledger outlives the machine: a benchmark that spans sessions
    on different machines loses none of its finished runs, and each row's
    latency ratio holds on the machine it names (PROTOCOL.md version 2,
    machines). `command` (`command_key`) is written in each new row: a
    command whose rows are in the ledger is not run again."""
    import numpy as np

    from dkdp_keras import sparse_format
    from dkdp_keras.export import _run, measure_tflite_latencies_ms

    data = np.load(work / "data.npz")
    import dkdp_keras as dkdp

    done = {(r["model"], r["file"], r.get("seed", 0)) for r in read_ledger(ledger)}
    rows = []
    for model in models:
        if not (work / model).is_dir():
            continue
        xt, yt = protocol.images(data["x_test"], model), data["y_test"]
        # Files converted from tf_keras (TFMOT) carry no Keras 3 model: they
        # execute the reference architecture densely, zeros included.
        dense_macs = dkdp.count_macs(protocol.build(model), nonzero=False)
        mine, outputs = [], {}
        for meta in sorted((work / model).glob("*.json")):
            record = json.loads(meta.read_text())
            if (record["model"], record["file"], record.get("seed", 0)) in done:
                continue
            record.setdefault("macs", dense_macs)
            record.setdefault("quantize", "none")
            path = work / model / record["file"]
            blob = path.read_bytes()
            logits = _run(path, xt)
            outputs[record["file"]] = logits
            sparse, densify = sparse_format.encoding(blob)
            record.update({
                "tflite_test_acc": float(np.mean(np.argmax(logits, -1) == yt)),
                "tflite_bytes": len(blob),
                "tflite_gzip_bytes": len(gzip.compress(blob, compresslevel=9)),
                "sparse_tensors": sparse, "densify_ops": densify,
            })
            mine.append((record, path))
        if not mine:
            continue
        for record, _ in mine:
            if record["sparse_tensors"]:
                twin = work / model / record["file"].replace("-sparse.tflite", ".tflite")
                if twin.name not in outputs and twin.exists():
                    outputs[twin.name] = _run(twin, xt)
                record.update(sparse_evidence(record, outputs))
        # Latencies of all of the model's files interleaved in rounds: a
        # drift of the machine's speed during the pass hits every file.
        paths = [p for _, p in mine]
        reference = None
        if ledger is not None:
            reference = dense_reference(work, model, xt)
            if reference not in paths:
                paths.append(reference)
            # (A smoke run's latencies mean nothing: it does not wait.)
            busy = None if settings.get("quick") else wait_idle()
        print(f"timing the batch-1 and batch-64 latencies of {len(paths)} {model} files, "
              "interleaved", flush=True)
        b1 = measure_tflite_latencies_ms(paths, runs=settings["runs"],
                                         warmup=settings["warmup"], batch=1)
        b64 = measure_tflite_latencies_ms(paths, runs=settings["runs"] // 5,
                                          warmup=settings["warmup"] // 5 or 1, batch=64)
        for (record, _), one, many in zip(mine, b1, b64):
            record.update({"lat_b1_ms": one, "lat_b64_ms": many})
            if reference is not None:
                i = paths.index(reference)
                record.update({
                    "lat_b1_x_dense": one / b1[i], "lat_b64_x_dense": many / b64[i],
                    "lat_reference": reference.name if reference.parent == work / model else
                    "the dense architecture untrained (dense's own file is not on this "
                    "machine)", "machine": machine(), "cpu_busy_pct_before": busy,
                    "measured_at": datetime.datetime.now().isoformat(timespec="seconds"),
                    "command": command})
            print(f"measured {model} {record['file']}: acc {record['tflite_test_acc']:.4f}, "
                  f"{record['tflite_bytes']:,} B, b1 {record['lat_b1_ms']:.3f} ms", flush=True)
            rows.append(record)
        if ledger is not None:
            with open(ledger, "a") as f:
                for record, _ in mine:
                    f.write(json.dumps(record) + "\n")
    if ledger is not None:
        rows = [r for r in read_ledger(ledger) if r["model"] in models]
    return relate(rows, models)


def relate(rows, models):
    """Each row's figures against its model's dense row. A ledger's rows
    carry latency ratios timed beside their own dense reference; training
    seconds compare only between rows of one machine."""
    for model in models:
        dense = [r for r in rows if r["model"] == model and r["system"] == "dense"]
        if not dense:
            continue
        d = dense[0]
        for r in rows:
            if r["model"] != model:
                continue
            r["acc_vs_dense_pp"] = 100 * (r["test_acc"] - d["test_acc"])
            r["bytes_x_dense"] = r["tflite_bytes"] / d["tflite_bytes"]
            r.setdefault("lat_b1_x_dense", r["lat_b1_ms"] / d["lat_b1_ms"])
            r.setdefault("lat_b64_x_dense", r["lat_b64_ms"] / d["lat_b64_ms"])
            same = r.get("machine") == d.get("machine")
            r["train_x_dense"] = r["train_s"] / d["train_s"] if same else float("nan")
    return rows


def read_ledger(path):
    if path is None or not pathlib.Path(path).exists():
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def dense_reference(work, model, xt):
    """The file a ledger's latencies are timed against: the dense run's
    own, else the dense architecture untrained, converted once per WORK."""
    own = work / model / "dense.tflite"
    if own.exists():
        return own
    path = work / model / "reference" / "dense-architecture.tflite"
    if not path.exists():
        import keras

        import dkdp_keras as dkdp

        path.parent.mkdir(exist_ok=True)
        keras.utils.set_random_seed(0)
        dkdp.export_tflite(protocol.build(model), path, check_data=xt[:64], latency_runs=1)
    return path


def wait_idle(limit=10.0, poll=30, to="time latencies"):
    """Latency (and training time, `paired_times.py`) is timed on an
    otherwise idle machine: wait while other processes keep more than `limit`
    % of the CPUs busy. Returns the share last seen (None where psutil is
    missing)."""
    try:
        import psutil
    except ImportError:
        return None
    while True:
        busy = psutil.cpu_percent(interval=3)
        if busy <= limit:
            return busy
        print(f"waiting for an idle machine to {to}: {busy:.0f}% of the CPUs busy", flush=True)
        time.sleep(poll)


def sparse_evidence(record, outputs):
    """Whether a sparse-format file ran sparse kernels here, and how that is
    known (PROTOCOL.md version 2, sparse inference): XNNPACK's own rule for
    this CPU, and, for a DKDP file, its outputs on the test images against
    those of the same model in the dense format (the same kernels give the
    same bits; XNNPACK's sparse kernels sum in another order)."""
    from dkdp_keras import sparse_format

    import numpy as np

    avx = sparse_format.x86_avx()
    why = [f"{record['densify_ops']} DENSIFY ops"]
    if avx:
        why.append("x86 CPU with AVX: XNNPACK keeps its dense kernels "
                   "(xnn_is_chw_compatible_config)")
    twin = record["file"].replace("-sparse.tflite", ".tflite")
    same = None
    if twin != record["file"] and twin in outputs:
        same = bool(np.array_equal(outputs[twin], outputs[record["file"]]))
        why.append(f"outputs on the test images {'bit-identical to' if same else 'differ from'}"
                   f" {twin}'s")
    ran = False if (avx or same) else None
    return {"sparse_kernels_ran": ran, "sparse_kernels": "; ".join(why)}


def table(rows, model):
    head = ("| system | variant | target | test acc | TFLite acc | Δ vs dense (pp) | params "
            "| non-zero params | MACs | TFLite bytes | gzip bytes | b1 latency × dense "
            "| b64 latency × dense | train s × dense |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    order = {s: i for i, s in enumerate(SYSTEMS)}
    lines = []
    for r in sorted((r for r in rows if r["model"] == model),
                    key=lambda r: (order[r["system"]], r["target"], r["variant"])):
        lines.append(
            f"| {r['system']} | {r['variant']} | {r['target']:.2f} | {r['test_acc']:.2%} "
            f"| {r['tflite_test_acc']:.2%} | {r.get('acc_vs_dense_pp', float('nan')):+.2f} "
            f"| {r['params']:,} | {r['nonzero_params']:,} | {r['macs']:,} "
            f"| {r['tflite_bytes']:,} | {r['tflite_gzip_bytes']:,} "
            f"| {r.get('lat_b1_x_dense', float('nan')):.2f} "
            f"| {r.get('lat_b64_x_dense', float('nan')):.2f} "
            f"| {r.get('train_x_dense', float('nan')):.2f} |")
    return head + "\n".join(lines) + "\n"


def checks(rows):
    """The benchmark issue's targets (version 2 of the protocol), each with
    its figure: (text, met). Accuracy is the TFLite file's on the test set
    unless the target is of the Keras model (non-zero counts)."""
    out = []

    def pick(model, system):
        return [r for r in rows if r["model"] == model and r["system"] == system]

    def top(candidates, key="tflite_test_acc"):
        return max(candidates, key=lambda r: r[key], default=None)

    def drop_pp(d, r, key="tflite_test_acc"):
        return 100 * (d[key] - r[key])

    for model in MODELS:
        dense = pick(model, "dense")
        if not dense:
            continue
        # Accuracy is held against the better of dense and dense+avg (dense
        # with DKDP's BatchNormalization momentum and averaging: on
        # MobileNetV2, plain dense's statistics lag its weights); bytes and
        # latency against dense, the same architecture's file.
        d = max(dense + pick(model, "dense_avg"), key=lambda r: r["tflite_test_acc"])
        d = {**d, "tflite_bytes": dense[0]["tflite_bytes"]}
        dk = [r for r in pick(model, "dkdp") if r["quantize"] == "none"
              and not r.get("sparse_format")]
        students = [r for r in dk if "student" in r["variant"]]
        structured = [r for r in dk if "structured" in r["variant"]
                      and "unstructured" not in r["variant"] and r not in students]
        int8 = [r for r in pick(model, "dkdp") if r["quantize"] == "int8"]
        if model == "reference_cnn":
            r = top([r for r in dk if r["nonzero_params"] <= 0.02 * d["nonzero_params"]],
                    "test_acc")
            out.append((f"{model}: ≤2% of dense's non-zero parameters at ≤0.5 pp below dense: "
                        + (f"{r['variant']} {r['nonzero_params']:,}, {-drop_pp(d, r, 'test_acc'):+.2f} pp"
                           if r else "none"), bool(r) and drop_pp(d, r, "test_acc") <= 0.5))
            r = top([r for r in structured if r["lat_b1_x_dense"] <= 0.10])
            out.append((f"{model}: compacted float32 at ≤0.10× dense batch-1 latency within "
                        "0.5 pp: " + (f"{r['variant']} {r['lat_b1_x_dense']:.3f}×, "
                                      f"{-drop_pp(d, r):+.2f} pp" if r else "none"),
                        bool(r) and drop_pp(d, r) <= 0.5))
            limit, share = d["tflite_bytes"] / 100, "1/100"
        else:
            limit, share = d["tflite_bytes"] / 8, "1/8"
        if model != "lenet_300_100":
            r = top([r for r in int8 if r["tflite_bytes"] <= limit])
            out.append((f"{model}: full-int8 file ≤{share} of dense's float32 ({limit:,.0f} B) "
                        "within 1 pp: " + (f"{r['variant']} {r['tflite_bytes']:,} B, "
                                           f"{-drop_pp(d, r):+.2f} pp" if r else "none"),
                        bool(r) and drop_pp(d, r) <= 1.0))
        if model == "mobilenet_v2":
            r = top([r for r in structured if r["lat_b1_x_dense"] <= 0.5])
            out.append((f"{model}: structured at ≤0.5× dense batch-1 latency within 0.5 pp: "
                        + (f"{r['variant']} {r['lat_b1_x_dense']:.2f}×, {-drop_pp(d, r):+.2f} pp"
                           if r else "none"), bool(r) and drop_pp(d, r) <= 0.5))
            t8 = [t for t in pick(model, "tfmot") if t["target"] == 0.8]
            sparse = [r for r in pick(model, "dkdp") if r.get("sparse_format")]
            if t8:
                r = min((r for r in sparse if r["tflite_test_acc"] >= t8[0]["tflite_test_acc"]),
                        key=lambda r: r["tflite_bytes"], default=None)
                out.append((f"{model}: a sparse-format file ≥3× smaller than dense's at "
                            f"TFMOT-0.8's accuracy ({t8[0]['tflite_test_acc']:.2%}) or better: "
                            + (f"{r['variant']} {1 / r['bytes_x_dense']:.1f}× smaller, "
                               f"{r['tflite_test_acc']:.2%}" if r else "none"),
                            bool(r) and r["bytes_x_dense"] <= 1 / 3))
            for r in sparse:
                if r.get("sparse_kernels_ran") is not False:
                    fast = 1 / r["lat_b1_x_dense"]
                    out.append((f"{model}: sparse inference {r['variant']}: "
                                f"{fast:.2f}× dense's batch-1 speed ({r['sparse_kernels']}), "
                                f"{-drop_pp(d, r):+.2f} pp (target ≥1.3× within 0.5 pp)",
                                fast >= 1.3 and drop_pp(d, r) <= 0.5))
        if model != "lenet_300_100":
            for k in pick(model, "kd"):
                if k["quantize"] != "none":
                    continue
                # Every DKDP model a user could ship in its place: the
                # compacted teachers and the students DKDP trained beside them.
                # As ratios to dense: a ledger's rows may come from machines of
                # their own, each timed beside dense there.
                rivals = [r for r in structured + students
                          if r["lat_b1_x_dense"] <= k["lat_b1_x_dense"]]
                r = top(rivals)
                ok = r is not None and r["tflite_test_acc"] >= k["tflite_test_acc"]
                out.append((f"{model}: a DKDP model at ≤ the latency of kd {k['variant']} "
                            f"({k['lat_b1_x_dense']:.3f}× dense, {k['tflite_test_acc']:.2%}) "
                            "with more accuracy: "
                            + (f"{r['variant']} {r['lat_b1_x_dense']:.3f}× dense, "
                               f"{r['tflite_test_acc']:.2%}" if r else "none"), ok))
        for t in pick(model, "tfmot"):
            r = top([r for r in dk if r["nonzero_params"] <= t["nonzero_params"]], "test_acc")
            ok = r is not None and r["test_acc"] >= t["test_acc"]
            out.append((f"{model}: at TFMOT {t['target']:g} ({t['nonzero_params']:,} non-zero, "
                        f"{t['test_acc']:.2%}), DKDP with no more non-zero parameters: "
                        + (f"{r['variant']} {r['nonzero_params']:,}, {r['test_acc']:.2%}"
                           if r else "none"), ok))
        if model == "lenet_300_100":
            t9 = [t for t in pick(model, "tfmot") if t["target"] == 0.9]
            r = top([r for r in dk if r["nonzero_params"] * 20 <= d["nonzero_params"]],
                    "test_acc")
            if t9:
                out.append((f"{model}: ≥20× fewer non-zero parameters than dense with at least "
                            f"TFMOT-0.9's accuracy ({t9[0]['test_acc']:.2%}): "
                            + (f"{r['variant']} {d['nonzero_params'] / r['nonzero_params']:.1f}×, "
                               f"{r['test_acc']:.2%}" if r else "none"),
                            bool(r) and r["test_acc"] >= t9[0]["test_acc"]))
            slow = max(dk, key=lambda r: r["lat_b1_x_dense"], default=None)
            if slow:
                out.append((f"{model}: compacted unstructured files no slower than dense at "
                            f"batch 1: slowest {slow['variant']} {slow['lat_b1_x_dense']:.2f}×",
                            slow["lat_b1_x_dense"] <= 1.0))
    return out


def machine():
    """The CPU model and its vector extensions (PROTOCOL.md version 2:
    latency ratios hold only within one machine), cores and versions."""
    import tensorflow as tf

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    vector = [name for flag, name in (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"))
              if flag in flags] or ["no AVX2"]
    return (f"{model} ({', '.join(vector)}), {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, TensorFlow {tf.__version__}")


COST_BOUND = {"lenet_300_100": 1.5}  # else 1.35 (PROTOCOL.md version 2, training cost)
MIN_PAIRS = 3  # a cost ratio is the median of at least three pairs


def cost_lines(paths):
    """The training-cost section: each `paired_times.py --out` file (median of
    paired runs) against its bound, and DKDP's against TFMOT's own ratio for
    the same model and target where that was measured (on the same machine
    where both files name theirs). A file of fewer than `MIN_PAIRS` pairs (a
    set still under way: paired_times goes on from it) is shown, not judged.
    Each line names its file: one model and target can have several sets."""
    found = [dict(json.loads(p.read_text()), file=p.name) for p in paths]
    if not found:
        return []
    lines = ["", "## Training cost (medians of paired runs, `benchmarks/paired_times.py`)", ""]
    tfmot = [t for t in found if t["system"] == "tfmot" and len(t["ratios"]) >= MIN_PAIRS]
    for t in found:
        what = t["structured"] or f"{t['target']:g}"
        text = (f"{t['model']}, {t['system']} at {what}: median **{t['median']:.2f}×** of "
                f"{len(t['ratios'])} pairs ({', '.join(f'{r:.2f}' for r in t['ratios'])}; "
                f"`{t['file']}`)")
        if len(t["ratios"]) < MIN_PAIRS:
            lines.append(f"- under way ({len(t['ratios'])} of the {MIN_PAIRS} pairs a figure "
                         f"needs): {text}")
            continue
        if t["system"] == "tfmot":
            lines.append(f"- TFMOT's own ratio, {text}")
            continue
        bound = COST_BOUND.get(t["model"], 1.35)
        ok = t["median"] <= bound
        # The last TFMOT set of this model and target, from this machine if one is.
        same = [] if t["structured"] else [
            r for r in tfmot if (r["model"], r["target"]) == (t["model"], t["target"])]
        same.sort(key=lambda r: r.get("machine") == t.get("machine"))
        rival = same[-1] if same else None
        note = ""
        if rival is None and not t["structured"]:
            # Half of the target is at most TFMOT's own ratio: not shown yet.
            lines.append(f"- within the bound, TFMOT's own ratio not measured yet: {text}; "
                         f"bound {bound}×" if ok else f"- **not met**: {text}; bound {bound}×")
            continue
        if rival is not None:
            ok = ok and t["median"] <= rival["median"]
            note = f", TFMOT's own {rival['median']:.2f}× (`{rival['file']}`)"
            if None not in (rival.get("machine"), t.get("machine")) and \
                    rival["machine"] != t["machine"]:
                note += " (measured on another machine)"
        lines.append(f"- {'met' if ok else '**not met**'}: {text}; bound {bound}×{note}")
    return lines


def ablation_lines(rows):
    """The ablation table (PROTOCOL.md version 2): DKDP with one part removed
    and dense+avg, against DKDP whole at the same budget and against dense."""
    parts = [r for r in rows if r["system"] in ("ablation", "dense_avg")]
    if not parts:
        return []
    whole = {(r["model"], r["budget"]): r for r in rows if r["system"] == "dkdp" and r.get("budget")
             and not r.get("sparse_format") and r["quantize"] == "none"
             and "student" not in r["variant"]}
    dense = {r["model"]: r for r in rows if r["system"] == "dense"}
    lines = ["", "## Ablations (reference_cnn; dense+avg also on mobilenet_v2)", "",
             "| model | variant | budget | test acc | Δ vs DKDP whole (pp) | Δ vs dense (pp) "
             "| non-zero |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in sorted(parts, key=lambda r: (r["model"], r.get("budget") or "", r["variant"])):
        w, d = whole.get((r["model"], r.get("budget"))), dense.get(r["model"])
        vs_whole = f"{100 * (r['test_acc'] - w['test_acc']):+.2f}" if w else ""
        vs_dense = f"{100 * (r['test_acc'] - d['test_acc']):+.2f}" if d else ""
        lines.append(f"| {r['model']} | {r['variant']} | {r.get('budget') or 'none'} "
                     f"| {r['test_acc']:.2%} "
                     f"| {vs_whole} | {vs_dense} | {r['nonzero_params']:,} |")
    for w in sorted(whole.values(), key=lambda r: r["budget"]):
        if any((r["model"], r.get("budget")) == (w["model"], w["budget"]) for r in parts):
            d = dense.get(w["model"])
            lines.append(f"| {w['model']} | DKDP whole | {w['budget']} | {w['test_acc']:.2%} | 0 "
                         f"| {100 * (w['test_acc'] - d['test_acc']):+.2f} "
                         f"| {w['nonzero_params']:,} |" if d else "")
    return lines


def write_report(rows, failures, results, date, argv, elapsed, path):
    lines = [
        "# Benchmark results",
        "",
        f"Measured {date} under `../shared/benchmark/PROTOCOL.md` with "
        f"`python benchmarks/{' '.join(argv)}` ({elapsed / 60:.0f} min) on {machine()}. "
        "Fashion-MNIST, 55,000 training / 5,000 validation / 10,000 test images; Adam 1e-3, "
        "batch 128, 15 epochs, seed 0 for every system. Latency: LiteRT interpreter, one "
        "thread, median of 500 invocations (batch 64: 100) after warm-up, every file measured "
        "in the same process, a model's files interleaved in 5 rounds; ratios are against "
        "`dense` of the same run. Training seconds: from the start of `fit` to the end of "
        "its last callback's `on_train_end` (the tf.data iterator's teardown as `fit` "
        "returns, 0 to 30 s for any model, is not counted). "
        f"Raw figures: `benchmarks/results/{date}.jsonl`.",
        "",
    ]
    timed = sorted({r["machine"] for r in rows if r.get("machine")})
    if timed:
        lines += [f"Rows kept in a ledger (`--ledger`) were timed as each run ended, beside a "
                  f"dense reference on the machine each names, on {len(timed)} machine(s): "
                  + "; ".join(timed) + ". Their latency ratios are against that reference; "
                  "training seconds compare only between rows of one machine.", ""]
    if failures:
        lines += ["**Failed:** " + "; ".join(failures), ""]
    lines += ["## What DKDP must show", ""]
    for text, ok in checks(rows):
        lines.append(f"- {'met' if ok else '**not met**'}: {text}")
    timing = sorted(results.glob(f"{date}-epoch_cost-*.json"))
    if timing:
        lines += ["", "Training wall time, controlled: `benchmarks/epoch_cost.py` trains dense "
                  "and DKDP (the defaults above) alternately in one process on an otherwise "
                  "idle machine and compares median epoch times:", ""]
        for timing_file in timing:
            t = json.loads(timing_file.read_text())
            ok = t["ratio"] <= 1.35
            lines.append(f"- {'met' if ok else '**not met**'}: DKDP epoch ≤1.35× dense "
                         f"({t['model']}, {t['granularity']} granularity, student width "
                         f"{t['student_width']}): {t['dkdp_epoch_s']:.1f} s vs "
                         f"{t['dense_epoch_s']:.1f} s, **{t['ratio']:.2f}×**")
    lines += cost_lines(sorted(results.glob("*-paired-*.json")))
    lines += ablation_lines(rows)
    for model in MODELS:
        if not any(r["model"] == model for r in rows):
            continue
        sparse = [r for r in rows if r["model"] == model and r.get("sparse_tensors")]
        notes = ["Sparse-format files (the converter's sparse weight encoding): whether "
                 "the sparse kernels ran, and how that is known:", ""] if sparse else []
        for r in sparse:
            ran = {True: "yes", False: "no", None: "not established"}[r["sparse_kernels_ran"]]
            notes.append(f"- `{r['file']}`: {r['bytes_x_dense']:.3f}× dense's bytes, "
                         f"{r['lat_b1_x_dense']:.2f}× its batch-1 latency; sparse kernels "
                         f"ran: **{ran}** ({r['sparse_kernels']}).")
        lines += ["", f"## {model}", "", table(rows, model), *notes, "",
                  f"![{model}]({os.path.relpath(results / f'{date}-{model}-pareto.png', path.parent)})",
                  ""]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny data, 2 epochs, one target: a smoke test of the pipeline")
    parser.add_argument("--systems", nargs="+", default=list(DEFAULT_SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--work", default=None,
                        help="where models and logs go (default benchmarks/work/<date>[-quick])")
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--report", action="store_true",
                        help="also rewrite benchmarks/RESULTS.md")
    parser.add_argument("--measure-only", action="store_true")
    parser.add_argument("--train-only", action="store_true",
                        help="train and export, measure later (--measure-only)")
    parser.add_argument("--seed", type=int, default=0,
                        help="every system's seed (PROTOCOL.md version 2, seeds); other than 0 "
                             "the work and result files are named ...-seed<N>")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's log lines")
    parser.add_argument("--ledger", default=None,
                        help="a .jsonl of measured rows, kept as the run goes: each training "
                             "command's files are measured as it ends (latency beside a dense "
                             "reference, on an idle machine) and appended; commit it and a "
                             "run that spans machines keeps every finished row")
    parser.add_argument("--targets", type=float, nargs="*", default=None,
                        help="DKDP's unstructured targets (default: the protocol's)")
    parser.add_argument("--structured", nargs="*", default=None,
                        help="DKDP's structured budgets (default: %s)"
                        % " ".join(FULL["structured"]))
    args = parser.parse_args(argv)
    date = (datetime.date.today().isoformat() + ("-quick" if args.quick else "")
            + (f"-seed{args.seed}" if args.seed else ""))
    work = pathlib.Path(args.work or HERE / "work" / date)
    work.mkdir(parents=True, exist_ok=True)
    results = pathlib.Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    settings = dict(QUICK if args.quick else FULL, quick=args.quick, seed=args.seed)
    settings["given"] = {}
    if args.targets is not None:
        settings["given"].update(targets=args.targets, xnnpack_targets=[
            t for t in args.targets if t in for_model(settings, "mobilenet_v2")["xnnpack_targets"]])
        settings["extra_targets"] = {}
    if args.structured is not None:
        settings["given"]["structured"] = args.structured
    start = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    write_data(work, args.quick)
    ledger = pathlib.Path(args.ledger) if args.ledger else None
    failures = [] if args.measure_only else train(args.systems, args.models, work, settings,
                                                  args.verbose, ledger)
    if args.train_only:
        done = (f"Trained; each finished command measured into {ledger}." if ledger else
                "Trained; measure with --measure-only.")
        print("\n".join([done, *(["Failed:"] + failures if failures else [])]))
        return 1 if failures else 0
    rows = measure(work, args.models, settings, ledger)
    with open(results / f"{date}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    for model in args.models:
        pareto.pareto_plot(rows, model, results / f"{date}-{model}-pareto.png",
                           {s: i for i, s in enumerate(SYSTEMS)})
    report = HERE / "RESULTS.md" if args.report else results / f"{date}.md"
    cmdline = ["run.py"] + (argv if argv is not None else sys.argv[1:])
    write_report(rows, failures, results, date, cmdline, time.perf_counter() - start, report)
    print(f"\nWrote {results / (date + '.jsonl')}, plots and {report}")
    for text, ok in checks(rows):
        print(f"{'met    ' if ok else 'NOT MET'}  {text}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
