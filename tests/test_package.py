"""Packaging rules: one version source, the public Keras API only, the CLI."""

import configparser
import pathlib
import re
import subprocess
import sys

import dkdp_keras as dkdp
from dkdp_keras import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_version_has_one_source():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["metadata"]["version"] == "attr: dkdp_keras._version.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+", dkdp.__version__)
    hits = [p for p in ROOT.glob("dkdp_keras/**/*.py") if "__version__ = " in p.read_text()]
    assert [p.name for p in hits] == ["_version.py"]


def test_library_uses_public_keras_only():
    pattern = re.compile(r"^\s*(from|import)\s+(keras\.src|tf_keras|tensorflow_model_optimization)", re.M)
    offenders = [str(p) for p in ROOT.glob("dkdp_keras/**/*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme


def test_cli_help_and_version(capsys):
    assert cli.main([]) == 0
    assert "usage: dkdp" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert dkdp.__version__ in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2
    assert "'frobnicate'" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run(
        [sys.executable, "-m", "dkdp_keras.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "usage: dkdp" in out.stdout
