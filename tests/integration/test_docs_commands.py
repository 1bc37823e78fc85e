"""The pages' commands, run as a reader would run them: read out of docs/*.md, not copied into the test.

- docs/deploy.md's quick start on one machine (a SuperLink, two SuperNodes, the sim server over HTTP),
  in a copy of the checkout: it must finish, which it did not while the page left `server-*` unset;
- docs/real-model.md's CPU quickstart: `fedtextgrad serve` with SmolLM2-135M and a `flwr run` against
  it, then docs/troubleshooting.md's commands on what that run left: the outcome read from
  summary.json, and the background SuperLink found by its command line and its port and stopped;
- docs/experiments.md's tiny grid, from the page's TOML block.

Only placeholders are replaced (ports by free ones, `results/...` by a temporary folder, `pip install`
lines by nothing: this Python has the project installed). Every process the commands start is
recorded by PID and stopped, also when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import ROOT
from tests.support.deployment_helpers import QUIET_ENV, alive, descendants, free_ports, kill_pids, wait_until
from tests.support.simulation_helpers import flwr_env, stop_superlinks, superlinks_of

pytestmark = pytest.mark.slow


def blocks(page: str, heading: str, language: str = "bash") -> list[str]:
    """The ```language blocks of one section (from its heading to the next heading of its level)."""
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    lines = text.splitlines()
    start = lines.index(heading)
    level = heading.split(" ", 1)[0]
    end = next((i for i in range(start + 1, len(lines)) if lines[i].split(" ", 1)[0] == level), len(lines))
    section = "\n".join(lines[start:end]) + "\n"
    found = re.findall(rf"^```{language}\n(.*?)^```", section, re.S | re.M)
    assert found, f"docs/{page}: no ```{language} block under {heading!r}"
    return found


def fill(script: str, table: list[tuple[str, str]]) -> str:
    for pattern, replacement in table:
        script, count = re.subn(pattern, lambda _m, r=replacement: r, script)
        assert count, f"the page no longer has {pattern!r}: update the test with the page"
    return script


def bash(script: str, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(env, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)


def stop_recorded(*pid_files: Path) -> None:
    """Every process a pid file names, and its children, by PID."""
    pids = []
    for pid_file in pid_files:
        if pid_file.exists():
            pids += [int(p) for p in pid_file.read_text().split()]
    pids = [p for p in pids if alive(p)]
    tree = pids + [child for pid in pids for child in descendants(pid)]
    kill_pids(tree)


# --- the one-machine quick start (docs/deploy.md) -----------------------------------------------------

@pytest.mark.deployment
def test_the_one_machine_quick_start_finishes(tmp_path):
    (script,) = blocks("deploy.md", "## Quick start on one machine (loopback, no TLS)")
    checkout = tmp_path / "checkout"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in (n for n in listed if n and (ROOT / n).is_file()):
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, checkout / name)
    sim, link, node0, node1 = free_ports(4)
    filled = fill(script, [
        (r"\b8765\b", str(sim)), (r"\b9093\b", str(link)), (r"\b9094\b", str(node0)), (r"\b9095\b", str(node1)),
        (r"(?m)^SIM_PID=\$!$", "SIM_PID=$!; echo $SIM_PID >sim.pid"),
    ])
    env = dict(os.environ, **QUIET_ENV, FLWR_HOME=str(tmp_path / "flwr-home"), PYTHONUNBUFFERED="1")
    try:
        done = bash(filled, checkout, env, timeout=600)
    finally:
        stop_recorded(checkout / "sim.pid", *sorted((checkout / "deploy-state").glob("*/pid")))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    (summary_file,) = (checkout / "results").glob("*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["finished"] is True and summary["error"] in (None, ""), output[-5000:]
    assert summary["rounds"] == 2 and "fedtextgrad: the run stopped" not in output
    assert summary["server_llm"] and "sim" in json.dumps(summary["server_llm"])
    assert not (checkout / "deploy-state" / "superlink" / "pid").exists() or not alive(
        int((checkout / "deploy-state" / "superlink" / "pid").read_text()))  # the page's stop.sh line stopped it


# --- the real-model quickstart and the troubleshooting commands -------------------------------------

@pytest.mark.real_llm
def test_the_cpu_quickstart_runs_on_smollm2_and_the_troubleshooting_commands_work(tmp_path, flwr_home):
    (script,) = blocks("real-model.md", "## On a CPU: SmolLM2 with `fedtextgrad serve`")
    (port,) = free_ports(1)
    results = tmp_path / "results"
    filled = fill(script, [
        (r"(?m)^pip install .*$", ": the project and SmolLM2 are installed"),
        (r"\b8080\b", str(port)),
        (r"(?m)^SERVE_PID=\$!$", f"SERVE_PID=$!; echo $SERVE_PID >{tmp_path}/serve.pid"),
        (r">serve\.log", f">{tmp_path}/serve.log"),
        (r"--run-config \"", f"--run-config \"results-dir='{results}' run-name='quickstart' "),
    ])
    env = flwr_env(flwr_home)
    try:
        done = bash(filled, ROOT, env, timeout=1800)
    finally:
        stop_recorded(tmp_path / "serve.pid")
    output = done.stdout + done.stderr
    serve_log = (tmp_path / "serve.log").read_text(errors="replace") if (tmp_path / "serve.log").exists() else ""
    assert done.returncode == 0, output[-5000:] + serve_log[-2000:]
    summary = json.loads((results / "quickstart" / "summary.json").read_text())
    assert summary["finished"] is True, output[-5000:]
    assert summary["simulated"] is False and "(simulated LLM)" not in output
    assert "smollm2" in json.dumps(summary["client_llms"]) and "smollm2" in json.dumps(summary["server_llm"])

    # troubleshooting: the outcome of a run, read from its summary.json
    (outcome,) = blocks("troubleshooting.md", "## `flwr run` exited 0, but did the run finish?")
    read = bash(fill(outcome, [(r"results/<run-name>", str(results / "quickstart"))]), ROOT, env, timeout=60)
    assert read.returncode == 0 and read.stdout.split() == ["True"], read.stdout + read.stderr  # finished, no error

    # troubleshooting: the local SuperLink the run left behind, found by its command line and its port
    (superlink,) = superlinks_of(flwr_home)
    http_port = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    (find,) = blocks("troubleshooting.md", "## Which SuperLink, which code")
    lines = find.splitlines()
    try:
        listed = bash(lines[0], ROOT, env, timeout=60)
        assert any(line.split()[0] == str(superlink) for line in listed.stdout.splitlines()), listed.stdout
        ports = bash(fill(lines[1], [(r":3909", f":{http_port}")]), ROOT, env, timeout=60)
        assert f"pid={superlink}," in ports.stdout, ports.stdout + ports.stderr
        killed = bash(fill(lines[2], [(r"\bPID\b(?=\s)", str(superlink))]), ROOT, env, timeout=60)
        assert killed.returncode == 0, killed.stderr
        assert wait_until(lambda: not alive(superlink), 30)
    finally:
        stop_superlinks(flwr_home)


# --- the tiny grid (docs/experiments.md) --------------------------------------------------------------

def test_the_tiny_grid_of_the_experiments_page_runs_and_writes_its_table(tmp_path):
    heading = "## Try it: a tiny grid on the simulated LLM"
    (grid,) = blocks("experiments.md", heading, "toml")
    (script,) = blocks("experiments.md", heading)
    (tmp_path / "tiny.toml").write_text(grid)
    out = tmp_path / "tiny"
    filled = fill(script, [(r"\btiny\.toml\b", str(tmp_path / "tiny.toml")), (r"\bresults/tiny\b", str(out))])
    env = dict(os.environ, **QUIET_ENV)
    done = bash(filled, ROOT, env, timeout=1200)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    table = (out / "table.md").read_text()
    assert output.rstrip().endswith(table.rstrip())  # the page's `cat` printed it
    assert "concat" in table and "summarize-uid" in table and "simulated LLM" in table
    for cell in (out / "runs").iterdir():
        assert json.loads((cell / "summary.json").read_text())["finished"] is True, cell.name
    assert len(list((out / "runs").iterdir())) == 2
