"""The dkdp command: bad input in one line with status 2; an interrupted
tiny run resumed to its end; a quick real run."""

import inspect
import json
import os
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

from dkdp_keras import cli, pipeline
from tests.test_datasets import needs_fashion


@pytest.mark.parametrize(
    "argv,text",
    [
        (["run", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["run", "--dataset", "/nope/data.npz"], "No dataset file at /nope/data.npz"),
        (["run", "--model", "resnet"], "unknown model 'resnet'"),
        (["run", "--model", "/nope/m.keras"], "no model file at '/nope/m.keras'"),
        (["run", "--max-params", "-5"], "--max-params must be > 0, got -5"),
        (["run", "--epochs", "0"], "--epochs must be at least 1"),
        (["run", "--importance", "fisher"], "Unknown importance criterion 'fisher'"),
        (["run", "--dataset", "emnist"], "use one of fashion_mnist, mnist, cifar10, digits"),
        (["export", "/nope/m.keras", "--out", "m.tflite"], "no model file"),
        (["inspect", "/nope/m.keras"], "no model file"),
    ],
)
def test_bad_input_is_one_line_and_status_two(argv, text, capsys, tmp_path):
    assert cli.main(argv + (["--out", str(tmp_path)] if argv[0] == "run" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert text in err and len(err.splitlines()) == 1 and "Traceback" not in err


#: A run that would be short if a check let it start (old code trained).
SHORT = ["--dataset", "digits", "--model", "lenet_300_100", "--epochs", "1", "--no-dense",
         "--quantize", "none"]


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """A directory of bad inputs: tiny .npz files (8×8 digits) and .keras files."""
    d = tmp_path_factory.mktemp("bad")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = (digits.images * (255 / 16)).astype(np.uint8), digits.target

    def npz(name, **change):
        arrays = dict(x_train=images[:200], y_train=labels[:200],
                      x_test=images[-40:], y_test=labels[-40:])
        arrays.update(change)
        np.savez(d / name, **arrays)

    x = images[:200] / 255.0
    x[7, 3, 3] = np.nan
    npz("nan.npz", x_train=x)
    npz("lengths.npz", y_train=labels[:150])
    negative = labels[:200].copy()
    negative[5] = -1
    npz("negative.npz", y_train=negative)
    npz("test_shape.npz", x_test=images[-40:, :6, :6])
    npz("few.npz", x_train=images[:6], y_train=labels[:6])
    inputs = keras.Input((8, 8, 1))
    flat = keras.layers.Flatten()(inputs)
    keras.Model(inputs, [keras.layers.Dense(10)(flat), keras.layers.Dense(2)(flat)]).save(
        d / "two_outputs.keras")
    keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                      keras.layers.Dense(3)]).save(d / "three_classes.keras")
    one = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                            keras.layers.Dense(12, activation="relu"), keras.layers.Dense(10)])
    one.save(d / "one.keras")
    import dkdp_keras as dkdp

    dkdp.DKDPModel(one).save(d / "dkdp_model.keras")
    (d / "empty.keras").write_bytes(b"")
    (d / "corrupt.keras").write_bytes((d / "one.keras").read_bytes()[:300])  # truncated
    (d / "a_file").write_text("not a directory")
    (d / "dir.tflite").mkdir()
    return d


@pytest.mark.parametrize(
    "argv,text",
    [
        # --out: a file, under a file, a place where nothing can be created.
        (["run", *SHORT, "--out", "{d}/a_file"],
         "--out {d}/a_file is a file, not a directory: choose a directory"),
        (["run", *SHORT, "--out", "{d}/a_file/run"],
         "--out {d}/a_file/run is inside {d}/a_file, which is a file"),
        (["run", *SHORT, "--out", "/sys/dkdp_run"],  # sysfs: no mkdir, even for root
         "--out /sys/dkdp_run cannot be created there: /sys is not writable (Operation "
         "not permitted): choose a directory you can write to"),
        # Numbers out of range.
        (["run", *SHORT, "--lambda-kd", "-1", "--out", "{o}"],
         "--lambda-kd must be a finite number >= 0 (the weight of the distillation loss; "
         "0 turns it off), got -1"),
        (["run", *SHORT, "--lambda-kd", "nan", "--out", "{o}"], "--lambda-kd must be"),
        (["run", *SHORT, "--temperature", "0", "--out", "{o}"],
         "--temperature must be a finite number > 0 (the distillation softmax "
         "temperature; 1 is none, 4 the default), got 0"),
        (["run", *SHORT, "--max-params", "1e400", "--out", "{o}"],
         "--max-params must be a finite number, got inf: give the budget itself"),
        (["run", *SHORT, "--max-macs", "inf", "--out", "{o}"],
         "--max-macs must be a finite number, got inf"),
        (["run", *SHORT, "--seed", "-1", "--out", "{o}"],
         "--seed must be in 0 .. 2**32 - 1 (4294967295), got -1"),
        (["run", *SHORT, "--seed", str(2**32), "--out", "{o}"], "got 4294967296"),
        # Datasets: each found before the first step (old code: in it, or after it).
        (["run", *SHORT, "--dataset", "{d}/lengths.npz", "--out", "{o}"],
         "{d}/lengths.npz: x_train has 200 examples but y_train has 150 labels; each "
         "example needs one label"),
        (["run", *SHORT, "--dataset", "{d}/negative.npz", "--out", "{o}"],
         "{d}/negative.npz: y_train holds negative labels (-1 at example 5); labels are "
         "class indices 0, 1, 2, ..."),
        (["run", *SHORT, "--dataset", "{d}/test_shape.npz", "--out", "{o}"],
         "{d}/test_shape.npz: x_test's examples have shape (6, 6, 1) but x_train's have "
         "(8, 8, 1); both splits need images of one shape"),
        (["run", *SHORT, "--dataset", "{d}/few.npz", "--out", "{o}"],
         "has 6 training examples; dkdp run needs at least 10"),
        # Models.
        (["run", *SHORT, "--model", "{d}/two_outputs.keras", "--out", "{o}"],
         "--model '{d}/two_outputs.keras' has 1 input(s) and 2 outputs; dkdp run trains a "
         "classifier with one input and one output"),
        (["run", *SHORT, "--model", "{d}/three_classes.keras", "--out", "{o}"],
         "--model '{d}/three_classes.keras' outputs shape (3,), but the dataset's labels "
         "are 0 to 9"),
        (["run", *SHORT, "--model", "{d}/dkdp_model.keras", "--out", "{o}"],
         "--model '{d}/dkdp_model.keras' is a saved DKDPModel (a teacher with its "
         "student), not a model to compress: pass a plain Keras model, such as the "
         "teacher_compact.keras or student.keras of the same run"),
        (["run", *SHORT, "--model", "{d}/empty.keras", "--out", "{o}"],
         "'{d}/empty.keras' is not a readable .keras archive: it is empty (0 bytes); "
         "save the model again"),
        (["run", *SHORT, "--model", "{d}/corrupt.keras", "--out", "{o}"],
         "'{d}/corrupt.keras' is not a readable .keras archive: it is corrupt (300 bytes, "
         "not a zip archive)"),
        (["export", "{d}/empty.keras", "--out", "{d}/m.tflite"],
         "'{d}/empty.keras' is not a readable .keras archive: it is empty"),
        (["inspect", "{d}/corrupt.keras"], "'{d}/corrupt.keras' is not a readable .keras"),
        # export --out and inspect --out.
        (["export", "{d}/one.keras", "--out", "{d}"],
         "--out {d} is a directory: give the file to write, for example {d}/model.tflite"),
        (["export", "{d}/one.keras", "--out", "{d}/dir.tflite"],
         "--out {d}/dir.tflite is a directory"),
        (["export", "{d}/one.keras", "--out", "/sys/m.tflite"],
         "--out /sys/m.tflite cannot be created there: /sys is not writable"),
        (["inspect", "{d}/dkdp_model.keras", "--out", "/sys/dkdp_plots"],
         "--out /sys/dkdp_plots cannot be created there: /sys is not writable"),
        (["inspect", "{d}/dkdp_model.keras", "--out", "{d}/a_file"],
         "--out {d}/a_file is a file, not a directory"),
    ],
)
def test_bad_files_and_values_are_one_line_and_status_two(argv, text, bad, capsys,
                                                          tmp_path):
    out = tmp_path / "o"
    assert cli.main([a.format(d=bad, o=out) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert text.format(d=bad) in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()  # refused before the run directory is made
    assert not list(bad.glob(".dkdp-probe-*")) and not list(pathlib.Path("/sys").glob(
        ".dkdp-probe-*"))


def test_nan_in_the_data_is_refused_before_the_run_starts(bad, tmp_path, capsys):
    argv = ["run", *SHORT, "--dataset", str(bad / "nan.npz"), "--out", str(tmp_path / "o")]
    for _ in range(2):  # a rerun is refused for the data, not as an interrupted run
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert f"{bad}/nan.npz: x_train holds 1 NaN or infinite values (the first in " \
            "example 7); fix or drop those examples" in err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert not (tmp_path / "o" / "settings.json").exists()


def test_an_unwritable_out_directory_is_one_line(tmp_path, capsys, monkeypatch):
    # As root, chmod does not keep anyone out: os.access answers for the
    # user, and the test stands in for a directory this user may not write.
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if pathlib.Path(p) == locked
                        else real(p, mode, **kw))
    for argv, text in (
        (["run", *SHORT, "--out", str(locked)], f"--out {locked} is not writable"),
        (["run", *SHORT, "--out", str(locked / "run")],
         f"--out {locked / 'run'} cannot be created there: {locked} is not writable"),
        (["inspect", "m.keras", "--out", str(locked)], f"--out {locked} is not writable"),
        (["export", "m.keras", "--out", str(locked / "m.tflite")],
         f"--out {locked / 'm.tflite'} cannot be created there: {locked} is not writable"),
    ):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert f"{text} (permission denied): choose a directory you can write to" in err, err
        assert len(err.splitlines()) == 1
    assert list(locked.iterdir()) == []


def test_out_check_leaves_nothing_behind(tmp_path):
    cli._check_out_dir("--out", str(tmp_path))
    cli._check_out_dir("--out", str(tmp_path / "new" / "run"))
    cli._check_out_file("--out", str(tmp_path / "m.tflite"), ".tflite")
    assert list(tmp_path.iterdir()) == []


def test_offline_cifar10_says_what_is_missing_and_what_fixes_it(tmp_path, capsys,
                                                                monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    empty = tmp_path / "tfds"  # tensorflow-datasets' data directory, without cifar10
    monkeypatch.setenv("TFDS_DATA_DIR", str(empty))
    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(empty))
    assert cli.main(["run", "--dataset", "cifar10", "--epochs", "1", "--no-dense",
                     "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"dkdp run: Dataset 'cifar10' is not on this machine (tensorflow-datasets has "
        f"not prepared it in {empty}): prepare it once with a network: tfds build cifar10 "
        "(in Python: load('cifar10', download=True)); or pass a .npz with x_train, "
        "y_train, x_test and y_test.")
    assert not (tmp_path / "o").exists()


def _digits_npz(path, train=256, test=64, size=8):
    """A tiny dataset file: scikit-learn's digits as uint8 images."""
    from sklearn.datasets import load_digits

    images = load_digits().images * (255 / 16)
    if size != 8:
        images = images[:, :size, :size]
    np.savez(path, x_train=images[:train].astype(np.uint8),
             y_train=load_digits().target[:train],
             x_test=images[-test:].astype(np.uint8), y_test=load_digits().target[-test:])
    return str(path)


def test_resume_without_settings_is_one_line(tmp_path, capsys):
    assert cli.main(["run", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"nothing to resume in '{tmp_path}': it has no settings.json" in err
    assert len(err.splitlines()) == 1


def test_model_too_big_for_the_images_is_one_line(tmp_path, capsys):
    data = _digits_npz(tmp_path / "tiny.npz", size=2)  # 2×2 images: two 2×2 poolings fail
    assert cli.main(["run", "--dataset", data, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "model 'reference_cnn' cannot take inputs of shape (2, 2, 1)" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o" / "settings.json").exists()


def test_the_pipeline_called_from_python_refuses_bad_input_before_training(tmp_path):
    out = tmp_path / "o"
    for kwargs, text in [
        ({"epochs": 0}, "--epochs must be at least 1, got 0"),
        ({"epochs": "3"}, "--epochs must be an integer, got '3'"),
        ({"lambda_kd": -1.0}, "--lambda-kd must be a finite number >= 0"),
        ({"granularity": "layer"}, "--granularity must be one of weight, unit, got 'layer'"),
        ({"quantize": None}, "--quantize must be a string, got None"),
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
        ({"resume": tmp_path}, f"nothing to resume in '{tmp_path}': it has no settings.json"),
    ]:
        with pytest.raises(pipeline.PipelineError, match="^" + re.escape(text)):
            pipeline.run(**{"model": "lenet_300_100", "out": out, **kwargs})
    assert not out.exists()  # refused before the run directory is made
    assert cli.UsageError is pipeline.PipelineError and issubclass(cli.UsageError, ValueError)


def test_the_cli_and_the_pipeline_have_the_same_options_and_defaults():
    parsed = vars(cli._parser().run_parser.parse_args([]))
    signature = inspect.signature(pipeline.run).parameters
    assert parsed == {name: p.default for name, p in signature.items()}
    assert set(pipeline.SETTINGS) == set(parsed) - {"out", "resume"}


def test_pipeline_order_depends_on_seed_and_epoch_only():
    x = np.arange(10, dtype="float32")[:, None]
    y = np.arange(10)

    def batches(start, epochs):
        ds = pipeline._pipeline(x, y, batch=4, seed=3, start=start, epochs=epochs)
        return [b[1].numpy().tolist() for b in ds.take(3 * (epochs - start))]

    whole, resumed = batches(0, 3), batches(1, 3)
    assert resumed == whole[3:]  # epoch 2 and 3 as in the uninterrupted run
    assert sorted(sum(whole[:3], [])) == list(range(10))  # each epoch: every example once
    assert whole[:3] != whole[3:6]  # a new order every epoch


def test_default_batch_size_gives_enough_steps():
    assert pipeline._default_batch_size(55_000) == 128
    assert pipeline._default_batch_size(1_295) == 32  # digits: 41 steps an epoch
    assert pipeline._default_batch_size(100) == 8


@pytest.mark.filterwarnings("ignore:Adaptive")
def test_interrupted_run_resumes_to_the_end(tmp_path, capsys, monkeypatch):
    data = _digits_npz(tmp_path / "digits.npz")
    out = tmp_path / "run"
    argv = ["run", "--dataset", data, "--model", "lenet_300_100", "--epochs", "3",
            "--batch-size", "64", "--quantize", "none", "--out", str(out)]
    original = keras.callbacks.BackupAndRestore.on_epoch_begin
    interrupted = []

    def ctrl_c(self, epoch, logs=None):  # Ctrl-C as the DKDP run's 2nd epoch starts
        if epoch == 1 and str(self.backup_dir).endswith("backup") and not interrupted:
            interrupted.append(epoch)
            raise KeyboardInterrupt
        return original(self, epoch, logs)

    monkeypatch.setattr(keras.callbacks.BackupAndRestore, "on_epoch_begin", ctrl_c)
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert f"the last completed epoch is in {out / 'checkpoint.keras'}" in err
    assert f"continue with: dkdp run --resume {out}" in err
    assert (out / "checkpoint.keras").stat().st_size > 0
    assert (out / "dense.keras").stat().st_size > 0  # the baseline had finished
    assert json.loads((out / "backup" / "training_metadata.json").read_text())["epoch"] == 1
    assert [e["epoch"] for e in json.loads((out / "history.json").read_text())] == [0]
    assert not (out / "metrics.json").exists()

    # A new run may not overwrite it, and --resume keeps the run's settings.
    assert cli.main(argv) == 2
    assert "holds an interrupted run: continue it with dkdp run --resume" in \
        capsys.readouterr().err
    assert cli.main(["run", "--resume", str(out), "--epochs", "5", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--epochs 5 (the run has 3)" in err and "--quick (the run has False)" in err
    assert len(err.splitlines()) == 1

    # Options equal to the saved ones are no conflict.
    assert cli.main(["run", "--resume", str(out), "--epochs", "3", "--dataset", data]) == 0
    text = capsys.readouterr().out
    assert "dense baseline is trained already" in text
    assert "dkdp training resumes after epoch 1 of 3" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]["loss"]) == 3 and len(metrics["history"]["tau"]) == 3
    assert len(metrics["dense_history"]["val_accuracy"]) == 3
    # Same initial weights and batches: before its first pruning event the
    # DKDP teacher trains exactly as the dense baseline.
    assert metrics["history"]["val_teacher_accuracy"][0] == pytest.approx(
        metrics["dense_history"]["val_accuracy"][0], abs=1e-6)
    assert [m["model"] for m in metrics["models"]] == [
        "dense teacher", "pruned teacher (compacted)", "student"]
    dense, teacher, student = metrics["models"]
    assert dense["params"] == 50_610 and teacher["params"] <= 50_610 // 10
    assert dense["tflite_acc"] > 0.5  # 3 epochs on 256 digits, 64 test images
    assert dense["tflite_bytes"] > teacher["tflite_bytes"]
    assert metrics["train_s"] > 0
    report = (out / "report.md").read_text()
    assert "| dense teacher | 50,610 |" in report and "](size_accuracy.png)" in report
    for name in ("size_accuracy.png", "training.png", "dense.tflite", "student.tflite"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "backup").exists() and not (out / "backup_dense").exists()
    assert cli.main(["run", "--resume", str(out)]) == 2
    assert "has finished" in capsys.readouterr().err


@needs_fashion
def test_impossible_budget_and_no_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dkdp_keras.cli", "run", "--max-params", "100",
         "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "max_params=100 is below" in out.stderr and "Traceback" not in out.stderr


def test_a_latency_budget_under_the_runtimes_fixed_time_is_refused_before_training(
        tmp_path, capsys):
    # dkdp run fits the teacher's LiteRT latency (eight copies, timed) before
    # the dense baseline: a budget under what every inference pays is one line.
    data = _digits_npz(tmp_path / "d.npz")
    assert cli.main(["run", "--dataset", data, "--model", "lenet_300_100",
                     "--max-latency-ms", "1e-6", "--out", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert "fit_latency: width 0.125: " in captured.out  # the timing was shown as it ran
    # LiteRT's own log line ("INFO: Created TensorFlow Lite XNNPACK delegate")
    # is the interpreter's, on stderr whatever Python does.
    err = [line for line in captured.err.splitlines() if not line.startswith("INFO: ")]
    assert len(err) == 1 and "Traceback" not in captured.err, captured.err
    assert re.match(r"dkdp run: max_latency_ms=1e-06 is below the [0-9.e-]+ ms that model "
                    r"'lenet_300_100' would take at its narrowest on litert", err[0]), err
    assert not (tmp_path / "o" / "settings.json").exists()


@pytest.mark.slow
@needs_fashion
def test_quick_run_writes_the_report(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["run", "--quick", "--model", "lenet_300_100", "--out", str(out)]) == 0
    for name in ("report.md", "metrics.json", "training.png", "layer_sparsity.png",
                 "importance_histograms.png", "size_accuracy.png", "teacher.tflite",
                 "student.tflite", "dense.tflite",
                 "teacher.export.json", "dkdp_model.keras", "teacher_compact.keras",
                 "checkpoint.keras"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    dense, teacher, _ = metrics["models"]
    assert dense["model"] == "dense teacher" and dense["params"] == metrics["dense_params"]
    assert teacher["params"] <= metrics["dense_params"] // 10 + 1000
    assert teacher["tflite_acc"] > 0.75 and teacher["agreement"] > 0.95
    assert "| pruned teacher (compacted) |" in (out / "report.md").read_text()
    assert cli.main(["inspect", str(out / "dkdp_model.keras")]) == 0
    assert cli.main(["export", str(out / "teacher_compact.keras"), "--out",
                     str(tmp_path / "again.tflite"), "--fixed-batch"]) == 0
    from ai_edge_litert.interpreter import Interpreter

    detail = Interpreter(model_path=str(tmp_path / "again.tflite")).get_input_details()[0]
    assert list(detail["shape_signature"])[0] == 1


def test_bench_hands_its_options_to_the_benchmark_runner(capfd):
    from dkdp_keras.cli import main

    assert main(["bench", "--systems", "nope"]) == 2
    assert "invalid choice: 'nope'" in capfd.readouterr().err
    assert main(["bench", "--help"]) == 0
    assert "PROTOCOL.md" in capfd.readouterr().out


def _outcome(out):
    """What a finished run reports, timings aside."""
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [{k: v for k, v in row.items() if k != "latency_ms"} for row in metrics["models"]]
    return metrics["history"], rows, metrics["tau_events"]


@pytest.mark.slow
def test_a_run_with_dropout_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """reference_cnn has Dropout(0.3): a resumed run drew other dropout masks
    (Keras saves no seed generator) and ended with other masks and
    accuracies; a run interrupted during its export resumed to a teacher
    without its best-epoch restore and averaging."""
    import dkdp_keras as dkdp

    data = _digits_npz(tmp_path / "digits.npz", train=320)
    argv = ["run", "--dataset", data, "--epochs", "4", "--batch-size", "32",
            "--no-dense", "--quantize", "none"]
    straight = tmp_path / "straight"
    assert cli.main(argv + ["--out", str(straight)]) == 0
    expected = _outcome(straight)
    assert expected[2], "the run should have pruned"

    original = keras.callbacks.BackupAndRestore.on_epoch_begin

    def ctrl_c_at_epoch_2(self, epoch, logs=None):
        if epoch == 2 and not getattr(ctrl_c_at_epoch_2, "done", False):
            ctrl_c_at_epoch_2.done = True
            raise KeyboardInterrupt
        return original(self, epoch, logs)

    export = dkdp.export_tflite

    def ctrl_c_in_export(*args, **kwargs):
        if not getattr(ctrl_c_in_export, "done", False):
            ctrl_c_in_export.done = True
            raise KeyboardInterrupt
        return export(*args, **kwargs)

    for name, target, patch in [
            ("epoch", (keras.callbacks.BackupAndRestore, "on_epoch_begin"), ctrl_c_at_epoch_2),
            ("export", (dkdp, "export_tflite"), ctrl_c_in_export)]:
        out = tmp_path / name
        with monkeypatch.context() as m:
            m.setattr(*target, patch)
            assert cli.main(argv + ["--out", str(out)]) == 130
        assert not (out / "metrics.json").exists()
        assert cli.main(["run", "--resume", str(out)]) == 0
        history, rows, events = _outcome(out)
        assert events == expected[2], name
        for key, values in expected[0].items():
            np.testing.assert_allclose(history[key], values, rtol=0, atol=1e-5,
                                       err_msg=f"{name}: {key}")
        # The files' bytes differ by the layer names in them (numbered per
        # process: 'dense' against 'dense_12'), nothing else.
        want = [dict(r) for r in expected[1]]
        size = lambda rows: [r.pop("tflite_bytes") for r in rows]  # noqa: E731
        for a, b in zip(size(rows), size(want)):
            assert a == pytest.approx(b, rel=0.01), name
        assert rows == want, name


def test_a_byte_budget_counts_the_bytes_of_the_files_quantize_writes(tmp_path):
    # --max-bytes with int8 files: one byte a weight (it counted four until
    # 2026-12-06), widths in steps of one unit and no zero channels, so the
    # compacted teacher fills the budget and holds nothing it did not count.
    import dkdp_keras
    from dkdp_keras import pipeline

    data = _digits_npz(tmp_path / "digits.npz")
    metrics = pipeline.run(dataset=str(data), model="lenet_300_100", out=str(tmp_path / "run"),
                           max_bytes=6000, quantize="int8", epochs=3, no_dense=True)
    teacher = metrics["models"][0]
    assert teacher["model"] == "pruned teacher (compacted)"
    assert 0.9 * 6000 <= teacher["params"] <= 6000, teacher["params"]
    small = keras.saving.load_model(tmp_path / "run" / "teacher_compact.keras")
    assert dkdp_keras.count_params(small, nonzero=True) == small.count_params()
