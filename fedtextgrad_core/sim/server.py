"""An OpenAI-compatible HTTP server in front of the sim backend (stdlib only).

Why: with it, the very same code path that talks to vLLM, Ollama or OpenAI (the
official ``openai`` client and a ``base_url``) can be exercised end to end, in
tests and in multi-process deployments, without a GPU, a network or an API key.
Only what that client needs is implemented: ``GET /v1/models`` and
``POST /v1/chat/completions`` (no streaming, no tools).

Run it with ``fedtextgrad sim-server --port 8765``. With ``--call-log FILE`` it appends one
JSON line per chat call (its kind, start and end on the wall clock), so a benchmark can
see what the server was asked and when it was busy.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO

from fedtextgrad_core.errors import SimUnsupportedError
from fedtextgrad_core.sim import SimLLM, approx_tokens
from fedtextgrad_core.sim.model import request_kind, split_messages

__all__ = ["MODEL_ID", "make_server", "serve_forever"]

MODEL_ID = "sim"
_MAX_BODY_BYTES = 16 * 1024 * 1024  # far above any prompt this project sends


class _BadRequest(Exception):
    """A request the server refuses with HTTP 400; the message goes to the client."""


class CallLog:
    """One JSON line per chat call: ``{"kind", "start", "end", "status"}`` (seconds, wall clock).

    Wall-clock times so that logs of several server processes line up with each other
    and with the process that drives them. Lines are written whole under a lock, so
    concurrent calls never interleave.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._out: TextIO = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise OSError(f"cannot open the call log '{self.path}' for appending: {exc.strerror}") from None

    def write(self, kind: str, start: float, end: float, status: int) -> None:
        line = json.dumps({"kind": kind, "start": round(start, 6), "end": round(end, 6), "status": status})
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()

    def close(self) -> None:
        with self._lock:
            self._out.close()


class _Handler(BaseHTTPRequestHandler):
    server_version = "FedTextGradSim/1.0"
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client (httpx) expects
    # headers and body go out in two writes; without TCP_NODELAY each reply waits ~40 ms
    # for the client's delayed ACK
    disable_nagle_algorithm = True
    sim: SimLLM  # set on the subclass made by make_server
    call_log: CallLog | None = None  # set on the subclass made by make_server

    # -- routing

    def do_GET(self) -> None:
        if self._path() == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "owned_by": "fedtextgrad"}]})
        else:
            self._not_found()

    def do_POST(self) -> None:
        body = self._read_body()  # always drained, so the connection stays usable
        if self._path() not in ("/v1/chat/completions", "/chat/completions"):
            self._not_found()
            return
        start, kind = time.time(), "invalid"
        try:
            request = _parse_request(body)
            kind = request_kind(*split_messages(request["messages"]))
            content = self.sim.complete(request["messages"])
        except (_BadRequest, SimUnsupportedError) as exc:
            self._log_call(kind, start, 400)
            self._error(400, str(exc), "invalid_request_error")
            return
        except Exception as exc:  # a bug in the sim must not kill the server thread silently
            self._log_call(kind, start, 500)
            self.log_error("sim failed: %r", exc)
            self._error(500, f"the sim backend failed: {exc}", "server_error")
            return
        self._log_call(kind, start, 200)
        self._send(200, _completion(request, content))

    # -- helpers

    def _log_call(self, kind: str, start: float, status: int) -> None:
        if self.call_log is not None:
            self.call_log.write(kind, start, time.time(), status)

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length <= 0:
            return b""
        return self.rfile.read(min(length, _MAX_BODY_BYTES))

    def _not_found(self) -> None:
        self._error(404, f"unknown path {self.command} {self.path}; this server offers "
                    "GET /v1/models and POST /v1/chat/completions", "not_found_error")

    def _error(self, status: int, message: str, kind: str) -> None:
        self._send(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent per request: the sim serves thousands of calls per run."""

    def log_error(self, format: str, *args: Any) -> None:
        sys.stderr.write("sim server: " + (format % args) + "\n")


def _parse_request(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body.decode("utf-8") or "null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _BadRequest(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(request, dict):
        raise _BadRequest("the request body must be a JSON object with a 'messages' list")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("the request needs a non-empty 'messages' list")
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise _BadRequest("each message must be an object with 'role' and 'content'")
    return request


def _content_text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def _completion(request: dict[str, Any], content: str) -> dict[str, Any]:
    prompt_tokens = sum(approx_tokens(_content_text(m.get("content"))) for m in request["messages"])
    completion_tokens = approx_tokens(content)
    return {
        "id": f"chatcmpl-sim-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(request.get("model") or MODEL_ID),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class _SimHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client never blocks shutdown
    # Many clients connect at once (every client's llm-concurrency calls, benchmarks with 8 in flight).
    # With the default listen backlog of 5, connections beyond it are dropped while the accepting
    # thread waits for the GIL, and each is retried by the client's kernel only after a second.
    request_queue_size = 128


def make_server(host: str = "127.0.0.1", port: int = 0, latency_ms: float = 0.0,
                call_log: str | Path | None = None, model: SimLLM | None = None) -> ThreadingHTTPServer:
    """A ready, not yet serving, sim server; port 0 picks a free port.

    The bound port is ``server.server_address[1]``. Call ``serve_forever()`` (e.g.
    in a thread), then ``shutdown()`` and ``server_close()`` when done. ``call_log``
    names a file to append one JSON line per chat call to (see :class:`CallLog`).
    ``model``: another simulated model to serve (a test's variant of SimLLM).
    """
    log = CallLog(call_log) if call_log else None
    handler = type("SimHandler", (_Handler,), {"sim": model or SimLLM(latency_ms=latency_ms), "call_log": log})
    return _SimHTTPServer((host, port), handler)


def serve_forever(port: int, latency_ms: float = 0.0, host: str = "127.0.0.1",
                  call_log: str | Path | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM, after printing where the server listens."""
    server = make_server(host, port, latency_ms, call_log)
    bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])

    def stop(signum: int, frame: object) -> None:
        # shutdown() blocks until serve_forever returns, so call it from another thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
    # announced only once SIGTERM is handled, so whoever waits for this line may stop us
    print(f"sim LLM serving on http://{bound_host}:{bound_port}/v1 (latency {latency_ms:g} ms)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        call_log = getattr(server.RequestHandlerClass, "call_log", None)
        if call_log is not None:
            call_log.close()
