"""No import cycle inside the fastratio package (issue 28 item 8).

The graph is built statically: every module of the package (``fastratio/`` and ``kernels/``, which ships
as ``fastratio.kernels``) is parsed with ``ast``, and every import in it counts, at module level or inside
a function, relative or absolute. ``from pkg import name`` is an edge to the submodule ``pkg.name`` when
there is one, else to ``pkg``. A cycle fails the test, each one named module by module.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"fastratio": ROOT / "fastratio", "fastratio.kernels": ROOT / "kernels"}  # pyproject's package-dir


def package_modules() -> dict[str, Path]:
    """Module name -> file, for every .py of the package (a package is its __init__.py)."""
    modules = {}
    for prefix, folder in PACKAGE_DIRS.items():
        for file in folder.rglob("*.py"):
            parts = file.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((prefix, *parts))] = file
    return modules


def imported(name: str, file: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` (at ``file``) imports anywhere in its body."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import fastratio.a.b as x` names a module; attributes are dropped
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported(name, file, modules) for name, file in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, first repeated last) per strongly connected component of more
    than one module (Tarjan's algorithm), found by a walk inside the component."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    found = []
    for component in components:
        start = min(component)
        path, seen = [start], {start: 0}
        while True:  # every module of a component has a successor inside it; walk until one repeats
            nxt = min(w for w in graph[path[-1]] if w in component)
            if nxt in seen:
                found.append([*path[seen[nxt]:], nxt])
                break
            seen[nxt] = len(path)
            path.append(nxt)
    return found


def test_the_checker_finds_cycles_and_resolves_relative_imports(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert sorted(cycles(graph)) == [["a", "b", "c", "a"], ["e", "e2", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    for rel in ("__init__.py", "x.py", "sub/__init__.py", "sub/y.py"):
        (pkg / rel).write_text("")
    code = "from .. import x\nfrom ..sub import y\nimport os\n\ndef f():\n    from pkg.x import thing\n"
    modules = {"pkg": pkg / "__init__.py", "pkg.x": pkg / "x.py", "pkg.sub": pkg / "sub/__init__.py", "pkg.sub.y": pkg / "sub/y.py"}
    (pkg / "sub/z.py").write_text(code)
    assert imported("pkg.sub.z", pkg / "sub/z.py", {**modules, "pkg.sub.z": pkg / "sub/z.py"}) == {"pkg.x", "pkg.sub.y"}


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"fastratio.train", "fastratio.sample", "fastratio.evaluate", "fastratio.tasks.image", "fastratio.kernels"} <= set(graph)
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)
