"""The package's import graph: no cycles (function-level imports included), and kernels never
import the dispatch layer (mlaan_fast.triton imports nothing from mlaan_fast.ops)."""
import ast
import pathlib

import mlaan_fast

ROOT = pathlib.Path(mlaan_fast.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The mlaan_fast modules that `name` imports anywhere in its file. `from a import b` counts as
    importing a.b when that is a module, else a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    graph = _graph()
    assert "mlaan_fast.ops.aux_head" in graph and "mlaan_fast.triton.aux_head" in graph
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kernels_do_not_import_the_dispatch_layer():
    graph = _graph()
    bad = {m: sorted(i for i in imports if i.startswith("mlaan_fast.ops"))
           for m, imports in graph.items() if m.startswith("mlaan_fast.triton")}
    assert not any(bad.values()), bad


def test_the_scan_sees_function_level_imports():
    graph = _graph()
    assert "mlaan_fast.triton.aux_head" in graph["mlaan_fast.ops.aux_head"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
