"""The package's import graph: every import (module level or inside a function) points down the layers, and
no module imports itself back through others (no cycles). Read from the source with ast: nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import apet_export

PACKAGE = Path(apet_export.__file__).parent

# Bottom first. A module may import its own layer's modules and any lower layer's, never a higher one.
LAYERS = (
    ("__init__", "errors", "compat", "config", "paths", "outputs"),  # facts and helpers every layer uses
    ("compression",),  # ApET and the baselines, budgets: tensors and numbers, no model families
    ("plugins", "artifacts", "checkpoint"),  # the ApetScore op for ONNX / TensorRT / Triton; file checks
    ("manifest",),  # what a build holds
    ("models",),  # the model families: each one's contract
    ("export",),  # build: ONNX graphs, engines
    ("runtime",),  # backends and the pipeline
    ("calibration",),  # quantised builds (runs the source build's pipeline)
    ("parity", "visualize", "inspect"),  # checks and views of a build
    ("bench", "serve"),  # measurements and serving
    ("cli",),  # the command line: everything
)
LAYER_OF = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = ["apet_export", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports}, every import statement of its source."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package upwards
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            targets.update(c for c in candidates if c in modules and c != name)
        graph[name] = targets
    return graph


def layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    assert part in LAYER_OF, f"{module}: add its package {part!r} to LAYERS in {__file__}"
    return LAYER_OF[part]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_imports_point_down_the_layers():
    graph = import_graph()
    assert "apet_export.compression.budget" in graph and "apet_export.models.base" in graph  # the walk found them
    upward = [
        f"{module} -> {target}"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer(target) > layer(module)
    ]
    assert upward == [], "imports that run back up the layers:\n" + "\n".join(upward)


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checks_can_fail():
    """The same checks on small made-up graphs: an upward import and a cycle are found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("apet_export.compression.apet") < layer("apet_export.models.base")
