"""Running `flwr run . local` (Flower's simulation) from tests, in an isolated FLWR_HOME.

`flwr run` starts a background SuperLink (simulation mode) that outlives it; the
``flwr_home`` fixture (conftest.py) stops that process by its PID afterwards. `flwr run`
can exit 0 when the run failed, so tests check what the run left on disk and printed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import warnings
from pathlib import Path

from tests import ROOT

RUN_TIMEOUT = 420


def _processes_with(*needles: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(needle in cmdline for needle in needles):
            pids.append(int(entry.name))
    return pids


def superlinks_of(flwr_home: Path) -> list[int]:
    """PIDs of SuperLink processes that belong to this FLWR_HOME (and so to this test)."""
    return _processes_with("flower-superlink", str(flwr_home))


def stop_superlinks(flwr_home: Path) -> None:
    for pid in superlinks_of(flwr_home):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while superlinks_of(flwr_home) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in superlinks_of(flwr_home):
        os.kill(pid, signal.SIGKILL)


_PORTS: dict[Path, tuple[int, int]] = {}


def _ports_of(flwr_home: Path) -> tuple[int, int]:
    """The local SuperLink's two ports for this FLWR_HOME: free ones of its own, never Flower's
    fixed defaults (127.0.0.1:39091/39093), where a SuperLink someone else started may listen and
    would run this test's app instead."""
    if flwr_home not in _PORTS:
        probes = [socket.socket() for _ in range(2)]
        try:
            for probe in probes:
                probe.bind(("127.0.0.1", 0))
            _PORTS[flwr_home] = (probes[0].getsockname()[1], probes[1].getsockname()[1])
        finally:
            for probe in probes:
                probe.close()
    return _PORTS[flwr_home]


def flwr_env(flwr_home: Path) -> dict[str, str]:
    http_port, control_port = _ports_of(flwr_home)
    return dict(os.environ, FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port), FLWR_LOCAL_CONTROL_API_PORT=str(control_port))


def flwr_run_command(run_config: str, supernodes: int = 3) -> list[str]:
    return ["flwr", "run", ".", "local", "--stream", "--federation-config", f"num-supernodes={supernodes}",
            "--run-config", run_config]


# Ray waits a fixed 30 s for its raylet (ray/_private/node.py, not configurable) and Flower 15 s for its
# local SuperLink. On a 2-core machine running four test modules at once either can miss its deadline
# before this project's code has run; such a run says nothing about the project, so it runs again.
START_TIMEOUTS = ("The current node timed out during startup", "Failed to start local SuperLink")
START_ATTEMPTS = 3


def flwr_run(flwr_home: Path, run_config: str) -> str:
    """Everything `flwr run --stream` printed; a run whose Ray or SuperLink missed its start-up
    deadline is run again (at most ``START_ATTEMPTS`` in all), with a warning that says so."""

    def once() -> str:
        done = subprocess.run(flwr_run_command(run_config), cwd=ROOT, env=flwr_env(flwr_home), check=False,
                              capture_output=True, text=True, timeout=RUN_TIMEOUT)
        return done.stdout + done.stderr

    for attempt in range(1, START_ATTEMPTS):
        output = once()
        missed = next((needle for needle in START_TIMEOUTS if needle in output), None)
        if missed is None:
            return output
        warnings.warn(f"flwr run attempt {attempt} of {START_ATTEMPTS}: '{missed}' (machine busy); running again",
                      stacklevel=2)
    return once()
