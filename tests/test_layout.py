"""The package's shape: imports point one way (no circles between sae_fast modules, lazy imports
included), and no module grows past what a reader can hold."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed layout: sae_fast/ plus the top-level kernels/ folder as sae_fast.kernels.
SOURCES = {"sae_fast": ROOT / "sae_fast", "sae_fast.kernels": ROOT / "kernels"}
EXTENSIONS = {"sae_fast._C"}  # compiled by setup.py: `from .. import _C` names a module, not the package
MAX_LINES = 460


def package_modules() -> dict[str, Path]:
    """Module name -> file, for every .py file of the installed package."""
    modules = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules that ``module`` names in any import statement, at any depth (a lazy import inside
    a function closes a circle just as well; it only hides it). Importing ``a.b`` also runs ``a``'s
    __init__, but every module does that, so only the named module counts."""
    out = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            # `from pkg import sub` names the submodule when there is one, else an attribute of pkg.
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known.keys() | EXTENSIONS else target
                     for a in node.names]
        else:
            continue
        out.update(name for name in names if name in known and name != module)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of module names (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def import_graph() -> dict[str, set[str]]:
    known = package_modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_cycle_finder_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    # The checker itself must be able to fail: a circle closed by a lazy relative import inside a function.
    pkg = tmp_path / "sae_fast"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from .sub.b import thing\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def thing():\n    from .. import a\n    return a\n")
    monkeypatch.setattr(f"{__name__}.SOURCES", {"sae_fast": pkg})
    cycle = find_cycle(import_graph())
    assert cycle is not None and set(cycle) == {"sae_fast.a", "sae_fast.sub.b"}
    (pkg / "sub" / "b.py").write_text("def thing():\n    return 1\n")
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize("name", sorted(package_modules()))
def test_module_size(name):
    lines = package_modules()[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by concern (limit {MAX_LINES})"
