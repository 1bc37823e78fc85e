"""Stand-ins for the surprisal tests: llama.cpp's native routes in miniature, and scripted echo answers.

``FakeLlamaCpp`` is a real HTTP server on loopback (stdlib ``ThreadingHTTPServer``, port 0,
a daemon thread, stopped by ``close()``) with a toy model whose log-probabilities the tests
work out by hand; knobs make it misbehave the way a real server might, or answer a route with
a redirect. ``Echo`` and ``scripted`` stand for a completions answer with echoed prompt
log-probabilities, as the ``openai`` client parses it (no server here gives those).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

BOS_ID = 1
TOY_VOCAB = 300


def toy_logprob(context_length: int, token: int) -> float:
    """The stand-in's model: log p(token | any context of this length) = -(1 + (token + length) % 4) bits."""
    return -math.log(2) * (1 + (token + context_length) % 4)


def toy_bits(ids: list[int], first_context: int) -> list[float]:
    """The surprisal the client must report: token k is read after ``first_context + k`` tokens."""
    return [1.0 + (token + first_context + k) % 4 for k, token in enumerate(ids)]


class FakeLlamaCpp:
    """llama.cpp's native routes in miniature: one token per character, the toy model above.

    Records every request (path, JSON body, headers); knobs make it misbehave the way a real
    server might. ``redirects`` maps a path to ``(status, location)``: that route answers with
    the redirect instead (the hostile endpoint of the redirect test).
    """

    def __init__(self, owned_by: str = "llamacpp", add_bos: bool = False):
        self.owned_by, self.add_bos = owned_by, add_bos
        self.leaky = False  # report probabilities after the logit bias (what the client must refuse)
        self.slow_from: int | None = None  # contexts at least this long take longer than any client waits
        self.refuse: set[int] = set()  # tokens that a bias cannot force (the top-1 comes out instead)
        self.redirects: dict[str, tuple[int, str]] = {}
        self.requests: list[tuple[str, dict]] = []
        self.headers: list[tuple[str, dict[str, str]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.requests.append((self.path, {}))
                fake.headers.append((self.path, dict(self.headers.items())))
                if self._redirected():
                    return
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "toy", "object": "model", "owned_by": fake.owned_by}]})
                else:
                    self._send(404, {"error": {"code": 404, "message": "File Not Found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                fake.requests.append((self.path, body))
                fake.headers.append((self.path, dict(self.headers.items())))
                if self._redirected():
                    return
                answer = {"/tokenize": fake.tokenize, "/completion": fake.complete,
                          "/v1/completions": fake.openai_completion}.get(self.path)
                if answer is None:
                    self._send(404, {"error": {"code": 404, "message": "File Not Found"}})
                else:
                    self._send(200, answer(body))

            def _redirected(self) -> bool:
                if self.path not in fake.redirects:
                    return False
                status, location = fake.redirects[self.path]
                self.send_response(status)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return True

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up waiting (the timeout test)
                    pass

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def tokenize(self, body: dict) -> dict:
        ids = [ord(c) % TOY_VOCAB for c in body["content"]]
        return {"tokens": ([BOS_ID] if self.add_bos and body.get("add_special") else []) + ids}

    def complete(self, body: dict) -> dict:
        context = body["prompt"]
        if self.slow_from is not None and len(context) >= self.slow_from:
            time.sleep(1.0)
        ranked = sorted(range(TOY_VOCAB), key=lambda t: (-toy_logprob(len(context), t), t))
        chosen = ranked[0]
        for token, bias in body.get("logit_bias", []):
            if bias > 0 and token not in self.refuse:
                chosen = token
        logprob = 0.0 if self.leaky and chosen != ranked[0] else toy_logprob(len(context), chosen)
        tops = [{"id": t, "token": chr(t), "logprob": toy_logprob(len(context), t)} for t in ranked[:body["n_probs"]]]
        return {"content": chr(chosen), "stop": True,
                "completion_probabilities": [{"id": chosen, "token": chr(chosen), "logprob": logprob, "top_logprobs": tops}]}

    def openai_completion(self, body: dict) -> dict:
        """What llama.cpp answers to echo + logprobs: the generated token only, chat-style."""
        return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "toy",
                "choices": [{"index": 0, "text": "x", "finish_reason": "length",
                             "logprobs": {"content": [{"id": 120, "token": "x", "logprob": -1.0, "top_logprobs": []}]}}],
                "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 1,
                          "total_tokens": len(body["prompt"]) + 1}}

    def completions(self) -> list[dict]:
        return [body for path, body in self.requests if path == "/completion"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class Echo:
    """A completions answer as the openai client parses it."""

    def __init__(self, tokens: list[str], values: list[float | None], tops: list[dict | None], completion: int = 1):
        logprobs = type("L", (), {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops})
        self.choices = [type("C", (), {"logprobs": logprobs})]
        self.usage = type("U", (), {"completion_tokens": completion})


def scripted(monkeypatch: pytest.MonkeyPatch, client: Any, answer: Callable[[str], Echo]) -> list[str]:
    """Make ``client``'s echo requests answer with ``answer(prompt)``; returns the prompts sent."""
    sent: list[str] = []

    def create(**request):
        sent.append(request["prompt"])
        assert request["echo"] is True and request["logprobs"] == 1 and request["max_tokens"] == 1
        return answer(request["prompt"])

    assert client._client is not None
    monkeypatch.setattr(client._client.completions, "create", create)
    return sent
