"""The dkdp command: bad input in one line with status 2; an interrupted
tiny run resumed to its end; a quick real run."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from dkdp_keras import cli
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


def test_pipeline_order_depends_on_seed_and_epoch_only():
    x = np.arange(10, dtype="float32")[:, None]
    y = np.arange(10)

    def batches(start, epochs):
        ds = cli._pipeline(x, y, batch=4, seed=3, start=start, epochs=epochs)
        return [b[1].numpy().tolist() for b in ds.take(3 * (epochs - start))]

    whole, resumed = batches(0, 3), batches(1, 3)
    assert resumed == whole[3:]  # epoch 2 and 3 as in the uninterrupted run
    assert sorted(sum(whole[:3], [])) == list(range(10))  # each epoch: every example once
    assert whole[:3] != whole[3:6]  # a new order every epoch


def test_default_batch_size_gives_enough_steps():
    assert cli._default_batch_size(55_000) == 128
    assert cli._default_batch_size(1_295) == 32  # digits: 41 steps an epoch
    assert cli._default_batch_size(100) == 8


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
