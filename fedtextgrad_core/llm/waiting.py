"""Progress while LLM calls wait: one line per endpoint every half minute, so a slow call is never silent.

A llama.cpp or Ollama server on a CPU can take minutes for one TextGrad optimizer call. Without a
word a user cannot tell a slow server from a hung run; with a line per endpoint saying how many
requests are in flight and how long the oldest has waited, they can.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

REPORT_EVERY_SECONDS = 30.0
CHECK_EVERY_SECONDS = 1.0

_lock = threading.Lock()
_ids = itertools.count()
_inflight: dict[int, tuple[str, float, float]] = {}  # call id -> (endpoint, started, timeout)
_reported: dict[str, float] = {}  # endpoint -> when it was last reported
_thread: threading.Thread | None = None
_say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731


def _watch() -> None:
    while True:
        time.sleep(CHECK_EVERY_SECONDS)
        now = time.monotonic()
        with _lock:
            calls = list(_inflight.values())
        by_endpoint: dict[str, list[tuple[float, float]]] = {}
        for endpoint, started, timeout in calls:
            by_endpoint.setdefault(endpoint, []).append((started, timeout))
        for endpoint, started_at in by_endpoint.items():
            oldest, timeout = min(started_at)
            waited = now - oldest
            if waited < REPORT_EVERY_SECONDS or now - _reported.get(endpoint, 0.0) < REPORT_EVERY_SECONDS:
                continue
            _reported[endpoint] = now
            limit = f" (timeout {timeout:.0f} s)" if timeout else ""
            _say(f"fedtextgrad: waiting for {endpoint}: {len(started_at)} request(s) in flight, the oldest for "
                 f"{waited:.0f} s{limit}")


@contextmanager
def watch(engine: Any) -> Iterator[None]:
    """Report this call while it runs longer than half a minute."""
    global _thread
    chat = getattr(engine, "_chat", None)
    describe = getattr(chat, "describe", None)
    endpoint = describe() if callable(describe) else engine.settings.describe()
    timeout = float(getattr(chat, "timeout", 0.0) or 0.0)
    call = next(_ids)
    with _lock:
        _inflight[call] = (endpoint, time.monotonic(), timeout)
        if _thread is None:
            _thread = threading.Thread(target=_watch, name="llm-waiting", daemon=True)
            _thread.start()
    try:
        yield
    finally:
        with _lock:
            _inflight.pop(call, None)
