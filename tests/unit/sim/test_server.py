"""Tests of the OpenAI-compatible sim server, through the official openai client."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator

import openai
import pytest

from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.sim import SimLLM, approx_tokens
from fedtextgrad_core.sim.server import make_server

QUESTION = "I have a flute, a piano, four stoves, and two violins. How many musical instruments do I have?"


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    server = make_server(port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=10)


def raw(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_chat_completion_through_openai_client(port: int) -> None:
    messages = [
        {"role": "system", "content": get_task("object_counting").start_prompt},
        {"role": "user", "content": QUESTION},
    ]
    reply = client(port).chat.completions.create(model="sim", messages=messages, temperature=0, max_tokens=50)
    content = reply.choices[0].message.content
    assert content == SimLLM().complete(messages)
    assert content.splitlines()[-1].startswith("Answer: ")
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == "sim"
    assert reply.usage.completion_tokens == approx_tokens(content)
    assert reply.usage.prompt_tokens == sum(approx_tokens(m["content"]) for m in messages)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_models_endpoint(port: int) -> None:
    assert [m.id for m in client(port).models.list()] == ["sim"]
    status, body = raw(port, "GET", "/v1/models")
    assert status == 200
    assert body == {"object": "list", "data": [{"id": "sim", "object": "model", "owned_by": "fedtextgrad"}]}


def test_bad_requests_get_json_errors(port: int) -> None:
    status, body = raw(port, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in body["error"]["message"]

    status, body = raw(port, "POST", "/v1/chat/completions", json.dumps({"model": "sim"}).encode())
    assert status == 400 and "messages" in body["error"]["message"]

    status, body = raw(port, "GET", "/v1/nothing")
    assert status == 404 and "error" in body


def test_unsupported_question_is_a_bad_request(port: int) -> None:
    with pytest.raises(openai.BadRequestError, match="object counting, word sorting and multistep arithmetic"):
        client(port).chat.completions.create(
            model="sim",
            messages=[
                {"role": "system", "content": get_task("gsm8k").start_prompt},
                {"role": "user", "content": "Natalia sold 48 clips in April and half as many in May. How many in all?"},
            ],
        )


def test_parallel_requests_agree(port: int) -> None:
    messages = [{"role": "system", "content": "Answer: in this format."}, {"role": "user", "content": QUESTION}]
    replies: list[str] = []
    lock = threading.Lock()

    def call() -> None:
        text = client(port).chat.completions.create(model="sim", messages=messages).choices[0].message.content
        with lock:
            replies.append(text)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(replies) == 6 and len(set(replies)) == 1


def test_many_clients_connecting_at_once_are_all_queued_while_the_server_is_busy() -> None:
    """Clients with many calls in flight connect at once. While the accepting thread waits (here: the
    server does not accept at all), the kernel queues connections only up to the listen backlog;
    beyond it they are dropped and a client's kernel retries after a second (Python's default backlog
    is 5, which admitted 6 of these 20)."""
    server = make_server(port=0)
    sockets = [socket.socket() for _ in range(20)]
    try:
        connected = 0
        for sock in sockets:
            sock.settimeout(0.5)
            try:
                sock.connect(server.server_address)
                connected += 1
            except OSError:
                pass
        assert connected == len(sockets)
    finally:
        for sock in sockets:
            sock.close()
        server.server_close()
