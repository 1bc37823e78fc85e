"""An OpenAI-compatible chat server on loopback that misbehaves on purpose.

The fault tests point the real ``openai`` client path (``make_engine`` with the
openai backend) at this server and switch its ``mode`` per test:

=============  ==========================================================================
``ok``         a valid ``chat.completion`` with usage; text ``reply_text`` (``{n}`` in it
               becomes the number of the request, so a fresh answer differs from a cached one)
``sim``        a valid ``chat.completion`` from the simulated LLM (a node that works, until
               the test switches the mode to a fault)
``http500``    always HTTP 500 with an OpenAI-style error body
``flaky500``   HTTP 500 for the first ``fail_first`` requests, then ``ok``
``http429``    HTTP 429 for the first ``fail_first`` requests, then ``ok``
``http400``    HTTP 400 with an OpenAI-style error body (a final error: never retried)
``http404``    HTTP 404 with an OpenAI-style error body (a final error: never retried)
``hang``       no answer for ``hang_seconds`` (longer than the client's timeout), then
               the connection is closed; bounded, and cut short by ``stop()``
``empty``      HTTP 200 with an empty body (``Content-Type: application/json``)
``garbage``    HTTP 200 with a non-JSON body (an HTML page, as a confused proxy sends)
``no_answer``  a valid ``chat.completion`` whose text has no "Answer:" line
``die``        the connection is closed without any response
=============  ==========================================================================

``GET /v1/models`` answers normally (so the engine's start-up check passes) unless
``models_mode`` is set to ``http500``/``http404``/``garbage``.

It records what it received: ``chat_requests`` (POSTs to the chat endpoint),
``arrivals`` (their ``time.monotonic()`` stamps), ``models_requests``, and the highest
number of chat requests in flight at once (``max_in_flight``), with an optional
``delay`` per ``ok`` answer so overlapping requests can be observed.

Stdlib only: ``ThreadingHTTPServer`` on 127.0.0.1, port 0, served from a thread;
``stop()`` shuts it down, closes open keep-alive connections (so a stopped server
really refuses, instead of serving pooled connections) and joins the thread.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODES = ("ok", "sim", "http500", "flaky500", "http429", "http400", "http404", "hang", "empty", "garbage",
         "no_answer", "die")
OK_TEXT = "Some reasoning.\nAnswer: 3"
NO_ANSWER_TEXT = "Let me think about the items one by one. There are quite a few of them."
GARBAGE_BODY = b"<html><body><h1>Welcome to nginx!</h1></body></html>"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, read, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # many clients connect at once in the concurrency tests
    faulty: FaultyLLMServer

    def process_request(self, request, client_address):  # track sockets so stop() can close them
        with self.faulty._lock:
            self.faulty._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.faulty._lock:
            self.faulty._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):  # a client that hung up is not news
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers (and what httpx pools)
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall
    server: _Server

    def log_message(self, format, *args):  # quiet test output
        pass

    # -- routing

    def do_GET(self) -> None:
        faulty = self.server.faulty
        if self.path.split("?", 1)[0].rstrip("/") != "/v1/models":
            self._error(404, f"no route for GET {self.path}", "not_found_error")
            return
        with faulty._lock:
            faulty.models_requests += 1
        mode = faulty.models_mode
        if mode == "http500":
            self._error(500, "the model registry is down", "server_error")
        elif mode == "http404":
            self._error(404, "no such route", "not_found_error")
        elif mode == "garbage":
            self._send_raw(200, GARBAGE_BODY, "text/html")
        else:
            data = [{"id": name, "object": "model", "owned_by": "faulty"} for name in faulty.models]
            self._send_json(200, {"object": "list", "data": data})

    def do_POST(self) -> None:
        faulty = self.server.faulty
        body = self._read_body()
        if self.path.split("?", 1)[0].rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route for POST {self.path}", "not_found_error")
            return
        with faulty._lock:
            faulty.chat_requests += 1
            number = faulty.chat_requests  # 1-based number of this request
            faulty.arrivals.append(time.monotonic())
            faulty._in_flight += 1
            faulty.max_in_flight = max(faulty.max_in_flight, faulty._in_flight)
            mode = faulty.mode
        try:
            self._answer(faulty, mode, number, body)
        finally:
            with faulty._lock:
                faulty._in_flight -= 1

    # -- the modes

    def _answer(self, faulty: FaultyLLMServer, mode: str, number: int, body: bytes) -> None:
        if mode in ("flaky500", "http429") and number > faulty.fail_first:
            mode = "ok"
        if mode == "sim":
            self._send_json(200, _completion(body, _sim_reply(body)))
        elif mode == "ok" or mode == "no_answer":
            if faulty.delay:
                faulty._stopping.wait(faulty.delay)
            text = faulty.reply_text.replace("{n}", str(number)) if mode == "ok" else NO_ANSWER_TEXT
            self._send_json(200, _completion(body, text))
        elif mode in ("http500", "flaky500"):
            self._error(500, "The server had an error while processing your request.", "server_error")
        elif mode == "http429":
            self._error(429, "Rate limit reached for requests.", "rate_limit_error")
        elif mode == "http400":
            self._error(400, "This model's maximum context length is 4096 tokens.", "invalid_request_error")
        elif mode == "http404":
            self._error(404, "The model 'm' does not exist.", "not_found_error")
        elif mode == "hang":
            faulty._stopping.wait(faulty.hang_seconds)  # bounded; stop() cuts it short
            self._drop()
        elif mode == "empty":
            self._send_raw(200, b"", "application/json")
        elif mode == "garbage":
            self._send_raw(200, GARBAGE_BODY, "text/html")
        elif mode == "die":
            self._drop()
        else:
            self._error(500, f"faulty server: unknown mode {mode!r}", "server_error")

    # -- helpers

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _drop(self) -> None:
        """Close the connection without a response."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send_raw(self, status: int, payload: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up first
            self.close_connection = True

    def _send_json(self, status: int, payload: object) -> None:
        self._send_raw(status, json.dumps(payload).encode("utf-8"), "application/json")

    def _error(self, status: int, message: str, kind: str) -> None:
        self._send_json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})


def _sim_reply(body: bytes) -> str:
    from fedtextgrad_core.sim import SimLLM

    return SimLLM().complete(json.loads(body)["messages"])


def _completion(body: bytes, text: str) -> dict[str, object]:
    try:
        model = json.loads(body or b"{}").get("model", "m")
    except ValueError:
        model = "m"
    return {
        "id": "chatcmpl-faulty",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }


class FaultyLLMServer:
    """A misbehaving OpenAI-compatible server; use as a context manager or start()/stop()."""

    def __init__(self, mode: str = "ok", *, fail_first: int = 2, hang_seconds: float = 3.0,
                 delay: float = 0.0, reply_text: str = OK_TEXT, models: tuple[str, ...] = ("m",)):
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._in_flight = 0
        self.mode = mode
        self.models_mode = "ok"
        self.fail_first = fail_first
        self.hang_seconds = hang_seconds
        self.delay = delay
        self.reply_text = reply_text
        self.models = models
        self.reset_counts()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        self._mode = mode

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def reset_counts(self) -> None:
        with self._lock:
            self.chat_requests = 0
            self.models_requests = 0
            self.arrivals: list[float] = []
            self.max_in_flight = 0

    def start(self) -> FaultyLLMServer:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.faulty = self
        self._server, self.port = server, server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"faulty-llm-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: the port refuses connections afterwards. Safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()  # ends hanging handlers now
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:  # kept-alive connections would otherwise go on serving
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultyLLMServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
