"""The tutorial notebooks: each runs end to end in its quick mode, and the
committed files are what tutorials/_build.py makes from their .py sources,
executed without error.

Running them takes a minute or two each (slow: CI runs them):

    python -m pytest tests/test_tutorials.py -m slow
"""

import importlib.util
import pathlib

import pytest

from tests.test_datasets import needs_fashion

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = pathlib.Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("[0-9][0-9]_*.ipynb"))
SOURCES = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))  # one per notebook
CELL_TIMEOUT = 600  # seconds; a quick-mode cell takes well under a minute

# Files each notebook must leave in its working directory.
WRITES = {
    "01_quickstart": ["tutorial_01/fashion_cnn_int8.tflite"],
    "02_importance_and_interpretability": [
        "tutorial_02/layer_sparsity.png",
        "tutorial_02/importance_histograms.png",
    ],
    "03_budgets_and_edge_export": [
        "tutorial_03/model_none.tflite",
        "tutorial_03/model_dynamic.tflite",
        "tutorial_03/model_float16.tflite",
        "tutorial_03/model_int8.tflite",
        "tutorial_03/model_mcu.tflite",
        "tutorial_03/model_latency.tflite",
        "tutorial_03/model_data.cc",
    ],
    "04_continual_learning": [],
}


def _build_module():
    spec = importlib.util.spec_from_file_location("tutorial_build", TUTORIALS / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def test_every_notebook_is_listed():
    assert {path.stem for path in NOTEBOOKS} == set(WRITES)
    readme = (TUTORIALS.parent / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"tutorials/{path.name}" in readme, f"README does not link {path.name}"


def test_committed_notebooks_match_their_sources():
    """The .ipynb files are generated: edit tutorials/NN_*.py, then run
    tutorials/_build.py."""
    build = _build_module()
    for source in SOURCES:
        name, cells = source.stem, build.read_cells(source)
        committed = nbformat.read(TUTORIALS / f"{name}.ipynb", as_version=4)
        assert [c.source for c in committed.cells] == [c.source for c in cells], (
            f"{name}.ipynb differs from tutorials/{name}.py: run "
            "`python tutorials/_build.py --execute " + name[:2] + "`"
        )


def test_committed_notebooks_are_what_the_build_writes(capsys):
    """Each .ipynb has its .py and is byte for byte what a rebuild writes:
    cells, ids, metadata and the outputs kept from the last execution."""
    assert [path.stem for path in SOURCES] == [path.stem for path in NOTEBOOKS]
    build = _build_module()
    assert build.main(["--check"]) == 0, capsys.readouterr().err


def test_committed_notebooks_carry_their_outputs():
    """What GitHub shows: every code cell ran, none failed, plots included."""
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        cells = _code_cells(nb)
        assert all(cell.execution_count is not None for cell in cells), path.name
        outputs = [out for cell in cells for out in cell.outputs]
        assert not [out for out in outputs if out.output_type == "error"], path.name
        assert any("image/png" in out.get("data", {}) for out in outputs), path.name
        last = "".join(out.get("text", "") for out in cells[-1].outputs)
        assert "all checks passed" in last, path.name
        assert 'quick mode: False' in "".join(
            out.get("text", "") for cell in cells for out in cell.outputs
        ), f"{path.name} was executed in quick mode"


@pytest.mark.slow
@needs_fashion
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_in_quick_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("DKDP_TUTORIAL_QUICK", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    # The last cell asserts the notebook's claims, then prints this.
    last = "".join(out.get("text", "") for out in _code_cells(nb)[-1].outputs)
    assert "all checks passed" in last
    for relative in WRITES[path.stem]:
        written = tmp_path / relative
        assert written.is_file() and written.stat().st_size > 0, relative
        if written.suffix == ".tflite":
            assert written.read_bytes()[4:8] == b"TFL3", f"{relative} is not a TFLite file"
