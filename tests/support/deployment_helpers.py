"""Helpers of the deployment tests: the deploy/ scripts as a site operator runs them, by PID.

Every process is started by a deploy/ script (or, for the LLM servers, here) and is recorded
with its PID; ``Deployment.stop_all`` stops them by those PIDs (the scripts' own stop.sh first,
then SIGKILL by PID for anything left), also when a test failed. Nothing is looked up by name.

Run as a module, this file is a counting front for ``fedtextgrad sim-server``:

    python -m tests.support.deployment_helpers sim-server --port P

the same simulated LLM over the same HTTP server, printing one ``served POST /v1/chat/completions``
line per answered request, so a test can tell which node's LLM server a request went to.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import ROOT

DEPLOY = ROOT / "deploy"
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
SERVED = "served POST /v1/chat/completions"
# The marks of every test module that starts SuperLinks and SuperNodes as separate processes.
DEPLOYMENT_MARKS = [
    pytest.mark.slow,
    pytest.mark.deployment,
    pytest.mark.skipif(
        not (shutil.which("openssl") and shutil.which("ssh-keygen") and shutil.which("flower-superlink")),
        reason="needs openssl, ssh-keygen (openssh-client) and Flower's flower-superlink",
    ),
]
# How often a SuperNode's (and the SuperLink's) task runner asks whether a ClientApp (ServerApp) is to
# start: Flower's default is every 1.0 s, a delay added to every message a test deployment handles.
POLL_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (bound together, so never the same twice)."""
    probes = []
    try:
        for _ in range(count):
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            probes.append(probe)
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return not re.search(r"^State:\s+Z", state, re.MULTILINE)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    """PIDs of every descendant of ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(re.search(r"^PPid:\s+(\d+)", (entry / "status").read_text(), re.MULTILINE).group(1))
        except (OSError, AttributeError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def serves_models(url: str) -> bool:
    """An OpenAI-compatible server answers ``GET {url}/models``: it is up and ready."""
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


def start_sim_server(log_path: Path, *args: str, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """``fedtextgrad sim-server ARGS`` as a process on a free loopback port, once it answers.

    Returns the process (stop it by its PID) and its base URL. Its output goes to ``log_path``.
    """
    port = free_ports(1)[0]
    with log_path.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "fedtextgrad_core.tools.cli", "sim-server", "--port", str(port),
                                    *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    if not wait_until(lambda: serves_models(url) or process.poll() is not None, timeout, 0.1) or not serves_models(url):
        process.kill()
        process.wait()
        raise AssertionError(f"sim-server did not start: {log_path.read_text()[-2000:]}")
    return process, url


@dataclass
class Started:
    """A process a deploy/ script started: its name, PID, state folder and the script's output."""

    name: str
    pid: int
    state: Path
    output: str
    returncode: int = 0

    @property
    def log(self) -> str:
        try:
            return (self.state / "log").read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class SimServer:
    port: int
    pid: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def served(self) -> int:
        return self.log_path.read_text().count(SERVED)


@dataclass
class Deployment:
    """One test deployment: a state root for the deploy/ scripts and every PID started in it."""

    root: Path
    started: list[Started] = field(default_factory=list)
    sims: list[SimServer] = field(default_factory=list)
    extra_pids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state_root = self.root / "state"
        self.state_root.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, **QUIET_ENV, **POLL_ENV, FEDTEXTGRAD_DEPLOY_STATE=str(self.state_root))
        self.env.pop("FLWR_HOME", None)

    # --- running the scripts ------------------------------------------------------
    def script(self, name: str, *args: str, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", str(DEPLOY / name), *args], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"{name} {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def start(self, script: str, name: str, *args: str, check: bool = True) -> Started:
        """Run a start-*.sh script with --name NAME and record the PID it reports."""
        done = self.script(script, "--name", name, *args, check=False)
        output = done.stdout + done.stderr
        pid_file = self.state_root / name / "pid"
        pid = int(pid_file.read_text()) if pid_file.exists() else -1
        started = Started(name, pid, self.state_root / name, output, done.returncode)
        if pid > 0:
            self.started.append(started)
        if check and done.returncode != 0:
            raise AssertionError(f"{script} --name {name} exited {done.returncode}:\n{output}\n--- log:\n{started.log[-3000:]}")
        if check:
            reported = re.search(r"PID (\d+)", done.stdout)
            assert reported and int(reported.group(1)) == pid, output
        return started

    def start_many(self, *starts: tuple) -> list[Started]:
        """Several ``start(script, name, *args)`` at once (each is a separate script run)."""
        with ThreadPoolExecutor(max_workers=len(starts)) as pool:
            return list(pool.map(lambda args: self.start(*args), starts))

    def sim_server(self, name: str) -> SimServer:
        """A counting sim LLM server in its own process, on a fresh port."""
        port = free_ports(1)[0]
        log_path = self.root / f"{name}.log"
        with log_path.open("w") as out:
            command = [sys.executable, "-m", "tests.support.deployment_helpers", "sim-server", "--port", str(port)]
            process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        sim = SimServer(port, process.pid, log_path)
        self.sims.append(sim)
        self.extra_pids.append(process.pid)

        if not wait_until(lambda: serves_models(sim.url), 60, 0.2):
            raise AssertionError(f"sim server {name} did not start: {log_path.read_text()[-2000:]}")
        return sim

    def flwr(self, flwr_home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        env = dict(self.env, FLWR_HOME=str(flwr_home))
        return subprocess.run(["flwr", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    # --- stopping, by PID -------------------------------------------------------------
    def stop(self, started: Started, timeout: int = 20) -> None:
        self.script("stop.sh", "--state-dir", str(started.state), "--timeout", str(timeout), check=False)

    def stop_all(self) -> None:
        """Stop every recorded process by PID: stop.sh (SIGTERM, then SIGKILL), then SIGKILL leftovers."""
        tree = {s.pid: descendants(s.pid) for s in self.started if alive(s.pid)}

        def stop(started: Started) -> None:
            if alive(started.pid):
                self.script("stop.sh", "--state-dir", str(started.state), "--timeout", "10", check=False, timeout=120)

        # the SuperNodes and runners together, then the SuperLinks
        for wave in ([s for s in self.started if "superlink" not in s.name],
                     [s for s in self.started if "superlink" in s.name]):
            if wave:
                with ThreadPoolExecutor(max_workers=len(wave)) as pool:
                    list(pool.map(stop, wave))
        for pid in self.extra_pids:
            kill_pids([pid], signal.SIGTERM)
        leftovers = [pid for pid in [*tree, *(p for kids in tree.values() for p in kids), *self.extra_pids] if alive(pid)]
        if leftovers:
            wait_until(lambda: not any(alive(pid) for pid in leftovers), 10)
            kill_pids([pid for pid in leftovers if alive(pid)])

    def all_pids(self) -> list[int]:
        pids = [s.pid for s in self.started] + list(self.extra_pids)
        return pids + [child for pid in pids for child in descendants(pid)]


def own_deployment(tmp_path_factory, name: str):
    """A fixture's body: a ``Deployment`` in its own temporary folder, all it started stopped afterwards."""
    deployment = Deployment(tmp_path_factory.mktemp(name))
    yield deployment
    deployment.stop_all()


def read_results(run_dir: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    return summary, rounds


# --- the counting sim server ----------------------------------------------------------

def _serve_counting(port: int) -> None:
    from fedtextgrad_core.sim.server import make_server

    server = make_server("127.0.0.1", port)
    lock = threading.Lock()
    base = server.RequestHandlerClass

    class Counting(base):  # type: ignore[misc, valid-type]
        def do_POST(self) -> None:
            super().do_POST()
            with lock:
                print(f"served POST {self.path}", flush=True)

    server.RequestHandlerClass = Counting
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"counting sim LLM serving on http://127.0.0.1:{server.server_address[1]}/v1", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.support.deployment_helpers")
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("sim-server", help="the sim LLM server, printing one line per answered request")
    sim.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    _serve_counting(args.port)
