"""The layers of the core, checked from the code's own imports (ARCHITECTURE.md is the map).

Every ``import`` in every module counts, also those inside functions: a local import
hides a dependency from a reader, not from this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "fedtextgrad_core"

# Lower layers never import higher ones. sim/ and tools/ stand beside the stack:
# they may use it, it never uses them.
LAYERS = {"errors": 0, "text": 0, "fingerprint": 0, "data": 1, "llm": 2, "method": 3, "run": 4, "sim": 5, "tools": 6}
BESIDE = {"sim", "tools"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every fedtextgrad_core module ``path`` imports (``from x import name`` counts x, and
    x.name when that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    modules = {module_name(p) for p in CORE.rglob("*.py")}
    return {name for name in found if name in modules and name != module_name(path)}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in CORE.rglob("*.py")}


def test_every_module_is_in_a_layer():
    unknown = sorted({layer(m) for m in graph()} - set(LAYERS) - {"__init__"})
    assert not unknown, f"modules outside the known layers: {unknown} (add them to LAYERS and ARCHITECTURE.md)"


def test_no_upward_imports():
    upward = []
    for module, imported in graph().items():
        here = layer(module)
        for target in imported:
            there = layer(target)
            if there in BESIDE and here not in BESIDE:
                upward.append(f"{module} -> {target} (the stack never imports {there}/)")
            elif ((here in LAYERS and there in LAYERS and LAYERS[there] > LAYERS[here] and here not in BESIDE)
                  or (here == "sim" and there == "tools")):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that go up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_core_never_imports_flower():
    flower = [module_name(p) for p in CORE.rglob("*.py")
              if any(name == "flwr" or name.startswith("flwr.") for name in _all_imports(p))]
    assert not flower, f"the core imports Flower in {flower}"


def _all_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("bad, expected", [
    ("from fedtextgrad_core.sim.model import SimLLM\n", "never imports sim/"),
    ("def f():\n    from fedtextgrad_core.run.settings import RunSettings\n", "fedtextgrad_core.run.settings"),
])
def test_the_check_finds_a_planted_upward_import(tmp_path, monkeypatch, bad, expected):
    """The walk must see module-level and function-local imports, or it proves nothing."""
    planted = CORE / "data" / "_planted_for_test.py"
    planted.write_text(bad, encoding="utf-8")
    try:
        with pytest.raises(AssertionError, match=expected):
            test_no_upward_imports()
    finally:
        planted.unlink()
