"""The package's modules import each other without cycles: every import counts, the ones inside
functions and ``importlib.import_module`` with a literal name included, so that a module never
reaches up to one that imports it. The package root's lazy table of public names (a dict of
strings in ``__init__``) is the facade for users, not an import of the modules it names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "l2l_optim"
SRC = Path(__file__).resolve().parents[1] / "src"

# (importer, imported): imports that still close a cycle (none)
KNOWN: set[tuple[str, str]] = set()


def _modules(src: Path = SRC, package: str = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, whether it is a package's __init__)."""
    found = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _absolute(name: str, level: int, base: str) -> str:
    """A relative import's target, resolved from the package ``base``."""
    for _ in range(level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{name}" if name else base


def _imported_names(tree: ast.AST, base: str) -> set[str]:
    """Every dotted name the code imports, as far as the names are literal."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node.module or "", node.level, base) if node.level else node.module
            # `from package import name`: name may be a module of the package
            names.update(f"{module}.{a.name}" for a in node.names)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"):
            target = node.args[0].value
            level = len(target) - len(target.lstrip("."))
            names.add(_absolute(target.lstrip("."), level, base) if level else target)
    return names


def import_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a name resolves to its longest module)."""
    modules = _modules(src, package)

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, (path, is_package) in modules.items():
        base = module if is_package else module.rpartition(".")[0]
        targets = {owner(n) for n in _imported_names(ast.parse(path.read_text()), base)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each a cycle or several)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graph is a few dozen modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_function_local_and_importlib_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("import importlib\nX = importlib.import_module('..c', __package__)\n")
    (pkg / "c.py").write_text("from pkg import a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert graph["pkg.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    (pkg / "c.py").write_text("from . import sub\n")
    assert cycles(import_graph(tmp_path, "pkg")) == []


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert "l2l_optim.optimizer" in graph and "l2l_optim.kernels.cpu" in graph
    for importer, imported in KNOWN:
        assert imported in graph[importer], f"{importer} no longer imports {imported}: drop it from KNOWN"
        graph[importer].discard(imported)
    assert cycles(graph) == []


def private_imports(src: Path = SRC, package: str = PACKAGE) -> list[str]:
    """``module: name`` for every underscore name a module imports from another module of the
    package. Private submodules (``kernels._common``) and their contents are their package's
    own business, dunder names (``__version__``) are public, and so is a public name imported
    under a private alias."""
    modules = _modules(src, package)
    found = []
    for name, (path, is_package) in modules.items():
        base = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.module == "__future__":
                continue
            module = _absolute(node.module or "", node.level, base) if node.level else node.module
            if not module or not module.startswith(package) or module.rpartition(".")[2].startswith("_"):
                continue
            for a in node.names:
                private = a.name.startswith("_") and not a.name.endswith("__")
                if private and f"{module}.{a.name}" not in modules:
                    found.append(f"{name}: {module}.{a.name}")
    return found


def test_no_module_imports_another_modules_private_names():
    assert private_imports() == []


def test_private_imports_are_found(tmp_path):
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def _helper():\n    pass\n")
    (pkg / "b.py").write_text("from .a import _helper\nfrom . import a as _a\n")
    assert private_imports(tmp_path) == [f"{PACKAGE}.b: {PACKAGE}.a._helper"]
