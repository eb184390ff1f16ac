"""The package's import graph has no circle, and its layers import only downwards.

The layers, lowest first: ``method`` (the method, plain PyTorch) → ``distill`` (taps, heads, distances, the
distiller) → ``data`` / ``models`` (data modules, the model zoo; independent of each other) → ``tasks`` (the
LightningModules) → the entry points (``train``, ``evaluate``, ``export``, the benchmarks, the demos, the config
layer ``utils.instantiate``, ...). ``utils`` and ``optim`` are helpers every layer may use; they import no layer. Imports anywhere in a file count (inside functions too: a lazy import is still
a dependency), and importing ``a.b.c`` counts as importing the packages ``a.b`` and ``a`` (their ``__init__`` runs
first), except the importing module's own ancestors.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import diffkd

PACKAGE = Path(diffkd.__file__).resolve().parent
ROOT = "diffkd"

# the layer of each part of the package (the longest matching prefix wins); a module may import its own part and the
# parts of lower layers. Layer 0 holds the helpers every layer may use (they import no layer); anything unnamed is an
# entry point (5: the command-line tools, the training loop, callbacks, benchmarks, demos), and entry points import
# each other freely.
LAYERS = {
    "diffkd.utils": 0,
    "diffkd.optim": 0,
    "diffkd.utils.instantiate": 5,  # the config layer: Hydra configs → the objects of every layer
    "diffkd.method": 1,
    "diffkd.distill": 2,
    "diffkd.data": 3,
    "diffkd.models": 3,
    "diffkd.tasks": 4,
}
ENTRY_POINT = 5


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@cache
def import_graph() -> dict[str, set[str]]:
    """``{module: modules it imports}`` over ``src/diffkd`` (each target with its parent packages, minus the
    importer's own ancestors and itself)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if _is_package(path) else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    module = ".".join([*base, node.module] if node.module else base)
                else:
                    module = node.module or ""
                targets.add(module)
                targets.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
        own = {name, *_ancestors(name)}
        edges = set()
        for target in targets:
            if target.split(".")[0] != ROOT:
                continue
            for candidate in (target, *_ancestors(target)):
                if candidate in files and candidate not in own:
                    edges.add(candidate)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def layer(module: str) -> tuple[str, int]:
    """``(part, layer)`` of a module: the longest prefix of :data:`LAYERS` it falls under (``"entry point"``, 5
    when none)."""
    matches = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    if not matches:
        return "entry point", ENTRY_POINT
    part = max(matches, key=len)
    return part, LAYERS[part]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``importer → imported`` for every import of a higher layer, or of another part of the same layer (``data``
    and ``models`` are independent), or of any layer by a helper."""
    bad = []
    for importer, targets in sorted(graph.items()):
        if importer == ROOT:
            continue  # the package root re-exports the method (and names the zoo lazily)
        part, level = layer(importer)
        for target in sorted(targets):
            target_part, target_level = layer(target)
            if target == ROOT or target_part == part:
                continue
            sideways = target_level == level and level not in (0, ENTRY_POINT)
            if target_level > level or sideways or (level == 0 and target_level != 0):
                bad.append(f"{importer} ({part}) → {target} ({target_part})")
    return bad


def test_the_graph_sees_imports_inside_functions_and_parent_packages():
    graph = import_graph()
    assert (
        "diffkd.method.head" in graph["diffkd.distill.builtins"] or "diffkd.method" in graph["diffkd.distill.builtins"]
    )
    # `from diffkd.distill import Distiller` in tasks/base.py: the package and nothing of its own ancestors
    assert "diffkd.distill" in graph["diffkd.tasks.base"] and "diffkd.tasks" not in graph["diffkd.tasks.base"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert upward_imports({"diffkd.method.x": {"diffkd.tasks.base"}, "diffkd.train": {"diffkd.tasks.base"}}) == [
        "diffkd.method.x (diffkd.method) → diffkd.tasks.base (diffkd.tasks)"
    ]
    assert upward_imports({"diffkd.data.x": {"diffkd.models.y"}, "diffkd.utils.x": {"diffkd.method"}}) == [
        "diffkd.data.x (diffkd.data) → diffkd.models.y (diffkd.models)",
        "diffkd.utils.x (diffkd.utils) → diffkd.method (diffkd.method)",
    ]


def test_no_import_circle():
    found = circles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" ↔ ".join(c) for c in found)


def test_layers_import_only_downwards():
    bad = upward_imports(import_graph())
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)


def _eager_imports(path: Path) -> set[str]:
    """Modules a file imports when it is imported: statements outside functions and classes (any ``if``/``try``),
    relative imports resolved, ``from a import b`` as ``a`` and ``a.b``."""
    name = _module_name(path)
    package = name if _is_package(path) else name.rpartition(".")[0]
    found: set[str] = set()

    def walk(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join([*base, node.module] if node.module else base)
                else:
                    module = node.module or ""
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)
            elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    walk(getattr(node, field, []) or [])

    walk(ast.parse(path.read_text()).body)
    return found


def test_import_diffkd_stays_light():
    """``import diffkd`` loads the method (and the config resolvers), not the zoo, the trainer, the data layer or
    the config engine: ``diffkd.create_model`` imports the zoo on first use."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    loaded, todo, external = set(), [ROOT], set()
    while todo:
        module = todo.pop()
        if module in loaded or module not in files:
            continue
        loaded.add(module)
        for target in _eager_imports(files[module]):
            if target.split(".")[0] != ROOT:
                external.add(target.split(".")[0])
            todo.extend(c for c in (target, *_ancestors(target)) if c in files)
    assert "diffkd.method.head" in loaded  # the walk sees the method
    heavy = sorted(external & {"lightning", "torchvision", "timm", "hydra", "torchmetrics"})
    layers = sorted(m for m in loaded - {ROOT} if layer(m)[1] > LAYERS["diffkd.method"])
    assert not heavy and not layers, f"import diffkd imports {heavy + layers}"
