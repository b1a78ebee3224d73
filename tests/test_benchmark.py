"""Smoke test of the benchmark runner: `benchmarks/run.py --quick` runs every
system of the protocol (TFMOT in its own tf_keras process) on tiny data and
writes figures that hold together."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIELDS = ("model", "system", "target", "test_acc", "tflite_test_acc", "params",
          "nonzero_params", "macs", "tflite_bytes", "tflite_gzip_bytes", "lat_b1_ms",
          "lat_b64_ms", "train_s")

pytest.importorskip("ai_edge_litert")


#: pytest-xdist: the tests that read `quick_run` run on one worker, so that
#: the fixture (a quarter of an hour on two cores) is built once.
shares_quick_run = pytest.mark.xdist_group("quick_run")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick",
         "--work", str(base / "work"), "--results", str(base / "results")],
        capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (jsonl,) = (base / "results").glob("*.jsonl")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    return base, rows, proc.stdout


@pytest.mark.slow
@shares_quick_run
def test_every_system_and_model_is_measured_with_the_protocol_fields(quick_run):
    _, rows, _ = quick_run
    for model in ("reference_cnn", "lenet_300_100"):
        systems = {r["system"] for r in rows if r["model"] == model}
        assert systems == {"dense", "kd", "tfmot", "dkdp"}, (model, systems)
    # Model 3 at its smallest: the systems only it has.
    systems = {r["system"] for r in rows if r["model"] == "mobilenet_v2"}
    assert systems == {"dense", "tfmot_xnnpack", "dkdp"}, systems
    for r in rows:
        missing = [f for f in FIELDS if f not in r]
        assert not missing, (r["file"], missing)
        assert r["lat_b1_ms"] > 0 and r["lat_b64_ms"] > r["lat_b1_ms"]
        assert r["tflite_gzip_bytes"] < r["tflite_bytes"]


@pytest.mark.slow
@shares_quick_run
def test_figures_hold_together(quick_run):
    _, rows, _ = quick_run
    by = {(r["model"], r["file"]): r for r in rows}
    test_images = 500
    for r in rows:
        if r["quantize"] == "none":
            # The float32 file computes what the Keras model computes.
            assert abs(r["tflite_test_acc"] - r["test_acc"]) <= 2 / test_images, r["file"]
    cnn = "reference_cnn"
    dense = by[(cnn, "dense.tflite")]
    assert dense["params"] == dense["nonzero_params"] == 824_746
    assert dense["macs"] == 4_643_840
    tfmot = by[(cnn, "tfmot-0.9.tflite")]
    # TFMOT prunes kernels to 90%; biases and BatchNorm stay.
    assert tfmot["nonzero_params"] <= 0.1 * 824_096 + 650 + 5
    assert tfmot["params"] == 824_746
    unstructured = by[(cnn, "dkdp-unstructured-params-0.1.tflite")]
    assert unstructured["nonzero_params"] <= 82_474
    structured = by[(cnn, "dkdp-structured-params-0.1.tflite")]
    # Compaction removes what was pruned: every parameter left is used.
    assert structured["params"] <= 82_474
    assert structured["tflite_bytes"] < dense["tflite_bytes"] / 8
    int8 = by[(cnn, "dkdp-structured-params-0.1-int8.tflite")]
    assert int8["tflite_bytes"] < structured["tflite_bytes"] / 3
    kd = by[(cnn, "kd-w0.25.tflite")]
    assert kd["params"] == 52_210


@pytest.mark.slow
@shares_quick_run
def test_model_3_and_its_sparse_files(quick_run):
    # keras.applications.MobileNetV2 at 32x32 on the padded 3-channel images;
    # the sparse-format files are smaller, and the runner says whether their
    # sparse kernels ran and how it knows.
    from dkdp_keras import sparse_format

    _, rows, _ = quick_run
    by = {r["file"]: r for r in rows if r["model"] == "mobilenet_v2"}
    dense = by["dense.tflite"]
    assert dense["params"] == dense["nonzero_params"] == 2_270_794
    assert dense["macs"] == 6_124_928
    assert dense["sparse_tensors"] == 0
    xnn = by["tfmot-xnnpack-0.9.tflite"]
    assert xnn["params"] == 2_270_794  # the same network, XNNPACK's padding
    assert xnn["nonzero_params"] < 0.2 * xnn["params"]  # its 1x1 kernels at 90%
    sparse = by["dkdp-unstructured-params-0.1-sparse.tflite"]
    plain = by["dkdp-unstructured-params-0.1.tflite"]
    assert sparse["nonzero_params"] == plain["nonzero_params"] <= 227_080
    assert sparse["tflite_bytes"] < dense["tflite_bytes"] / 3
    assert plain["tflite_bytes"] > 0.9 * dense["tflite_bytes"]
    for r in (xnn, sparse):
        assert r["sparse_tensors"] == r["densify_ops"] > 10
        assert "DENSIFY" in r["sparse_kernels"]
    if sparse_format.x86_avx():
        assert sparse["sparse_kernels_ran"] is False
        assert "bit-identical" in sparse["sparse_kernels"]


@pytest.mark.slow
@shares_quick_run
def test_report_and_plots_are_written(quick_run):
    base, rows, stdout = quick_run
    (report,) = (base / "results").glob("*.md")
    text = report.read_text()
    assert "## What DKDP must show" in text
    assert text.count("| dkdp |") == sum(r["system"] == "dkdp" for r in rows)
    for model in ("reference_cnn", "lenet_300_100"):
        (plot,) = (base / "results").glob(f"*-{model}-pareto.png")
        assert plot.stat().st_size > 10_000
    checks = text.count("\n- met: ") + text.count("\n- **not met**: ")
    assert checks >= 8, text[:2000]
    assert stdout.count("NOT MET  ") + stdout.count("met      ") == checks


@pytest.mark.slow
@shares_quick_run
def test_an_interrupted_run_continues_without_training_again(quick_run):
    base, rows, _ = quick_run
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--systems", "dense",
         "--models", "lenet_300_100", "--work", str(base / "work"),
         "--results", str(base / "again"), "--train-only"],  # measuring is not the point
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done already, skipped" in proc.stdout


@pytest.mark.slow
@shares_quick_run
def test_a_ledger_keeps_rows_measured_elsewhere_and_measures_only_what_is_new(
        quick_run, tmp_path, monkeypatch):
    # Model 3 spans sessions, and a session may start on another machine with
    # the work directory gone: each run's rows go to a committed ledger as
    # it ends, timed beside a dense reference on the machine they name. Here
    # dense was measured "elsewhere" and its file is not on this machine: the
    # other files are timed against the dense architecture, untrained.
    import shutil

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import run

    base, rows, _ = quick_run
    model = "lenet_300_100"
    work = tmp_path / "work"
    (work / model).mkdir(parents=True)
    shutil.copy(base / "work" / "data.npz", work)
    for f in (base / "work" / model).iterdir():
        if f.is_file() and not f.name.startswith("dense."):
            shutil.copy(f, work / model)
    dense = next(r for r in rows if r["model"] == model and r["system"] == "dense")
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text(json.dumps({**dense, "machine": "elsewhere", "lat_b1_x_dense": 1.0,
                                  "lat_b64_x_dense": 1.0}) + "\n")
    settings = dict(run.QUICK, quick=True)
    got = run.measure(work, [model], settings, ledger, command="the command")
    expected = {r["file"] for r in rows if r["model"] == model}
    assert sorted(r["file"] for r in got) == sorted(expected)
    assert (work / model / "reference" / "dense-architecture.tflite").exists()
    for r in got:
        if r["file"] == "dense.tflite":
            assert r["machine"] == "elsewhere"
            continue
        assert r["machine"] == run.machine() and r["command"] == "the command"
        assert "untrained" in r["lat_reference"]
        assert r["lat_b1_x_dense"] > 0 and r["lat_b64_x_dense"] > 0
        # Accuracy compares across machines, training seconds do not.
        assert r["acc_vs_dense_pp"] == pytest.approx(100 * (r["test_acc"] - dense["test_acc"]))
        assert r["train_x_dense"] != r["train_x_dense"]  # NaN
    lines = ledger.read_text()
    assert len(lines.splitlines()) == len(expected)
    again = run.measure(work, [model], settings, ledger)  # nothing new: nothing timed
    assert ledger.read_text() == lines and len(again) == len(expected)


def _killed_at_first_backup(cmd, backup, env):
    """Start `cmd`, kill it as soon as its first epoch is backed up."""
    import os
    import signal
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not backup.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("system", ["dkdp", "tfmot"])
def test_a_run_killed_mid_training_resumes_to_the_model_it_would_have_made(
        tmp_path, monkeypatch, system):
    # Model 3's runs take an hour or more here: one killed at epoch k must
    # continue from its backup of epoch k (weights, optimizer, DKDP's masks
    # and state, TFMOT's pruning step, the data order), not start again.
    import os
    import shutil

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import run

    data = run.write_data(tmp_path, quick=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if system == "dkdp":
        script, stem = "train_keras3.py", "dkdp-unstructured-params-0.1"
        args = ["dkdp", "--model", "lenet_300_100", "--epochs", "5", "--targets", "0.9",
                "--structured"]
        marker = pathlib.Path("backup", stem, "training_metadata.json")
    else:
        env["TF_USE_LEGACY_KERAS"] = "1"
        script, stem = "train_tfmot.py", "tfmot-0.9"
        args = ["--model", "lenet_300_100", "--targets", "0.9", "--epochs", "5",
                "--begin-epoch", "0", "--end-epoch", "2"]
        marker = pathlib.Path("backup", stem, "chief", "checkpoint")
    records = {}
    for name in ("killed", "whole"):
        work = tmp_path / name
        work.mkdir()
        shutil.copy(data, work / "data.npz")
        cmd = [sys.executable, str(ROOT / "benchmarks" / script), str(work), *args]
        if name == "killed":
            _killed_at_first_backup(cmd, work / "lenet_300_100" / marker, env)
            assert not (work / "lenet_300_100" / f"{stem}.json").exists()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        records[name] = json.loads((work / "lenet_300_100" / f"{stem}.json").read_text())
        assert not (work / "lenet_300_100" / "backup" / stem).exists()
    killed, whole = records["killed"], records["whole"]
    assert 1 <= killed["resumed_after_epoch"] <= 4 and whole["resumed_after_epoch"] == 0
    keys = ["test_acc", "nonzero_params"] + (
        ["val_teacher_accuracy", "sparsity"] if system == "dkdp" else [])
    assert {k: killed[k] for k in keys} == {k: whole[k] for k in keys}
    if system == "dkdp":
        assert len(killed["val_teacher_accuracy"]) == 5


def test_training_seconds_end_with_the_last_callback_not_with_fit(monkeypatch):
    # The benchmark's training time includes every callback's end-of-training
    # work (DKDP's final averaging) and stops there: what `fit` does after
    # its callbacks (the tf.data iterator's teardown) is not training.
    import time

    import keras
    import numpy as np

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import train_keras3

    class SlowEnd(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            time.sleep(0.3)

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    timer = train_keras3.TrainTimer()
    model.fit(np.zeros((8, 2)), np.zeros((8, 1)), epochs=1, verbose=0,
              callbacks=[SlowEnd(), timer])
    time.sleep(0.5)  # after fit: not counted
    elapsed = time.perf_counter() - timer.start
    assert timer.seconds >= 0.3
    assert timer.seconds <= elapsed - 0.5


def test_the_no_kd_ablation_trains_without_distillation(monkeypatch):
    # `--ablate no_kd` only renamed its files until 2026-12-06: its runs
    # trained with lambda_kd=1, as the whole method's do.
    import argparse

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import train_keras3

    args = argparse.Namespace(student_width=None, lambda_kd=None, hard_weight=None,
                              mutual=False, ablate=None)
    assert train_keras3.dkdp_options(args) == {"mutual": False}
    for ablate in ("no_kd", "uniform"):
        args.ablate = ablate
        options = train_keras3.dkdp_options(args)
        assert options.get("lambda_kd", 1.0) == (0.0 if ablate == "no_kd" else 1.0)
    args.ablate, args.lambda_kd = "no_kd", 2.0  # the ablation wins over the option
    assert train_keras3.dkdp_options(args)["lambda_kd"] == 0.0


def test_a_command_whose_rows_are_in_the_ledger_is_not_run_again(monkeypatch, tmp_path, capsys):
    # On a new machine WORK is empty: the ledger, not WORK, says what is done.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import run

    settings = dict(run.QUICK, quick=True)
    (dense,) = run.commands("dense", "lenet_300_100", tmp_path, settings)
    key = run.command_key(dense)
    assert key == "train_keras3.py dense --model lenet_300_100 --epochs 2 --seed 0"
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text(json.dumps({"model": "lenet_300_100", "file": "dense.tflite",
                                  "command": key}) + "\n")
    assert run.train(["dense"], ["lenet_300_100"], tmp_path, settings, False, ledger) == []
    assert f"in the ledger already, skipped: {key}" in capsys.readouterr().out
    assert not (tmp_path / "logs").exists()  # nothing was started


def test_kd_distils_from_the_better_trained_teacher_on_validation(monkeypatch, tmp_path):
    # Plain dense MobileNetV2 ends at 58.64% on AVX-512 machines (its
    # BatchNormalization statistics lag): kd takes dense+avg where that run
    # is in WORK and is better on the validation images, and says so.
    import keras

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import run as runner
    import train_keras3

    runner.write_data(tmp_path, quick=True)
    run = train_keras3.Run(tmp_path, "lenet_300_100", epochs=1, batch=128)
    keras.utils.set_random_seed(0)
    untrained = run.build()
    untrained.save(run.dir / "dense.keras")
    model, name, acc = train_keras3.kd_teacher(run)
    assert name == "dense" and acc < 0.3  # alone, dense is the teacher, however poor
    trained = run.build()
    train_keras3.compile_(trained)
    trained.fit(run.x, run.y, epochs=3, batch_size=128, verbose=0)
    trained.save(run.dir / "dense-avg.keras")
    model, name, acc = train_keras3.kd_teacher(run)
    assert name == "dense-avg" and acc > 0.6
    assert model.count_params() == trained.count_params()
    (run.dir / "dense.keras").unlink()
    (run.dir / "dense-avg.keras").unlink()
    with pytest.raises(SystemExit, match="run `dense` first"):
        train_keras3.kd_teacher(run)


def _row(system, variant, acc, lat_ms, quantize="none", **extra):
    return {"model": "mobilenet_v2", "system": system, "variant": variant, "target": 0.0,
            "quantize": quantize, "test_acc": acc, "tflite_test_acc": acc,
            "nonzero_params": 1000, "tflite_bytes": 8_000_000, "lat_b1_ms": lat_ms,
            "lat_b1_x_dense": lat_ms / 0.38, "bytes_x_dense": 1.0, **extra}


def test_the_kd_checks_weigh_dkdp_students_and_accuracy_counts_against_dense_avg(
        monkeypatch):
    # The 2026-12-02 figures of model 3: DKDP's student (0.049 ms, 87.04%)
    # is faster and more accurate than both keras.distillation students, and
    # dense's lagging BatchNormalization statistics (85.33%) must not make
    # a DKDP row look better than dense with the same momentum (90.58%).
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import run

    rows = [_row("dense", "dense", 0.8533, 0.383),
            _row("dense_avg", "dense + weight averaging", 0.9058, 0.375),
            _row("dkdp", "structured 0.5 MACs (taylor)", 0.9077, 0.152),
            _row("dkdp", "student, structured 0.5 MACs run", 0.8704, 0.049),
            _row("kd", "width 0.5", 0.8467, 0.119),
            _row("kd", "width 0.35", 0.8551, 0.087)]
    kd = [(text, ok) for text, ok in run.checks(rows) if "latency of kd" in text]
    assert len(kd) == 2
    for text, ok in kd:
        assert ok and "student, structured 0.5 MACs run" in text, text
    (latency,) = [(t, ok) for t, ok in run.checks(rows) if "≤0.5× dense batch-1" in t]
    assert latency[1] and "+0.19 pp" in latency[0], latency
    # A DKDP row 0.6 pp under dense+avg fails, though it is 4.6 pp above dense.
    rows[2] = _row("dkdp", "structured 0.5 MACs (taylor)", 0.8998, 0.152)
    (latency,) = [(t, ok) for t, ok in run.checks(rows) if "≤0.5× dense batch-1" in t]
    assert not latency[1] and "-0.60 pp" in latency[0], latency
    # Without faster DKDP models, the kd checks are not met.
    rows = [r for r in rows if "student" not in r["variant"]]
    kd = [ok for text, ok in run.checks(rows) if "latency of kd" in text]
    assert kd == [False, False]


def test_the_posthoc_correction_at_strength_s_is_what_align_classes_leaves(monkeypatch):
    # benchmarks/continual_posthoc.py scores the aligned heads from saved
    # logits: its formula must give the logits align_classes would.
    import keras
    import numpy as np

    from dkdp_keras import continual

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import continual_posthoc

    rng = np.random.default_rng(0)
    net = keras.Sequential([keras.Input((6,)), keras.layers.Dense(10)])
    kernel = rng.normal(size=(6, 10)).astype("float32")
    kernel[:, 5:] *= 3.0  # new classes' columns larger, as after task B
    net.layers[0].set_weights([kernel, rng.normal(size=10).astype("float32")])
    x = rng.normal(size=(64, 6)).astype("float32")
    z = net.predict(x, verbose=0)
    layer = continual.output_layer(net)
    gain = float(continual.alignment_gain(layer, continual._indicator(range(5), 10),
                                          continual._indicator(range(5, 10), 10)))
    assert gain < 0.5
    bias = layer.get_weights()[1]
    for s in (0.0, 0.3, 1.0):
        layer.set_weights([kernel, bias])
        continual.align_classes(net, list(range(5)), list(range(5, 10)), strength=s)
        np.testing.assert_allclose(continual_posthoc.corrected(z, bias, gain, s, 0.0),
                                   net.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    shifted = continual_posthoc.corrected(z, bias, gain, 0.0, 1.5)
    np.testing.assert_allclose(shifted[:, 5:], z[:, 5:] - 1.5, rtol=1e-6)
    np.testing.assert_array_equal(shifted[:, :5], z[:, :5])


def test_the_step_operation_count_includes_the_update_branch(monkeypatch):
    # DKDPModel applies its two optimizers inside a tf.cond (a step whose
    # losses are not finite applies nothing): a count of the step's top
    # graph alone would miss every update. Each Adam update ends with one
    # AssignSubVariableOp per variable, in the branch.
    import numpy as np

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import dkdp_step_cost

    x = np.random.default_rng(0).random((16, 28, 28, 1), dtype=np.float32)
    y = np.arange(16) % 10
    counts = {}
    for system in ("dense", "dkdp"):
        model = dkdp_step_cost.build(system, "lenet_300_100")
        counts[system] = dkdp_step_cost.step_ops(model, x, y)
        variables = model.trainable_variables
        assert counts[system]["AssignSubVariableOp"] == len(variables), system
    assert len(model.student.trainable_variables) == 6
    assert not set(counts["dkdp"]) & dkdp_step_cost.FREE_OPS
    assert sum(counts["dkdp"].values()) > 2 * sum(counts["dense"].values())


def test_a_structured_budget_can_step_its_own_widths(monkeypatch):
    # "int8:25000/1": widths in steps of one unit in that run alone (the
    # int8 <= 33 kB job); the callback gets that step and compaction aligns
    # to it, so the file holds no zero channel the budget did not count.
    import argparse

    import dkdp_keras as dkdp

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import train_keras3

    assert train_keras3.unit_multiple("unit", "int8:25000/1") == ("int8:25000", 1)
    assert train_keras3.unit_multiple("unit", "macs:0.2", given=8) == ("macs:0.2", 8)
    assert train_keras3.unit_multiple("unit", "macs:0.2") == ("macs:0.2", None)
    assert train_keras3.unit_multiple("weight", "params:0.1/1") == ("params:0.1", None)
    with pytest.raises(SystemExit, match="positive integer"):
        train_keras3.unit_multiple("unit", "int8:25000/0")
    args = argparse.Namespace(importance=None, initial_step=None, finish_by=None, ablate=None)
    budget = dkdp.Budget(max_bytes=25_000, bytes_per_param=1)
    callback, _ = train_keras3.dkdp_callback("unit", budget, args, multiple=1)
    assert callback.unit_multiple == 1
    callback, _ = train_keras3.dkdp_callback("unit", budget, args)
    assert callback.unit_multiple == 16


def test_a_latency_budget_is_a_share_of_dense_time_on_the_fitted_plane(monkeypatch, tmp_path):
    # "latency:0.1": a tenth of the dense copy's LiteRT time, estimated with
    # the plane dkdp.fit_latency fitted on this machine (stubbed here: the
    # timing is the benchmark's, not a test's).
    import dkdp_keras as dkdp

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import train_keras3

    fit = dkdp.LatencyFit(0.005, 2e-8, 3e-8, points=[(4_643_840, 824_746, 0.12),
                                                      (97_536, 13_278, 0.009)])
    asked = []
    monkeypatch.setattr(dkdp, "fit_latency", lambda model, runtime: asked.append(runtime) or fit)
    model = dkdp.zoo.reference_cnn()
    budget, label = train_keras3.structured_budget("latency:0.1", model)
    assert asked == ["litert"] and label == "0.1 LiteRT latency"
    assert budget.max_latency_ms == pytest.approx(0.012) and budget.latency_fit is fit
    with pytest.raises(SystemExit, match="latency:F"):
        train_keras3.structured_budget("time:0.1", model)
    # --latency-fit: an earlier run's plane, not a new fit (the fixed time
    # moved by a third between two passes on this machine).
    row = tmp_path / "row.json"
    row.write_text(json.dumps({"budget": "latency:0.1", "latency_fit": fit.get_config()},
                              indent=1))
    again, _ = train_keras3.structured_budget("latency:0.2", model,
                                              train_keras3.latency_fit(str(row)))
    assert asked == ["litert"] and again.max_latency_ms == pytest.approx(0.024)
    assert again.latency_fit.get_config() == fit.get_config()
    assert train_keras3.latency_fit(None) is None


def test_paired_times_goes_on_from_the_pairs_an_interrupted_run_wrote(monkeypatch, tmp_path):
    # A reference_cnn cost set is hours of training on 2 cores: each pair is
    # written as it ends, a second run with the same --out trains only the
    # pairs left, and a file of another measurement is refused, not mixed in.
    import types

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import paired_times

    (tmp_path / "data.npz").write_bytes(b"")
    out = tmp_path / "pairs.json"
    calls = []

    def fake_run(cmd, **kwargs):
        system = cmd[cmd.index("--one") + 1]
        calls.append(system)
        if len(calls) == 3 and fail["now"]:
            return types.SimpleNamespace(returncode=1, stdout="", stderr="killed")
        seconds = 100.0 if system == "dense" else 100.0 + 10 * len(calls)
        line = json.dumps({"system": system, "train_s": seconds})
        return types.SimpleNamespace(returncode=0, stdout=line + "\n", stderr="")

    monkeypatch.setattr(paired_times.subprocess, "run", fake_run)
    import run

    # Each run waits for an idle machine first, and its row says how busy it was.
    events = []
    monkeypatch.setattr(run, "wait_idle", lambda **kw: events.append(len(calls)) or 7.0)
    argv = ["paired_times.py", "--model", "reference_cnn", "--pairs", "3",
            "--work", str(tmp_path), "--out", str(out)]
    fail = {"now": True}
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="dense run failed"):
        paired_times.main()
    written = json.loads(out.read_text())
    assert len(written["pairs"]) == 1 and written["ratios"] == [1.2]
    assert written["machine"] and written["model"] == "reference_cnn"

    assert events == [0, 1, 2]
    fail["now"], calls[:], events[:] = False, [], []
    paired_times.main()
    assert calls == ["dense", "dkdp", "dense", "dkdp"]  # pairs 2 and 3 only
    assert events == [0, 1, 2, 3]  # each run of the second call waited before it started
    written = json.loads(out.read_text())
    assert {r["cpu_busy_pct_before"] for pair in written["pairs"] for r in pair.values()} == {7.0}
    assert written["ratios"] == [1.2, 1.2, 1.4] and written["median"] == pytest.approx(1.2)

    monkeypatch.setattr(sys, "argv", argv[:-2] + ["--target", "0.95", "--out", str(out)])
    with pytest.raises(SystemExit, match="holds another measurement"):
        paired_times.main()


def test_pareto_plot_numbers_points_keys_them_and_puts_a_far_outlier_on_the_floor(
        monkeypatch, tmp_path):
    # Model 3's plain dense (58.64%) against 84-91% for the rest squeezed the
    # band into a strip, and twenty-five names beside the points stacked over
    # the title: the plot numbers points, keys them below, spans the band.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import matplotlib.image
    import pareto
    import run

    def row(system, variant, acc, target=0.0):
        return {"model": "m", "system": system, "variant": variant, "target": target,
                "tflite_test_acc": acc, "tflite_bytes": 1e6 * (1 - target) + 1e4,
                "lat_b1_ms": 0.2 * (1 - target) + 0.01, "machine": "cpu A"}

    rows = [row("dkdp", f"budget {t:.2f}", 0.90 + t / 100, t) for t in (0.5, 0.3, 0.2)]
    rows += [row("dense", "dense", 0.5864), row("kd", "width 0.5", 0.8769, 0.6),
             row("unknown", "not plotted", 0.9)]
    order = {s: i for i, s in enumerate(run.SYSTEMS)}
    numbered = pareto.plotted(rows, "m", order)
    assert [(n, r["system"]) for n, r in numbered][:2] == [(1, "dense"), (2, "kd")]
    assert [r["target"] for _, r in numbered[2:]] == [0.2, 0.3, 0.5]  # the table's order
    low, high, floor = pareto.accuracy_range([100 * r["tflite_test_acc"] for _, r in numbered])
    assert 86.0 < floor < 87.69 and low < floor and high > 90.5  # dense is off the band
    few, many = tmp_path / "few.png", tmp_path / "many.png"
    labels, legend = pareto.pareto_plot(rows, "m", few, order)
    assert labels == [("TFLite file size (log)", "TFLite test accuracy, %"),
                      ("batch-1 latency, ms (log)", "TFLite test accuracy, %")]
    assert legend == ["dense", "kd", "dkdp"]  # one entry a system, the floor's too
    rows += [row("dkdp", f"more {i}", 0.88 + i / 1000, 0.9) for i in range(20)]
    pareto.pareto_plot(rows, "m", many, order)
    assert matplotlib.image.imread(many).shape[0] > matplotlib.image.imread(few).shape[0] + 100
    assert pareto.tick_label(3e5, "bytes") == "300 kB" and pareto.tick_label(0.05, "ms") == "0.05"


def test_cost_lines_judge_three_pairs_against_the_bound_and_tfmot_and_show_a_set_under_way(
        monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import run

    def write(name, system, ratios, machine="cpu A", target=0.9, model="reference_cnn"):
        (tmp_path / name).write_text(json.dumps(
            {"model": model, "system": system, "target": target, "structured": None,
             "epochs": 15, "machine": machine, "pairs": [], "ratios": ratios,
             "median": sorted(ratios)[len(ratios) // 2]}))
        return tmp_path / name

    paths = [write("a.json", "dkdp", [1.25, 1.2, 1.3]), write("b.json", "tfmot", [1.1, 1.15, 1.0]),
             write("c.json", "dkdp", [1.1], target=0.95)]
    lines = "\n".join(run.cost_lines(paths))
    assert "**not met**: reference_cnn, dkdp at 0.9: median **1.25×**" in lines
    assert "TFMOT's own 1.10× (`b.json`)" in lines and "another machine" not in lines
    assert "(1.25, 1.20, 1.30; `a.json`)" in lines
    assert "under way (1 of the 3 pairs a figure needs): reference_cnn, dkdp at 0.95" in lines
    # Under the bound and under TFMOT's own ratio: met; a TFMOT set of two
    # pairs is no rival yet.
    paths = [write("a.json", "dkdp", [1.05, 1.2, 1.1]), write("b.json", "tfmot", [1.1, 1.0])]
    lines = "\n".join(run.cost_lines(paths))
    assert ("- within the bound, TFMOT's own ratio not measured yet: reference_cnn, dkdp at 0.9: "
            "median **1.10×**") in lines
    assert "- met:" not in lines
    paths = [write("a.json", "dkdp", [1.05, 1.2, 1.1]),
             write("b.json", "tfmot", [1.2, 1.3, 1.25], machine="cpu B")]
    lines = "\n".join(run.cost_lines(paths))
    assert "- met:" in lines and "TFMOT's own 1.25× (`b.json`) (measured on another machine)" in lines


def test_one_pass_times_files_together_and_continues_the_training_it_paused(
        monkeypatch, tmp_path):
    # Rows of a ledger are timed in separate passes; one_pass.py times the
    # files a comparison rests on together, with a queue's training paused
    # for the time of it and continued after, whatever happens.
    import keras
    import psutil

    import dkdp_keras as dkdp

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import one_pass

    for name, width in (("a.tflite", 8), ("b.tflite", 64)):
        model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(width),
                                  keras.layers.Dense(4)])
        dkdp.export_tflite(model, tmp_path / name, latency_runs=1)
    queue = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)",
                              "train_keras3.py"])
    try:
        assert queue.pid in [p.pid for p in one_pass.training_processes()]
        stopped = []
        from dkdp_keras import export

        timed = export.measure_tflite_latencies_ms

        def spy(paths, **kwargs):
            stopped.append(psutil.Process(queue.pid).status())
            return timed(paths, **kwargs)

        monkeypatch.setattr(export, "measure_tflite_latencies_ms", spy)
        out = tmp_path / "pass.json"
        monkeypatch.setattr(sys, "argv", ["one_pass.py", str(tmp_path), "a.tflite", "b.tflite",
                                          "--reps", "2", "--runs", "20", "--pause",
                                          "--out", str(out)])
        one_pass.main()
        assert stopped == [psutil.STATUS_STOPPED] * 2
        assert psutil.Process(queue.pid).status() != psutil.STATUS_STOPPED
        record = json.loads(out.read_text())
        assert record["files"] == ["a.tflite", "b.tflite"] and len(record["ratios"]) == 2
        assert all(r[0] == 1.0 and r[1] > 0 for r in record["ratios"])
        assert record["machine"]
    finally:
        queue.kill()
