"""The layers of the code, checked from its own imports (ARCHITECTURE.md is the map).

Every ``import`` in every module counts, also those inside functions: a local import
hides a dependency from a reader, not from this test. The core's layers go one way; the
two Flower apps are adapters over the core's top layer (``run/``) and never import each
other; nothing in the core imports them or Flower.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from tests import ROOT

CORE = "fedtextgrad_core"
ADAPTERS = ("server_app", "client_app")
# Lower layers never import higher ones. sim/ and tools/ stand beside the stack:
# they may use it, it never uses them.
LAYERS = {"errors": 0, "text": 0, "fingerprint": 0, "stats": 0, "data": 1, "llm": 2, "method": 3, "run": 4, "sim": 5,
          "tools": 6}
BESIDE = {"sim", "tools"}
# what an adapter may import of the core: the run layer (and the errors it catches)
ADAPTER_MAY_IMPORT = ("run", "errors")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources(root: Path) -> list[Path]:
    return [path for package in (CORE, *ADAPTERS) for path in (root / package).rglob("*.py")]


def imports_of(path: Path, root: Path, modules: set[str]) -> set[str]:
    """Every project module ``path`` imports (``from x import name`` counts x, and x.name when
    that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    own = module_name(path, root)
    package = own.rsplit(".", 1)[0] if path.name != "__init__.py" else own
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
    return {name for name in found if name in modules and name != own}


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    paths = sources(root)
    modules = {module_name(p, root) for p in paths}
    return {module_name(p, root): imports_of(p, root, modules) for p in paths}


def package(module: str) -> str:
    return module.split(".")[0]


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def wrong_imports(root: Path = ROOT) -> list[str]:
    """Every import that breaks a rule, as 'importer -> imported (why)'."""
    wrong = []
    for module, imported in graph(root).items():
        for target in imported:
            if package(module) == CORE and package(target) in ADAPTERS:
                wrong.append(f"{module} -> {target} (the core never imports the Flower apps)")
            elif package(module) in ADAPTERS and package(target) in ADAPTERS and package(module) != package(target):
                wrong.append(f"{module} -> {target} (the two apps never import each other)")
            elif package(module) in ADAPTERS and package(target) == CORE and layer(target) not in ADAPTER_MAY_IMPORT:
                wrong.append(f"{module} -> {target} (an app imports only the core's run/ layer and its errors)")
            elif package(module) == CORE == package(target):
                here, there = layer(module), layer(target)
                if there in BESIDE and here not in BESIDE:
                    wrong.append(f"{module} -> {target} (the stack never imports {there}/)")
                elif ((here in LAYERS and there in LAYERS and LAYERS[there] > LAYERS[here] and here not in BESIDE)
                      or (here == "sim" and there == "tools")):
                    wrong.append(f"{module} -> {target} (up a layer)")
    return sorted(wrong)


def test_every_module_is_in_a_layer():
    unknown = sorted({layer(m) for m in graph() if package(m) == CORE} - set(LAYERS) - {"__init__"})
    assert not unknown, f"modules outside the known layers: {unknown} (add them to LAYERS and ARCHITECTURE.md)"


def test_no_import_breaks_a_rule():
    wrong = wrong_imports()
    assert not wrong, "imports that break the layering:\n" + "\n".join(wrong)


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
    flower = [module_name(p, ROOT) for p in (ROOT / CORE).rglob("*.py")
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


@pytest.mark.parametrize("where, bad, expected", [
    ("fedtextgrad_core/data", "from fedtextgrad_core.sim.model import SimLLM\n", "never imports sim/"),
    ("fedtextgrad_core/data", "def f():\n    from fedtextgrad_core.run.settings import RunSettings\n",
     "fedtextgrad_core.run.settings (up a layer)"),
    ("fedtextgrad_core/run", "from server_app.strategy import PromptStrategy\n", "never imports the Flower apps"),
    ("client_app", "from server_app import strategy\n", "never import each other"),
    ("server_app", "from fedtextgrad_core.method.merging import merge_prompts\n", "only the core's run/ layer"),
])
def test_the_check_finds_a_planted_import(tmp_path, where, bad, expected):
    """The walk must see module-level and function-local imports in every package, or it proves nothing.
    The import is planted in a copy of the code, never in the package other test workers import."""
    for name in (CORE, *ADAPTERS):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    assert not wrong_imports(tmp_path)
    (tmp_path / where / "_planted_for_test.py").write_text(bad, encoding="utf-8")
    assert any(expected in line for line in wrong_imports(tmp_path)), wrong_imports(tmp_path)
