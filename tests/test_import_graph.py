"""The package's import graph runs one way: no cycle between modules, and no import from a
lower layer of a higher one. Every import counts, function-level (deferred) ones included.

Layers, lowest first (a package may import only from packages strictly below it, and from its
own modules without a cycle): utils < data < reference < ops < {losses, models} < config <
methods < eval < viz < train < cli. ``dino_fast/__init__.py`` names its public API as strings
(lazy, PEP 562) and imports nothing.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dino_fast"
RANK = {"utils": 0, "data": 1, "reference": 2, "ops": 3, "losses": 4, "models": 4, "config": 5,
        "methods": 6, "eval": 7, "viz": 8, "train": 9, "cli": 10, "__main__": 11}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """dino_fast modules imported anywhere in ``path`` (relative imports resolved)."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "dino_fast")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "dino_fast":
                continue
            # `from dino_fast.x import y` may import the submodule dino_fast.x.y
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if (PKG.parent / Path(*sub.split("."))).with_suffix(".py").exists()
                        or (PKG.parent / Path(*sub.split(".")) / "__init__.py").exists() else target)
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_has_a_layer() -> None:
    missing = sorted({_layer(m) for m in _graph()} - set(RANK) - {""})
    assert not missing, f"packages without a layer in RANK: {missing}"


def test_no_upward_import() -> None:
    bad = []
    for mod, deps in _graph().items():
        if mod == "dino_fast":
            assert not deps, f"dino_fast/__init__.py must import nothing from the package, imports {deps}"
            continue
        for dep in deps:
            a, b = _layer(mod), _layer(dep)
            if dep == "dino_fast" or (a != b and RANK[b] >= RANK[a]):
                bad.append(f"{mod} ({a}) -> {dep} ({b or 'dino_fast'})")
    assert not bad, "imports that go up or sideways:\n" + "\n".join(sorted(bad))


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    # an import of a package also runs its __init__: model that edge too
    color: dict[str, int] = {}
    stack: list[str] = []

    def deps(m: str) -> set[str]:
        out = set(d for d in graph.get(m, ()) if d in graph)
        return out

    def visit(m: str) -> list[str] | None:
        color[m] = 1
        stack.append(m)
        for d in sorted(deps(m)):
            if color.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in color:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        color[m] = 2
        return None

    for m in sorted(graph):
        if m not in color:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle() -> None:
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_checker_sees_cycles_and_upward_imports() -> None:
    """The checks above can fail: a made-up graph with a cycle is caught."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    assert RANK["train"] > RANK["methods"] > RANK["losses"] > RANK["ops"] > RANK["utils"]


@pytest.mark.parametrize("mod", ["dino_fast.ops.soft_ce.function", "dino_fast.data.loader",
                                 "dino_fast.eval.knn", "dino_fast.train.loop"])
def test_imports_are_resolved(mod: str) -> None:
    """The parser resolves relative and `from package import submodule` imports."""
    graph = _graph()
    assert mod in graph and graph[mod], graph.get(mod)
