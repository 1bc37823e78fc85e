"""What each role installs: a site (``pip install .``) gets neither Ray nor matplotlib.

The sets are resolved from ``uv.lock``, the lock a site installs from (deploy/README.md), by walking
its package graph from the project: the base dependencies for a site, each extra on top of them.
Markers are ignored, so a set is the union over every platform and Python the lock covers. The lock
itself must match ``pyproject.toml`` (``uv lock --check``; .ci/run checks it too), and the base
dependencies must be what the site's code imports.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "fedtextgrad"
# imported by the core only when a feature that needs them is used, each from its extra
OPTIONAL_IMPORTS = {"matplotlib": "figures", "mlflow": "tracking", "xllamacpp": "serve",
                    "tiktoken": "none: used when textgrad's litellm brought it, else a fallback"}
# imported by name at run time (llm/textgrad_adapter.py: importlib.import_module("textgrad"))
IMPORTED_BY_NAME = {"textgrad"}
# declared, not imported: Flower's transport, which the product brief names among the packages; a
# lower bound only, so Flower's own requirement decides the version
TRANSPORT = {"grpcio"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return normalize(match.group(1))


@cache
def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


@cache
def lock() -> dict[str, dict[str, Any]]:
    with (ROOT / "uv.lock").open("rb") as handle:
        packages = tomllib.load(handle)["package"]
    return {normalize(p["name"]): p for p in packages}


def installed_set(extras: tuple[str, ...] = ()) -> set[str]:
    """Every package the lock installs for the project with these extras."""
    packages = lock()
    seen: set[tuple[str, tuple[str, ...]]] = set()  # (package, its extras): an extra adds to its base set
    todo = [(PROJECT, tuple(sorted(extras)))]
    while todo:
        item = todo.pop()
        if item in seen:
            continue
        seen.add(item)
        name, wanted = item
        package = packages[name]
        deps = list(package.get("dependencies", []))
        for extra in wanted:
            deps += package.get("optional-dependencies", {})[extra]
        # the project's own extras name each other (test -> simulation -> figures): the same walk
        todo += [(normalize(dep["name"]), tuple(sorted(dep.get("extra", ())))) for dep in deps]
    return {name for name, _ in seen} - {PROJECT}


def test_the_lock_matches_pyproject() -> None:
    done = subprocess.run([sys.executable, "-m", "uv", "lock", "--check", "--offline"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, f"uv.lock does not match pyproject.toml: run `uv lock` ({done.stderr.strip()})"


def test_a_site_installs_neither_ray_nor_matplotlib() -> None:
    site = installed_set()
    assert {"flwr", "textgrad", "openai", "datasets", "httpx", "pydantic", "tomli-w"} <= site
    assert "ray" not in site and "matplotlib" not in site


@pytest.mark.parametrize(("extras", "ray", "matplotlib"), [
    (("figures",), False, True),        # a server: the run's figures
    (("simulation",), True, True),      # flwr run . local: Ray, and the figures
    (("test",), True, True),            # everything
])
def test_each_extra_adds_what_its_role_needs(extras: tuple[str, ...], ray: bool, matplotlib: bool) -> None:
    packages = installed_set(extras)
    assert ("ray" in packages, "matplotlib" in packages) == (ray, matplotlib)
    assert installed_set() <= packages


def test_the_test_extra_holds_every_other_role() -> None:
    test = installed_set(("test",))
    for extras in (("figures",), ("simulation",), ("tracking",), ("serve",)):
        assert installed_set(extras) <= test, extras


def test_the_base_dependencies_are_what_a_site_imports() -> None:
    declared = {requirement_name(r) for r in pyproject()["project"]["dependencies"]}
    to_distributions = {module: {normalize(d) for d in dists} for module, dists in packages_distributions().items()}
    imported: set[str] = set()
    for folder in ("fedtextgrad_core", "server_app", "client_app"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    imported |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    third_party = {m for m in imported - set(sys.stdlib_module_names)
                   if m not in {"fedtextgrad_core", "server_app", "client_app"}}
    unknown = third_party - set(to_distributions) - set(OPTIONAL_IMPORTS)
    assert not unknown, f"imported but not installed here: {sorted(unknown)}"
    needed = {d for m in third_party - set(OPTIONAL_IMPORTS) for d in to_distributions[m]} | IMPORTED_BY_NAME | TRANSPORT
    assert needed == declared, f"imported, not declared: {sorted(needed - declared)}; " \
                               f"declared, not imported: {sorted(declared - needed)}"


def test_what_can_break_a_site_is_bounded() -> None:
    deps = {requirement_name(r): r for r in pyproject()["project"]["dependencies"]}
    assert re.fullmatch(r"flwr==[\d.]+", deps["flwr"])  # no extra: Ray comes with [simulation] only
    assert "<4" in deps["openai"]  # below its next, untested major version
    assert re.fullmatch(r"grpcio>=[\d.]+", deps["grpcio"])  # never imported: a floor only, Flower pins its own
    extras = pyproject()["project"]["optional-dependencies"]
    simulation_flwr = next(r for r in extras["simulation"] if requirement_name(r) == "flwr")
    assert simulation_flwr == deps["flwr"].replace("flwr", "flwr[simulation]", 1)  # the same Flower pin
