"""A hostile or compromised LLM endpoint redirects the probe to steal the site's API key.

The endpoint a site configures gets the site's key in every request's ``Authorization``
header. If it answers with a redirect (302, 307) to a host of the attacker's choosing, a client
that follows the redirect with its headers hands the key to that host. urllib, which these
requests used before, forwards ``Authorization`` on a redirect to any host; the requests of
the llm/ layer must not. Here the endpoint (``FakeLlamaCpp`` on one loopback port) redirects
its routes to a recording server on another origin (another port of 127.0.0.1, or
``localhost``), the client is given an API key, and the recording server must receive no
``Authorization`` header: not from the server-kind probes (``GET /v1/models``, ``/props``, ...),
not from the forced surprisal route (``POST /tokenize``, ``/completion``), not from the echo
route (``POST /v1/completions`` through the openai client, which follows redirects and relies
on httpx to drop the header across origins).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fedtextgrad_core.llm.server_kind import probe_kind
from fedtextgrad_core.llm.surprisal import SurprisalClient, forget_endpoints
from tests.support.recording_server import RecordingServer
from tests.support.surprisal_fakes import FakeLlamaCpp

KEY = "sk-site-secret-0123456789"
KEY_ENV = "FTG_REDIRECT_ATTACK_KEY"
PROBES = ("/v1/models", "/props", "/api/version", "/get_model_info", "/version")


@pytest.fixture(autouse=True)
def fresh_endpoints() -> Iterator[None]:
    forget_endpoints()
    yield
    forget_endpoints()


@pytest.fixture
def thief() -> Iterator[RecordingServer]:
    """The attacker's server: it keeps every request, headers included."""
    with RecordingServer() as server:
        yield server


@pytest.fixture
def endpoint() -> Iterator[FakeLlamaCpp]:
    """The endpoint the site configured, turned hostile by the test."""
    fake = FakeLlamaCpp()
    yield fake
    fake.close()


def stolen(thief: RecordingServer) -> list[str]:
    """What reached the attacker with a key, as 'METHOD /path: Authorization'."""
    return [f"{r.method} {r.path}: {value}" for r in thief.requests
            for name, value in r.headers.items() if name.lower() == "authorization"]


def location(thief: RecordingServer, host: str, path: str) -> str:
    return f"http://{host}:{thief.port}{path}"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])  # another port; another host and port
@pytest.mark.parametrize("status", [302, 307])
def test_the_server_kind_probe_keeps_the_key(endpoint, thief, status: int, host: str) -> None:
    """A hostile or compromised LLM endpoint redirects the probe to steal the site's API key: GET probes."""
    endpoint.redirects = {path: (status, location(thief, host, path)) for path in PROBES}
    assert probe_kind(endpoint.base_url, KEY, timeout=5) == "unknown"
    assert [path for path, _ in endpoint.requests] == list(PROBES)  # every probe was asked, and redirected
    assert stolen(thief) == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize("status", [302, 307])
@pytest.mark.parametrize("route", ["/tokenize", "/completion"])
def test_the_forced_surprisal_route_keeps_the_key(endpoint, thief, monkeypatch, route: str, status: int,
                                                  host: str) -> None:
    """A hostile or compromised LLM endpoint redirects the probe to steal the site's API key: llama.cpp's native POSTs."""
    monkeypatch.setenv(KEY_ENV, KEY)
    endpoint.redirects = {route: (status, location(thief, host, route))}
    client = SurprisalClient(endpoint.base_url, "toy", KEY_ENV, timeout=5, method="forced-next-token")
    assert client.measure("The cat sat.") is None
    asked = [headers for path, headers in endpoint.headers if path == route]
    assert asked and asked[0].get("Authorization") == f"Bearer {KEY}"  # the endpoint itself got the key...
    assert stolen(thief) == []  # ...and did not pass it on


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize("status", [302, 307])
def test_the_echo_surprisal_route_keeps_the_key(endpoint, thief, monkeypatch, status: int, host: str) -> None:
    """A hostile or compromised LLM endpoint redirects the probe to steal the site's API key: the openai client's POST."""
    monkeypatch.setenv(KEY_ENV, KEY)
    endpoint.redirects = {"/v1/completions": (status, location(thief, host, "/v1/completions"))}
    client = SurprisalClient(endpoint.base_url, "toy", KEY_ENV, timeout=5, bos_text="", method="echo-logprobs")
    assert client.measure("The cat sat.") is None
    assert [r.path for r in thief.requests] == ["/v1/completions"]  # the openai client followed the redirect...
    assert stolen(thief) == []  # ...without the key
