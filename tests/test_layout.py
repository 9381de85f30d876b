"""The library's layout rules, read from the source with `ast` (nothing is imported):

- no import circle among the modules of t5x_like/ and data_pipelines/: every import counts,
  at module level or inside a function, as an edge of one directed graph;
- no module uses another module's private names: `from x import _y`, nor `x._y` on a module
  imported as `x`;
- no library module imports configs/: recipes build on the library, never the reverse;
- no benchmark edits sys.path: each runs as `python -m benchmarks.<name>` from the root.
"""

import ast
import os

from conftest import ROOT

PACKAGES = ("t5x_like", "data_pipelines")


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the library."""
    out = {}
    for package in PACKAGES:
        for folder, _, names in os.walk(os.path.join(ROOT, package)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    out[dotted.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(module: str, path: str):
    """(line, module imported, name taken from it or None, alias bound) for every import
    statement of `module`, wherever it stands."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, None, a.asname or a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                parts = module.split(".")[:len(module.split(".")) - node.level
                                            + path.endswith("__init__.py")]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                yield node.lineno, base, a.name, a.asname or a.name


def _target(base: str, name: str | None) -> str | None:
    """The library module an import reads: `from a.b import c` is a.b.c when that is a
    module, else a.b."""
    if name and f"{base}.{name}" in MODULES:
        return f"{base}.{name}"
    return base if base in MODULES else None


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported library module: line of the first such import}."""
    graph = {}
    for module, path in MODULES.items():
        edges = graph.setdefault(module, {})
        for line, base, name, _ in _imports(module, path):
            target = _target(base, name)
            if target and target != module:
                edges.setdefault(target, line)
    return graph


def _circles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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


def test_no_import_circle():
    graph = _graph()
    circles = _circles(graph)
    described = [" ".join(f"{a} -> {b} (line {graph[a][b]});" for a in c for b in graph[a]
                          if b in c) for c in circles]
    assert not circles, "import circles:\n" + "\n".join(described)


def test_the_circle_check_finds_a_circle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert _circles(graph) == [["a", "b", "c"]]
    assert _circles({"a": {"b": 1}, "b": {}}) == []


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _library_aliases(module: str, path: str) -> dict[str, str]:
    """Local name -> the library module it is bound to by an import of `module`."""
    aliases = {}
    for _, base, name, alias in _imports(module, path):
        target = _target(base, name)
        if target and target != module and target == (f"{base}.{name}" if name else base):
            aliases[alias] = target
    return aliases


def test_no_module_imports_another_modules_private_names():
    found = [f"{path}:{line}: from {base} import {name}" for module, path in MODULES.items()
             for line, base, name, _ in _imports(module, path)
             if name and _private(name) and base in MODULES and base != module]
    assert not found, "private names imported across modules:\n" + "\n".join(sorted(found))


def test_no_module_reads_another_modules_private_names():
    """`decoding._Row` where `decoding` is another library module: the same reach into its
    private parts as importing the name."""
    found = []
    for module, path in MODULES.items():
        aliases = _library_aliases(module, path)
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr)):
                found.append((path, node.lineno, f"{node.value.id}.{node.attr} "
                                                 f"({aliases[node.value.id]})"))
    assert not found, "private names read across modules:\n" + "\n".join(
        f"{p}:{line}: {what}" for p, line, what in sorted(set(found)))


def test_the_library_never_imports_configs():
    found = [f"{path}:{line}: {base}" for module, path in MODULES.items()
             for line, base, name, _ in _imports(module, path)
             if base.split(".")[0] == "configs"]
    assert not found, "library modules importing configs/:\n" + "\n".join(found)


def test_benchmarks_run_as_modules_without_editing_sys_path():
    """`python -m benchmarks.<name>` from the repository root finds the project by itself."""
    found = []
    folder = os.path.join(ROOT, "benchmarks")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        path = os.path.join(folder, name)
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        found += [f"{path}:{node.lineno}" for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and ast.unparse(node.func.value) == "sys.path"]
    assert not found, "benchmarks editing sys.path:\n" + "\n".join(found)
