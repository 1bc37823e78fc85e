"""JSON over HTTP for the llm/ layer's own requests: the server-kind probes and llama.cpp's native API.

The chat calls go through the ``openai`` client; the few requests it has no method for
(``GET /props``, ``POST /tokenize``, ...) come here, over one kept-alive ``httpx.Client`` per
origin. Failures are sorted like the transport's (``openai_transport.classify``), and redirects
are followed only within the asked origin, so the API key never reaches another host.
Details: docs/architecture.md, "JSON over HTTP".
"""

from __future__ import annotations

import atexit
import email.utils
import http.cookiejar
import json
import math
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import httpx

from fedtextgrad_core.errors import LLMError, LLMTimeout, TransientLLMError

MAX_REDIRECTS = 5
ERROR_DETAIL_BYTES = 2000  # of a refusal's body, for its message


class RouteUnsupported(LLMError):
    """The server has no such route (HTTP 404, 405 or 501): asking again will not help."""


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """A client shared by every caller keeps no cookies: each request stands alone."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False


_clients: dict[tuple[str, str, int | None], httpx.Client] = {}
_clients_lock = threading.Lock()


def _forget_clients_after_fork() -> None:
    """A forked child must not share its parent's sockets: it builds its own clients."""
    global _clients_lock
    _clients.clear()
    _clients_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_clients_after_fork)


@atexit.register
def close_clients() -> None:
    """Close every shared client and its kept-alive connections (at exit; the next request builds anew)."""
    with _clients_lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        client.close()


MAX_RETRY_AFTER_SECONDS = 120.0  # the longest wait a server's Retry-After is granted


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The seconds a ``Retry-After`` header asks for (a number, or an HTTP date), at most
    MAX_RETRY_AFTER_SECONDS; None when there is none or it cannot be read."""
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in: what must match for a redirect."""
    port = url.port if url.port is not None else {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, port


def shared_client(url: httpx.URL) -> httpx.Client:
    """The process's client for the origin of ``url``, built on first use (httpx clients are thread-safe)."""
    key = origin(url)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = httpx.Client(follow_redirects=False,
                                                  cookies=http.cookiejar.CookieJar(policy=_NoCookies()))
    return client


def get_json(url: str, *, api_key: str = "", timeout: float, where: str = "",
             max_bytes: int | None = None) -> tuple[Any, dict[str, str]]:
    """``GET url``: its JSON body (any JSON value) and its response headers (lower-cased; of a repeated one, the last)."""
    return request_json("GET", url, None, api_key=api_key, timeout=timeout, where=where, max_bytes=max_bytes)


def post_json(url: str, body: Any, *, api_key: str = "", timeout: float, where: str = "",
              max_bytes: int | None = None) -> tuple[Any, dict[str, str]]:
    """``POST url`` with ``body`` as JSON: the answer's JSON body and its response headers."""
    return request_json("POST", url, body, api_key=api_key, timeout=timeout, where=where, max_bytes=max_bytes)


def request_json(method: str, url: str, body: Any = None, *, api_key: str = "", timeout: float, where: str = "",
                 max_bytes: int | None = None) -> tuple[Any, dict[str, str]]:
    """One JSON request; raises the errors of the module doc, each naming ``where`` (default: method and URL).

    ``timeout`` bounds connecting and each read and write, as urllib's did. ``max_bytes``
    bounds the body read (``None``: no bound); a longer body is a final error.
    """
    where = where or f"{method} {url}"
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    content = None
    if body is not None:
        content = json.dumps(body).encode("utf-8")
        headers["Content-Type"] = "application/json"
    try:
        target = httpx.URL(url)
        client = shared_client(target)
        request = client.build_request(method, target, content=content, headers=headers, timeout=timeout)
    except httpx.InvalidURL as exc:
        raise LLMError(f"{where}: not a usable URL ({exc})") from exc
    except ValueError as exc:  # never show the value: a header may hold the API key
        raise LLMError(f"{where}: the request cannot be sent ({type(exc).__name__} in the URL or a header)") from exc
    try:
        status, reason, answer_headers, raw = _send(client, request, where, max_bytes)
    except httpx.TimeoutException as exc:
        raise LLMTimeout(f"{where} did not answer within {timeout:g} s") from exc
    except httpx.UnsupportedProtocol as exc:  # a setting to fix, not a server that may come back
        raise LLMError(f"{where}: not a usable URL ({exc})") from exc
    except httpx.TransportError as exc:
        raise TransientLLMError(f"{where}: the server is unreachable ({str(exc) or type(exc).__name__})") from exc
    except httpx.HTTPError as exc:  # e.g. a body that cannot be decoded
        raise LLMError(f"{where} gave an unusable answer: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if not 200 <= status < 300:
        detail = _error_detail(raw, reason)
        unquoted = " (the server's message is in this site's log)"  # what leaves the site quotes no answer
        if status in (404, 405, 501):
            raise RouteUnsupported(f"{where} answered HTTP {status}: {detail}", shared=f"{where} answered HTTP {status}")
        if status == 429 or status >= 500:
            wait = retry_after(answer_headers) if status == 429 else None
            raise TransientLLMError(f"{where} answered HTTP {status}: {detail}",
                                    shared=f"{where} answered HTTP {status}{unquoted}", retry_after=wait)
        raise LLMError(f"{where} refused the request with HTTP {status}: {detail}",
                       shared=f"{where} refused the request with HTTP {status}{unquoted}")
    try:
        return json.loads(raw.decode("utf-8", errors="replace")), answer_headers
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested deeper than Python's stack
        raise LLMError(f"{where} answered with a body that is not JSON: {raw[:120]!r}") from exc


def _send(client: httpx.Client, request: httpx.Request, where: str,
          max_bytes: int | None) -> tuple[int, str, dict[str, str], bytes]:
    """Send ``request``, following redirects within its origin only: (status, reason, headers, body)."""
    for _ in range(MAX_REDIRECTS + 1):
        response = client.send(request, stream=True)
        try:
            following = response.next_request  # set by httpx for a 301/302/303/307/308 with a Location
            if following is None:
                ok = 200 <= response.status_code < 300
                raw = _read(response, max_bytes if ok else ERROR_DETAIL_BYTES, where, truncate=not ok)
                return response.status_code, response.reason_phrase, dict(response.headers.multi_items()), raw
        finally:
            response.close()
        if origin(following.url) != origin(request.url):
            raise LLMError(f"{where} redirected (HTTP {response.status_code}) to another origin, "
                           f"{following.url.scheme}://{following.url.netloc.decode('ascii', errors='replace')}; "
                           f"not followed, so neither the API key nor the request goes there (set the base URL "
                           f"to the server that answers)")
        request = following
    raise LLMError(f"{where} was redirected more than {MAX_REDIRECTS} times")


def _read(response: httpx.Response, limit: int | None, where: str, truncate: bool) -> bytes:
    """The body, at most ``limit`` bytes: cut there when ``truncate``, else a longer body is an error."""
    if limit is None:
        return response.read()
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            if truncate:
                break
            raise LLMError(f"{where} answered with a body of more than {limit:,} bytes")
    return b"".join(chunks)[:limit]


def _error_detail(raw: bytes, reason: str) -> str:
    """A refusal's ``{"error": {"message": ...}}`` (llama.cpp, OpenAI), or the start of its body."""
    body = raw.decode("utf-8", errors="replace")
    try:
        message = json.loads(body).get("error", {}).get("message")
    except (ValueError, AttributeError):
        message = None
    if message:
        return str(message)
    return body.strip()[:200] or reason
