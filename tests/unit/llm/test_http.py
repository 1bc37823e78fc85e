"""The llm/ layer's JSON-over-HTTP helper (fedtextgrad_core.llm.http), against real servers on loopback.

Each test starts its own stdlib ``ThreadingHTTPServer`` (127.0.0.1, port 0, HTTP/1.1 so that
connections can be kept alive) and stops it at the end. What is checked: the request that
arrives (key, body, headers), how each failure is sorted (lasting, passing, final), one
client per origin reused across requests and threads, and redirects followed only within
the origin. The redirect attack itself: test_redirect_attack.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from fedtextgrad_core.errors import LLMError, LLMTimeout, TransientLLMError
from fedtextgrad_core.llm import http as llm_http
from fedtextgrad_core.llm.http import RouteUnsupported, get_json, post_json
from tests.support.llama_server import free_port


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int


# A route answers (status, extra headers, body bytes); it may sleep first.
Route = Callable[["Site", "Seen"], tuple[int, dict[str, str], bytes]]


@dataclass
class Site:
    """A loopback HTTP/1.1 server whose routes the test sets; it keeps every request it gets."""

    routes: dict[str, Route] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = Seen(self.command, self.path, dict(self.headers.items()),
                               self.rfile.read(length) if length else b"", self.client_address[1])
                site.seen.append(request)
                route = site.routes.get(self.path.split("?", 1)[0])
                status, headers, body = route(site, request) if route else json_answer(404, {"error": {
                    "code": 404, "message": "File Not Found"}})
                try:
                    self.send_response(status)
                    for name, value in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up waiting
                    pass

            do_GET = do_POST = _handle

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def json_answer(status: int, payload: Any, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return status, dict(headers), json.dumps(payload).encode()


def echo(site: Site, request: Seen) -> tuple[int, dict[str, str], bytes]:
    """The request as the server saw it."""
    return json_answer(200, {"method": request.method, "path": request.path, "body": request.body.decode()})


@pytest.fixture
def site() -> Iterator[Site]:
    server = Site(routes={"/echo": echo})
    yield server
    server.close()


# --- what is sent, what comes back ---------------------------------------------------------


def test_get_sends_the_key_and_reads_json_and_headers(site: Site) -> None:
    site.routes["/props"] = lambda s, r: json_answer(200, [1, "two"], Server="llama.cpp")
    payload, headers = get_json(site.url + "/props", api_key="sk-one", timeout=5)
    assert payload == [1, "two"]  # any JSON value, not only objects
    assert headers["server"] == "llama.cpp"
    assert site.seen[-1].headers["Authorization"] == "Bearer sk-one"
    assert site.seen[-1].headers["Accept"] == "application/json"
    get_json(site.url + "/props", timeout=5)
    assert "Authorization" not in site.seen[-1].headers  # no key, no header


def test_post_sends_the_body_as_the_json_module_writes_it(site: Site) -> None:
    body = {"content": "Think – step by step", "add_special": True, "logit_bias": [[5, 100.0]]}
    payload, _ = post_json(site.url + "/echo", body, api_key="sk-two", timeout=5)
    seen = site.seen[-1]
    assert seen.body == json.dumps(body).encode("utf-8") and payload["body"] == json.dumps(body)
    assert (seen.method, seen.headers["Content-Type"]) == ("POST", "application/json")
    assert seen.headers["Authorization"] == "Bearer sk-two"


# --- how failures are sorted ------------------------------------------------------------------


@pytest.mark.parametrize("status", [404, 405, 501])
def test_a_missing_route_is_lasting(site: Site, status: int) -> None:
    site.routes["/tokenize"] = lambda s, r: json_answer(status, {"error": {"message": "no such route here"}})
    with pytest.raises(RouteUnsupported, match=rf"^POST /tokenize at here answered HTTP {status}: no such route here$"):
        post_json(site.url + "/tokenize", {}, timeout=5, where="POST /tokenize at here")


@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_overload_and_server_errors_are_passing(site: Site, status: int) -> None:
    site.routes["/completion"] = lambda s, r: (status, {"Content-Type": "text/plain"}, b"  busy, try later \n")
    with pytest.raises(TransientLLMError, match=rf"answered HTTP {status}: busy, try later$") as caught:
        post_json(site.url + "/completion", {}, timeout=5)
    assert not isinstance(caught.value, LLMTimeout)


@pytest.mark.parametrize("status", [400, 401, 403, 409, 422])
def test_other_refusals_are_final(site: Site, status: int) -> None:
    site.routes["/completion"] = lambda s, r: (status, {}, b"")
    with pytest.raises(LLMError, match=rf"refused the request with HTTP {status}: \w") as caught:
        post_json(site.url + "/completion", {}, timeout=5)
    assert not isinstance(caught.value, TransientLLMError | RouteUnsupported)  # an empty body: the reason phrase


def test_an_error_body_is_read_only_so_far(site: Site) -> None:
    site.routes["/completion"] = lambda s, r: (400, {}, b"x" * 5_000_000)
    with pytest.raises(LLMError, match=r"HTTP 400: x{200}$"):
        post_json(site.url + "/completion", {}, timeout=5)


def test_an_unreachable_server_is_passing_not_a_timeout() -> None:
    with pytest.raises(TransientLLMError, match="the server is unreachable") as caught:
        get_json(f"http://127.0.0.1:{free_port()}/v1/models", timeout=5)
    assert not isinstance(caught.value, LLMTimeout)


def test_a_server_slower_than_the_timeout_is_a_timeout(site: Site) -> None:
    def slow(s: Site, r: Seen) -> tuple[int, dict[str, str], bytes]:
        time.sleep(4.0)
        return json_answer(200, {})

    site.routes["/completion"] = slow
    started = time.perf_counter()
    with pytest.raises(LLMTimeout, match=r"^POST /completion at x did not answer within 0.3 s$"):
        post_json(site.url + "/completion", {}, timeout=0.3, where="POST /completion at x")
    assert time.perf_counter() - started < 3.0  # gave up, rather than waiting for the answer (not a speed test)


def test_unusable_answers_and_urls_are_final(site: Site) -> None:
    site.routes["/text"] = lambda s, r: (200, {"Content-Type": "text/html"}, b"<html>hello</html>")
    site.routes["/big"] = lambda s, r: json_answer(200, {"data": "y" * 2000})
    site.routes["/deep"] = lambda s, r: (200, {}, b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(LLMError, match=r"answered with a body that is not JSON: b'<html>hello</html>'"):
        get_json(site.url + "/text", timeout=5)
    with pytest.raises(LLMError, match="answered with a body of more than 1,000 bytes"):
        get_json(site.url + "/big", timeout=5, max_bytes=1000)
    assert get_json(site.url + "/big", timeout=5, max_bytes=5000)[0]["data"] == "y" * 2000
    with pytest.raises(LLMError, match="not JSON"):
        get_json(site.url + "/deep", timeout=5)
    for url in ("127.0.0.1:8080/v1/models", "ftp://127.0.0.1/v1/models"):
        with pytest.raises(LLMError, match="not a usable URL") as caught:
            get_json(url, timeout=5)
        assert not isinstance(caught.value, TransientLLMError)


def test_a_key_that_cannot_be_a_header_is_refused_without_showing_it(site: Site) -> None:
    with pytest.raises(LLMError) as caught:
        get_json(site.url + "/echo", api_key="sk-sécret-ключ", timeout=5)
    assert "cannot be sent" in str(caught.value) and "ключ" not in str(caught.value)
    assert not site.seen


# --- connections --------------------------------------------------------------------------------


def test_one_client_per_origin_keeps_its_connection_alive(site: Site) -> None:
    assert llm_http.shared_client(httpx.URL(site.url + "/a")) is llm_http.shared_client(httpx.URL(site.url + "/b?x=1"))
    assert llm_http.shared_client(httpx.URL(site.url)) is not llm_http.shared_client(httpx.URL(f"http://localhost:{site.port}"))
    for _ in range(5):
        post_json(site.url + "/echo", {"n": 1}, timeout=5)
    assert len({seen.client_port for seen in site.seen}) == 1  # five requests, one TCP connection


def test_the_shared_client_serves_many_threads_at_once(site: Site) -> None:
    def slow_echo(s: Site, r: Seen) -> tuple[int, dict[str, str], bytes]:
        time.sleep(0.05)
        return echo(s, r)

    site.routes["/echo"] = slow_echo
    answers: list[Any] = []
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(5):
                answers.append(post_json(site.url + "/echo", {"k": k, "i": i}, timeout=10)[0]["body"])
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert sorted(answers) == sorted(json.dumps({"k": k, "i": i}) for k in range(8) for i in range(5))
    assert len({seen.client_port for seen in site.seen}) <= 8 < len(site.seen)  # connections were reused


# --- redirects ----------------------------------------------------------------------------------


def test_a_redirect_within_the_origin_is_followed_with_the_key(site: Site) -> None:
    site.routes["/v1/models"] = lambda s, r: (301, {"Location": "/v1/models/"}, b"")
    site.routes["/v1/models/"] = lambda s, r: json_answer(200, {"data": [{"id": "m", "owned_by": "vllm"}]})
    site.routes["/old/completion"] = lambda s, r: (307, {"Location": f"{s.url}/echo"}, b"")
    payload, _ = get_json(site.url + "/v1/models", api_key="sk-home", timeout=5)
    assert payload["data"][0]["owned_by"] == "vllm"
    answer, _ = post_json(site.url + "/old/completion", {"keep": "me"}, api_key="sk-home", timeout=5)
    assert answer == {"method": "POST", "path": "/echo", "body": json.dumps({"keep": "me"})}  # 307 keeps the POST
    assert [s.path for s in site.seen] == ["/v1/models", "/v1/models/", "/old/completion", "/echo"]
    assert all(s.headers["Authorization"] == "Bearer sk-home" for s in site.seen)  # same origin: the key goes


def test_a_redirect_loop_ends(site: Site) -> None:
    site.routes["/loop"] = lambda s, r: (302, {"Location": "/loop"}, b"")
    with pytest.raises(LLMError, match=f"redirected more than {llm_http.MAX_REDIRECTS} times"):
        get_json(site.url + "/loop", timeout=5)
    assert len(site.seen) == llm_http.MAX_REDIRECTS + 1


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_origin_is_not_followed(site: Site, status: int) -> None:
    other = Site(routes={"/echo": echo})
    try:
        site.routes["/tokenize"] = lambda s, r: (status, {"Location": f"http://localhost:{other.port}/echo"}, b"")
        with pytest.raises(LLMError, match=rf"redirected \(HTTP {status}\) to another origin, "
                                           rf"http://localhost:{other.port}; not followed") as caught:
            post_json(site.url + "/tokenize", {"content": "secret prompt"}, api_key="sk-home", timeout=5)
    finally:
        other.close()
    assert not isinstance(caught.value, TransientLLMError | RouteUnsupported)
    assert other.seen == []  # neither the key nor the prompt left the origin


def test_httpx_itself_drops_the_key_across_origins_when_it_follows() -> None:
    """What the echo route's openai client relies on (it follows redirects): httpx 0.29 removes
    ``Authorization`` when a redirect leaves the origin, and another port is another origin."""
    home, other = Site(routes={"/echo": echo}), Site(routes={"/echo": echo})
    try:
        home.routes["/same"] = lambda s, r: (302, {"Location": "/echo"}, b"")
        home.routes["/port"] = lambda s, r: (307, {"Location": f"http://127.0.0.1:{other.port}/echo"}, b"")
        home.routes["/host"] = lambda s, r: (307, {"Location": f"http://localhost:{home.port}/echo"}, b"")
        with httpx.Client(follow_redirects=True) as client:

            def key_that_arrived(path: str, landing: Site) -> str | None:
                before = len(landing.seen)
                assert client.get(home.url + path, headers={"Authorization": "Bearer sk-home"}).status_code == 200
                arrived = [seen for seen in landing.seen[before:] if seen.path == "/echo"]
                assert len(arrived) == 1
                return arrived[0].headers.get("Authorization")

            assert key_that_arrived("/same", home) == "Bearer sk-home"
            assert key_that_arrived("/port", other) is None  # 127.0.0.1, another port
            assert key_that_arrived("/host", home) is None  # the same port, but localhost: another host
    finally:
        home.close()
        other.close()
