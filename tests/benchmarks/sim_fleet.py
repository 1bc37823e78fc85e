"""Sim LLM servers as real processes, one per client and one for the server, each logging its calls.

Each client of a real federation talks to its own LLM server; here each gets its own
``fedtextgrad sim-server`` process with a fixed latency per call, so clients never
share a server-side queue, and the server processes' work (HTTP, JSON, the sim
itself) stays out of the measured process. Each server appends one JSON line per
call to its own log, which tells the benchmark what was asked, of which endpoint, when.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Self

from tests.support.deployment_helpers import start_sim_server

START_TIMEOUT_SECONDS = 30.0


class SimFleet:
    """Start ``names`` sim servers with ``latency_ms``; stop them (by PID) on exit."""

    def __init__(self, names: list[str], latency_ms: float, folder: Path):
        self.names, self.latency_ms, self.folder = names, latency_ms, folder
        self.urls: dict[str, str] = {}
        self.logs: dict[str, Path] = {}
        self._processes: list[subprocess.Popen] = []

    def __enter__(self) -> Self:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            for name in self.names:
                self.logs[name] = self.folder / f"calls-{name}.jsonl"
                self.logs[name].write_text("")
                process, self.urls[name] = start_sim_server(
                    self.folder / f"sim-server-{name}.out", "--latency-ms", str(self.latency_ms),
                    "--call-log", str(self.logs[name]), timeout=START_TIMEOUT_SECONDS)
                self._processes.append(process)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self._processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes.clear()
