"""The dkdp command: bad input in one line with status 2; a quick real run."""

import json
import subprocess
import sys

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
        (["export", "/nope/m.keras", "--out", "m.tflite"], "no model file"),
        (["inspect", "/nope/m.keras"], "no model file"),
    ],
)
def test_bad_input_is_one_line_and_status_two(argv, text, capsys, tmp_path):
    assert cli.main(argv + (["--out", str(tmp_path)] if argv[0] == "run" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert text in err and len(err.splitlines()) == 1 and "Traceback" not in err


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
                 "importance_histograms.png", "teacher.tflite", "student.tflite",
                 "teacher.export.json", "dkdp_model.keras", "teacher_compact.keras",
                 "checkpoint.keras"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    teacher = metrics["models"][0]
    assert teacher["params"] <= metrics["dense_params"] // 10 + 1000
    assert teacher["tflite_acc"] > 0.75 and teacher["agreement"] > 0.95
    assert "| pruned teacher (compacted) |" in (out / "report.md").read_text()
    assert cli.main(["inspect", str(out / "dkdp_model.keras")]) == 0
    assert cli.main(["export", str(out / "teacher_compact.keras"), "--out",
                     str(tmp_path / "again.tflite")]) == 0
