"""The package's import graph, read statically (ast, nothing imported): no import cycle inside
`fastfill_udfs` (imports inside functions count: a lazy import that closes a cycle still ties
the two modules together), and no private name (`_x`) of one module imported by another, in
the package or in the pipelines, notebooks, bench and scripts that call it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "fastfill_udfs"
CALLERS = ("pipelines", "notebooks", "bench", "scripts")


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path = ROOT) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (never run, so never a cycle)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imports(path: Path, module: str, modules: dict[str, Path]):
    """(imported module, imported name or None, the name it is bound to, line) for every
    import of a package module in the file at `path` (named `module`; "" outside the
    package), at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_only(tree)
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield alias.name, None, alias.asname, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                bound = alias.asname or alias.name
                if f"{target}.{alias.name}" in modules:    # a submodule: `from pkg import mod`
                    yield f"{target}.{alias.name}", None, bound, node.lineno
                else:
                    yield target, alias.name, bound, node.lineno


def _import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, _, _, _ in _imports(path, module, modules):
            if target in modules and target != module:
                graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
    return found


def _private_imports(path: Path, module: str, modules: dict[str, Path]) -> list[str]:
    """`_name`s of other package modules that the file imports, or reads as `mod._name` from a
    package module it imported under a name."""
    found = []
    aliases: dict[str, str] = {}                   # local name -> the package module it names
    for target, name, bound, line in _imports(path, module, modules):
        if name is None:
            if bound and target in modules:
                aliases[bound] = target
        elif target != module and name.startswith("_") and not name.startswith("__"):
            found.append(f"{path.name}:{line} imports {target}.{name}")
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and aliases[node.value.id] != module
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path.name}:{node.lineno} reads "
                         f"{aliases[node.value.id]}.{node.attr}")
    return found


def test_the_checks_see_cycles_and_private_imports(tmp_path):
    """The two checks below on a made-up package: they find what they are meant to find."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from fastfill_udfs.b import f\n_helper = 1\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a._helper\n")
    (pkg / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\n"
                                      "from ..a import _helper\n"
                                      "if TYPE_CHECKING:\n    from fastfill_udfs.sub import d\n")
    (pkg / "sub" / "d.py").write_text("from fastfill_udfs.sub.c import x\n")
    modules = _modules(tmp_path)
    assert _cycles(_import_graph(modules)) == [["fastfill_udfs.a", "fastfill_udfs.b"]]
    private = [p for m, path in modules.items() for p in _private_imports(path, m, modules)]
    assert sorted(p.split(" ", 1)[1] for p in private) == [
        "imports fastfill_udfs.a._helper", "reads fastfill_udfs.a._helper"]


def test_no_import_cycle_inside_the_package():
    cycles = _cycles(_import_graph(_modules()))
    assert not cycles, ("modules that import each other (directly or round a loop; lazy "
                        f"imports count): {cycles}")


@pytest.mark.parametrize("where", [PACKAGE, *CALLERS])
def test_no_private_name_imported_across_modules(where):
    modules = _modules()
    files = sorted((ROOT / where).rglob("*.py"))
    assert files, f"no Python files under {where}/"
    found = []
    for path in files:
        module = _module_name(path) if where == PACKAGE else ""
        found += _private_imports(path, module, modules)
    assert not found, ("private names used outside their module (make them public where they "
                       "belong, and import them from there):\n" + "\n".join(found))
