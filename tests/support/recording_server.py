"""A tiny OpenAI-compatible server on loopback that records every request it receives.

It impersonates a server kind by what it answers: ``GET /v1/models`` returns ``models_payload``
(e.g. a vLLM, SGLang, Ollama, llama.cpp or OpenAI model list), further GET routes (``/props``,
``/version``, ``/api/version``, ``/get_model_info``) return what ``routes`` maps them to, and
``POST /v1/chat/completions`` returns a ``chat.completion`` whose text is ``reply_text``. The tests
then check the exact JSON body the real ``openai`` client sent.

Stdlib only: ``ThreadingHTTPServer`` on 127.0.0.1, port 0, served from a daemon thread; HTTP/1.0, so
no pooled keep-alive connection outlives ``stop()``. Use it as a context manager.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass
class Recorded:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the parsed JSON body, or the raw text if it was not JSON, or None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    recorder: RecordingServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server: _Server

    def log_message(self, format, *args):  # quiet test output
        pass

    def _record(self, body: Any) -> None:
        recorder = self.server.recorder
        with recorder._lock:
            recorder.requests.append(Recorded(self.command, self.path, dict(self.headers.items()), body))

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in self.server.recorder.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _not_found(self) -> None:
        self._send_json(404, {"error": {"message": f"no route for {self.command} {self.path}",
                                        "type": "not_found_error", "param": None, "code": None}})

    def do_GET(self) -> None:
        recorder = self.server.recorder
        self._record(None)
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/models":
            self._send_json(200, recorder.models_payload)
        elif path in recorder.routes:
            self._send_json(200, recorder.routes[path])
        else:
            self._not_found()

    def do_POST(self) -> None:
        recorder = self.server.recorder
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode("utf-8", errors="replace") if length > 0 else ""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        self._record(body)
        if self.path.split("?", 1)[0].rstrip("/") != "/v1/chat/completions":
            self._not_found()
            return
        model = body.get("model", "m") if isinstance(body, dict) else "m"
        self._send_json(200, {
            "id": "chatcmpl-recording",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": recorder.reply_text}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        })


@dataclass
class RecordingServer:
    """An OpenAI-compatible test double that keeps every request; ``base_url`` ends in ``/v1``."""

    models_payload: Any = field(default_factory=lambda: {"object": "list", "data": []})
    reply_text: str = "<IMPROVED_VARIABLE>Be brief.</IMPROVED_VARIABLE>"
    routes: dict[str, Any] = field(default_factory=dict)  # extra GET routes, e.g. {"/version": {...}}
    headers: dict[str, str] = field(default_factory=dict)  # sent with every response
    requests: list[Recorded] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the recording server is not running")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def chat_bodies(self) -> list[Any]:
        """The JSON bodies of the chat-completions requests, in order."""
        with self._lock:
            return [r.body for r in self.requests if r.method == "POST" and r.path.startswith("/v1/chat/completions")]

    @property
    def paths(self) -> list[str]:
        with self._lock:
            return [f"{r.method} {r.path}" for r in self.requests]

    def start(self) -> Self:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.recorder = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
