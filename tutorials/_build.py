"""Build the tutorial notebooks, each `NN_name.ipynb` from its `NN_name.py`.

    python tutorials/_build.py               # rebuild every notebook, keep outputs
    python tutorials/_build.py --execute 02  # also run the named ones in full mode
                                             # (minutes each on a CPU), for GitHub
    python tutorials/_build.py --check       # exit 1 if a notebook is out of date

A source is a Jupytext percent-format script: `# %%` starts a code cell,
`# %% [markdown]` a Markdown cell whose lines are commented with `# `. Edit
the .py, never the .ipynb. A code cell keeps its outputs while its source is
unchanged; cell ids are hashes of the cells, so a rebuild rewrites only the
cells that changed. Notebooks execute in a temporary directory, so the files
they write (.tflite, plots) do not land in the repository.
"""

import argparse
import hashlib
import pathlib
import re
import sys
import tempfile

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent
MARKER = re.compile(r"# %%(?: \[(markdown)\])?$")
METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
    "colab": {"provenance": []},
}
#: Lines that TensorFlow's C++ side writes to stderr whatever Python asks;
#: they are dropped from the committed outputs.
NOISE = ("WARNING: All log messages before absl", "I0000 ", "E0000 ", "W0000 ",
         "fully_quantize:", "INFO: Created TensorFlow Lite", "To enable the following")


def read_cells(path):
    """The cells of the percent-format script at `path`."""
    cells, kind, lines = [], None, []

    def close():
        if kind is not None:
            source = "\n".join(lines).strip("\n")
            cells.append(new_markdown_cell(source) if kind == "markdown"
                         else new_code_cell(source))

    text = pathlib.Path(path).read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(text, start=1):
        where = f"{path}:{number}"
        if line.startswith("# %%"):
            if not (match := MARKER.match(line)):
                raise ValueError(f"{where}: not a cell marker (cell metadata unsupported)")
            close()
            kind, lines = match.group(1) or "code", []
        elif kind is None and line.strip():
            raise ValueError(f"{where}: text before the first `# %%`")
        elif kind == "markdown":
            if line not in ("", "#") and not line.startswith("# "):
                raise ValueError(f"{where}: Markdown line not commented with '# '")
            lines.append(line[2:])
        else:
            lines.append(line)
    close()
    seen = {}
    for cell in cells:  # an id derived from the cell changes only with the cell
        key = f"{cell.cell_type}\n{cell.source}"
        seen[key] = seen.get(key, 0) + 1
        cell.id = hashlib.sha1(f"{key}\n{seen[key]}".encode()).hexdigest()[:8]
    return cells


def build(path, old=None):
    """The notebook of the source at `path`, with the outputs and the
    language_info of `old` (the notebook as last written) where unchanged."""
    nb = new_notebook(cells=read_cells(path), metadata=nbformat.from_dict(METADATA))
    if old and "language_info" in old.metadata:  # as the last execution wrote it
        nb.metadata.language_info = old.metadata.language_info
    done = {}
    for cell in old.cells if old else []:
        if cell.cell_type == "code":
            done.setdefault(cell.source, []).append(cell)
    for cell in nb.cells:
        if cell.cell_type == "code" and done.get(cell.source):
            previous = done[cell.source].pop(0)
            cell.outputs, cell.execution_count = previous.outputs, previous.execution_count
    return nb


def _quiet(nb):
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                lines = [line for line in out["text"].splitlines(keepends=True)
                         if line.strip() and not line.startswith(NOISE)]
                if not lines:
                    continue
                out["text"] = "".join(lines)
            outputs.append(out)
        cell["outputs"] = outputs
    return nb


def execute(nb, name):
    from nbclient import NotebookClient

    with tempfile.TemporaryDirectory(prefix=f"dkdp_{name}_") as tmp:
        NotebookClient(nb, timeout=1800, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": tmp}}).execute()
    return _quiet(nb)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--execute", action="store_true",
                      help="run each notebook in full mode and keep its outputs")
    mode.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 if a notebook differs from its build")
    parser.add_argument("only", nargs="*", help="notebook name prefixes (default: all)")
    args = parser.parse_args(argv)
    stale = []
    for source in sorted(HERE.glob("[0-9][0-9]_*.py")):
        if args.only and not any(source.stem.startswith(p) for p in args.only):
            continue
        path = source.with_suffix(".ipynb")
        nb = build(source, nbformat.read(path, as_version=4) if path.exists() else None)
        if args.execute:
            print(f"executing {source.stem} ...", flush=True)
            nb = execute(nb, source.stem)
        nbformat.validate(nb)
        text = nbformat.writes(nb) + "\n"
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
            continue
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(HERE.parent)}", flush=True)
    if stale:
        print("out of date (run python tutorials/_build.py):", *stale, file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
