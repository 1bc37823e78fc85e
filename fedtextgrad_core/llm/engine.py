"""LLM engines: one TextGrad ``EngineLM`` over any registered chat backend.

Everything above this module asks an engine for text and never cares which backend
answers: vLLM, Ollama, SGLang, llama.cpp's server and hosted APIs all speak the
OpenAI chat protocol (``openai_transport.py``), and the simulated LLM answers
in-process through the same class. Backends register by name in the Python entry
point group ``fedtextgrad.backends`` (see pyproject.toml), so this module never
imports the simulator, and a new kind of server is one registration away.

The engine owns what every backend needs alike: a per-endpoint limit on requests in
flight, bounded retries with exponential backoff and jitter, the optional reply cache,
and thread-safe counts of calls, tokens, retries and seconds, so clients can report
what a round cost.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

from fedtextgrad_core.errors import ConfigError, LLMTimeout, TransientLLMError
from fedtextgrad_core.llm import waiting
from fedtextgrad_core.llm.cache import cache_key, open_cache
from fedtextgrad_core.llm.constraints import Constraint, constraint_for
from fedtextgrad_core.llm.endpoint import EndpointSettings
from fedtextgrad_core.llm.server_kind import KINDS as SERVER_KINDS
from fedtextgrad_core.llm.textgrad_adapter import EngineLM

BACKEND_GROUP = "fedtextgrad.backends"
BACKOFF_CAP_SECONDS = 8.0

# (messages[, constraint]) -> (reply text, prompt tokens, completion tokens)
ChatFn = Callable[..., tuple[str, int, int]]
# a backend registered in BACKEND_GROUP: (the endpoint, the setting naming its key) -> its chat function
BackendFactory = Callable[[EndpointSettings, str], ChatFn]
Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class Usage:
    """What an engine has spent; added up per client and per round."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    errors: int = 0  # calls that failed after their retries
    cache_hits: int = 0
    seconds: float = 0.0

    def add(self, other: Usage) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{key}": value for key, value in asdict(self).items()}


_slots: dict[tuple[str, str, int], threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


def endpoint_slots(settings: EndpointSettings) -> threading.BoundedSemaphore:
    """One limit on requests in flight per endpoint per process, shared by all its engines.

    Keyed by the server, not the model: forward and backward models served by one
    server share its limit.
    """
    key = (settings.backend, settings.base_url, settings.concurrency)
    with _slots_lock:
        return _slots.setdefault(key, threading.BoundedSemaphore(settings.concurrency))


_pools: dict[tuple[str, str, int], ThreadPoolExecutor] = {}
_in_pool = threading.local()  # set in pool workers, so a nested map runs inline instead of deadlocking


def _mark_worker() -> None:
    _in_pool.active = True


def endpoint_pool(settings: EndpointSettings) -> ThreadPoolExecutor:
    """Worker threads for concurrent calls to one endpoint, kept for the life of the process.

    A fresh pool per batch started its threads one by one, each start waiting for the
    new thread to get the GIL: on a busy 2-core machine that put tens of milliseconds
    before every batch's first request, on the critical path of every local step.
    Keyed like ``endpoint_slots``, with as many workers as requests may be in flight.
    """
    key = (settings.backend, settings.base_url, settings.concurrency)
    with _slots_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = ThreadPoolExecutor(max_workers=settings.concurrency, initializer=_mark_worker,
                                                    thread_name_prefix=f"llm-{settings.backend}")
        return pool


class ChatEngine(EngineLM):
    """A TextGrad engine that sends (system, user) chat messages through ``chat``."""

    def __init__(self, settings: EndpointSettings, chat: ChatFn):
        self.settings = settings
        self.model_string = settings.model
        self._chat = chat
        self._lock = threading.Lock()
        self._slots = endpoint_slots(settings)
        self._pool = endpoint_pool(settings)
        self._cache = open_cache(settings.cache_path) if settings.cache_path else None
        self._last = threading.local()
        self.usage = Usage()

    def map(self, work: Callable[[Item], Result], items: Iterable[Item]) -> list[Result]:
        """``work`` on every item, up to the endpoint's concurrency at once, results in item order."""
        items = list(items)
        if len(items) <= 1 or getattr(_in_pool, "active", False):
            return [work(item) for item in items]
        futures = [self._pool.submit(work, item) for item in items]
        try:
            return [future.result() for future in futures]
        finally:
            # on a failure, the items not started are dropped and the ones in flight are
            # waited for: nothing of this call keeps using the endpoint after it returns
            for future in futures:
                future.cancel()
            wait(futures)

    def cascade(self, work: Callable[[Item], Iterable[Item]], ready: Iterable[Item]) -> None:
        """``work`` on every ready item and on every item a ``work`` call hands back, up to the
        endpoint's concurrency at once, until none are left: a graph whose node may run only after
        others (TextGrad's backward pass) runs its independent branches side by side, each node
        handed back by the call that made it ready. Failures are handled as in ``map``."""
        pending = list(ready)
        if getattr(_in_pool, "active", False):
            while pending:  # inside a worker: one after another, in the order they became ready
                pending.extend(work(pending.pop(0)))
            return

        def run(item: Item) -> list[Item]:
            return list(work(item))

        running = {self._pool.submit(run, item) for item in pending}
        try:
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    running |= {self._pool.submit(run, item) for item in future.result()}
        finally:
            for future in running:
                future.cancel()
            wait(running)

    def last_reply(self) -> str:
        """The last reply this thread got: how callers inspect what a library call received."""
        return getattr(self._last, "reply", "")

    def _count(self, **spent: float) -> None:
        with self._lock:
            for key, value in spent.items():
                setattr(self.usage, key, getattr(self.usage, key) + value)

    @property
    def server_kind(self) -> str:
        """The kind of server behind this engine ('sim' for the simulator), as its start-up check found it."""
        return str(getattr(self._chat, "kind", self.settings.backend))

    @property
    def server_version(self) -> str | None:
        """The server's own version where it matters to a request (vLLM's), as the start-up check read it."""
        version = getattr(self._chat, "server_version", None)
        return version if isinstance(version, str) else None

    def _call_with_retries(self, messages: list[dict[str, str]], constraint: Constraint | None
                           ) -> tuple[str, int, int]:
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                with self._slots, waiting.watch(self):
                    return self._chat(messages, constraint) if constraint is not None else self._chat(messages)
            except TransientLLMError as exc:
                if attempt >= self.settings.max_retries:
                    gave_up = f" (gave up after {attempt + 1} attempts)"
                    raise TransientLLMError(f"{exc}{gave_up}", shared=f"{exc.shareable()}{gave_up}") from exc
                delay = min(BACKOFF_CAP_SECONDS, self.settings.retry_backoff * 2 ** attempt)
                delay *= random.uniform(0.5, 1.0)  # jitter: clients do not retry in lockstep
                if exc.retry_after is not None:  # a 429 that says how long to wait: wait that long
                    delay = max(delay, exc.retry_after)
                if isinstance(exc, LLMTimeout):
                    # the server may still be working on the request that timed out: sending it
                    # again at once would queue a second copy behind the first
                    delay = max(delay, time.monotonic() - started)
                time.sleep(delay)
                attempt += 1
                self._count(retries=1)

    def generate(self, prompt: str, system_prompt: str | None = None, constraint: Constraint | None = None,
                 **kwargs: Any) -> str:
        """TextGrad's call: the reply to ``prompt`` under ``system_prompt``. ``constraint`` asks the
        server to shape the reply (constraints.py); the reply comes back as plain tagged text."""
        messages = [{"role": "system", "content": system_prompt or self.system_prompt},
                    {"role": "user", "content": prompt}]
        key = None
        if self._cache is not None:
            s = self.settings
            shaped = [*messages, {"role": "constraint", "content": repr(sorted(constraint.body.items()))}] \
                if constraint is not None else messages
            key = cache_key(s.backend, s.base_url, s.model, s.temperature, s.max_tokens, shaped)
            cached = self._cache.get(key)
            if cached is not None:
                self._count(cache_hits=1)
                self._last.reply = cached[0]
                return cached[0]
        start = time.perf_counter()
        try:
            text, prompt_tokens, completion_tokens = self._call_with_retries(messages, constraint)
        except Exception:
            self._count(errors=1)
            raise
        self._count(calls=1, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    seconds=time.perf_counter() - start)
        if key is not None and self._cache is not None:
            self._cache.put(key, text or "", prompt_tokens, completion_tokens)
        self._last.reply = text or ""
        return text or ""

    def __call__(self, prompt: str, system_prompt: str | None = None, **kwargs: Any) -> str:
        return self.generate(prompt, system_prompt=system_prompt, **kwargs)

    def take_usage(self) -> Usage:
        """Return what was spent since the last call and start counting afresh."""
        with self._lock:
            spent, self.usage = self.usage, Usage()
        return spent

    def describe(self) -> str:
        return self.settings.describe()


class ConstrainedEngine(EngineLM):
    """TextGrad's optimizer engine with its reply constrained to ``<IMPROVED_VARIABLE>…</IMPROVED_VARIABLE>``.

    TextGrad calls ``engine(prompt, system_prompt=...)`` and cannot pass request fields, so this
    wrapper adds the server's constraint (constraints.py) to each call; calls, tokens and cache hits
    are counted on the wrapped engine.
    """

    def __init__(self, inner: ChatEngine, constraint: Constraint):
        self.inner = inner
        self.constraint = constraint
        self.model_string = inner.model_string

    def generate(self, prompt: str, system_prompt: str | None = None, **kwargs: Any) -> str:
        return self.inner.generate(prompt, system_prompt=system_prompt, constraint=self.constraint)

    def __call__(self, prompt: str, system_prompt: str | None = None, **kwargs: Any) -> str:
        return self.generate(prompt, system_prompt=system_prompt)

    def last_reply(self) -> str:
        return self.inner.last_reply()


def constrained(engine: ChatEngine, prompt: str, max_chars: int) -> ChatEngine | ConstrainedEngine:
    """The optimizer engine for rewriting ``prompt``: constrained when the server kind is known to take a
    constraint, else ``engine`` itself. The rewrite may be up to twice the prompt (at least 1,000 and at
    most ``max_chars`` characters), and it keeps to ASCII when the prompt does."""
    if engine.server_kind not in SERVER_KINDS:  # the simulator writes the tags on its own
        return engine
    body_chars = max(1, min(max_chars, max(1000, 2 * len(prompt))))
    constraint = constraint_for(engine.server_kind, body_chars, ascii_only=prompt.isascii(),
                                server_version=engine.server_version)
    return engine if constraint is None else ConstrainedEngine(engine, constraint)


@cache
def _backends() -> dict[str, EntryPoint]:
    return {entry.name: entry for entry in entry_points(group=BACKEND_GROUP)}


def backend_names() -> tuple[str, ...]:
    """The registered backends, the simulator first (it is the default)."""
    return tuple(sorted(_backends(), key=lambda name: (name != "sim", name)))


def make_engine(settings: EndpointSettings, key_setting: str = "llm-api-key-env") -> ChatEngine:
    """The one way to get an engine; ``key_setting`` names the config key in errors.

    The backend's factory ``(settings, key_setting) -> chat`` builds the transport and
    checks the endpoint once (an unreachable server fails here, in seconds).
    """
    entry = _backends().get(settings.backend)
    if entry is None:
        accepted = " or ".join(backend_names()) or (
            f"a backend registered in the entry point group {BACKEND_GROUP}; none is (is the project installed? "
            "pip install -e .)")
        raise ConfigError(key_setting.replace("api-key-env", "backend"), settings.backend, accepted)
    factory: BackendFactory = entry.load()
    return ChatEngine(settings, factory(settings, key_setting))
