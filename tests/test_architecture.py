"""The library's shape (docs/ARCHITECTURE.md): every module has its place
in one order of layers, imports only what lies below it (function-level
imports included), and none is over 500 lines or has a class over 400."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dkdp_keras"

#: Bottom first. A module may import the modules of earlier entries only;
#: modules in one entry import none of each other.
LAYERS = [
    ("_version", "_validation", "guard", "thresholds.ordering", "sparse_format", "litert"),
    ("layers.base",),
    ("layers.batch_normalization", "layers.conv", "layers.dense", "layers.depthwise_conv"),
    ("layers",),
    ("graph",),
    ("state", "prunable"),
    ("depgraph",),
    ("counting", "narrowing"),
    ("compaction",),
    ("latency",),
    ("budget",),
    ("regrowth",),
    ("importance.base",),
    ("importance.criteria",),
    ("importance.registry",),
    ("importance",),
    ("thresholds.mechanism", "thresholds.schedules"),
    ("thresholds.adaptive", "grouping"),
    ("thresholds",),
    ("pruner", "distillation", "zoo", "datasets", "_data_checks", "distribute", "training"),
    ("continual",),
    ("step",),
    ("model",),
    ("refinement", "report", "export", "_checks"),
    ("callbacks",),
    ("",),  # the package: its public names
    ("_inputs",),
    ("pipeline",),
    ("cli",),
]
RANK = {name: i for i, entry in enumerate(LAYERS) for name in entry}


def module_name(path):
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name):
    """The library modules `name` imports, anywhere in its file (`from
    dkdp_keras.x import y` imports the module x.y if there is one, else x)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}"[len("dkdp_keras."):]
                       in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            if target == "dkdp_keras":
                found.add("")
            elif target.startswith("dkdp_keras."):
                found.add(target[len("dkdp_keras."):])
    found.discard(name)
    return found


def test_every_module_has_a_place_in_the_layers():
    missing = sorted(set(MODULES) - set(RANK))
    assert not missing, f"modules with no place in LAYERS: {missing}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_only_what_lies_below_it(name):
    upward = sorted(t for t in imports(name) if RANK[t] >= RANK[name])
    assert not upward, f"dkdp_keras.{name or '__init__'} imports {upward}, not below it"


def test_no_import_cycle():
    graph = {name: imports(name) for name in MODULES}
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", " -> ".join(path + [node])
        state[node] = "open"
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        state[node] = "done"

    for name in graph:
        visit(name, [])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_classes_are_small(name):
    text = MODULES[name].read_text()
    assert len(text.splitlines()) <= 500, f"{name}: {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= 400, f"{name}.{node.name}: {size} lines"
