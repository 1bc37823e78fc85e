"""The OpenAI-compatible transport: one chat call, the start-up check, and error sorting.

vLLM, Ollama, SGLang, llama.cpp's server and hosted APIs all answer the OpenAI chat
protocol, so one client serves them all. Retrying is the engine's job (``engine.py``);
this module only says whether a failure is worth retrying: connection errors,
timeouts, 429 and 5xx are; other 4xx answers and unusable bodies are not.

The start-up check (``GET /models``) also tells which kind of server answers
(``server_kind.py``): that decides the request field that constrains a reply's format
(``constraints.py``) and, unless ``llm-timeout`` is set, how long a call may take. A
llama.cpp or Ollama server on a CPU reads a 1.5k-token TextGrad prompt for a minute or
more, so those get a long timeout; a GPU server or a hosted API a short one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedtextgrad_core.errors import ConfigError, LLMError, LLMTimeout, TransientLLMError
from fedtextgrad_core.llm.constraints import Constraint
from fedtextgrad_core.llm.endpoint import EndpointSettings, shown_url
from fedtextgrad_core.llm.http import retry_after
from fedtextgrad_core.llm.server_kind import detect_kind, probe_kind, probe_vllm_version

log = logging.getLogger(__name__)

CHECK_TIMEOUT_SECONDS = 5.0
STARTUP_POLL_SECONDS = 2.0
# Seconds per call when llm-timeout is 0 (auto), by server kind: local servers on a CPU are slow.
AUTO_TIMEOUT_SECONDS = {"llama.cpp": 900.0, "ollama": 900.0, "vllm": 300.0, "sglang": 300.0, "openai": 120.0,
                        "unknown": 600.0}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def api_key_for(api_key_env: str, setting_name: str) -> str:
    """The API key from the environment variable the config names.

    Local servers (vLLM, Ollama, llama.cpp) accept any key, so no variable means a
    placeholder; a named variable that is not set is a configuration error.
    """
    if not api_key_env:
        return "EMPTY"
    if not _ENV_NAME.fullmatch(api_key_env):  # never repeat the value: it may be the key itself
        raise ConfigError(setting_name, "<not shown>",
                          "the NAME of an environment variable (letters, digits and '_'), never the key itself")
    key = os.environ.get(api_key_env)
    if not key:
        raise ConfigError(setting_name, api_key_env,
                          "the NAME of an environment variable that is set in this process (it is not set)")
    return key


def _describe(base_url: str, model: str) -> str:
    return f"LLM endpoint {shown_url(base_url)} (model {model})"


def _not_json(where: str, body: str, quote: bool = True) -> str:
    """A plain message for a 200 whose body is not an OpenAI-style JSON answer (``quote``: with its start)."""
    body = (body or "").strip()
    if not body:
        return f"{where} returned an empty body instead of a JSON answer"
    shown = f": {body[:120]!r}" if quote else ""
    return f"{where} returned a body that is not an OpenAI-style JSON answer{shown}"


def classify(exc: Exception, base_url: str, model: str) -> LLMError:
    """Turn an ``openai`` exception into a retryable or final error naming the endpoint."""
    import openai

    where = _describe(base_url, model)
    if isinstance(exc, openai.APITimeoutError):
        return LLMTimeout(f"{where} did not answer in time")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return TransientLLMError(f"{where} is unreachable: {cause}")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        detail = str(exc.message)[:300]
        # what leaves the site (a client's error line) never quotes the server's answer: it may echo the request
        unquoted = " (the server's message is in this site's log)"
        if status == 429 or status >= 500:
            wait = retry_after(exc.response.headers) if status == 429 else None
            return TransientLLMError(f"{where} answered HTTP {status}: {detail}",
                                     shared=f"{where} answered HTTP {status}{unquoted}", retry_after=wait)
        return LLMError(f"{where} refused the request with HTTP {status}: {detail}",
                        shared=f"{where} refused the request with HTTP {status}{unquoted}")
    if isinstance(exc, json.JSONDecodeError):  # the body was declared JSON but is not
        return LLMError(_not_json(where, exc.doc), shared=_not_json(where, exc.doc, quote=False))
    return LLMError(f"{where} returned an unusable response: {type(exc).__name__}: {str(exc)[:300]}",
                    shared=f"{where} returned an unusable response ({type(exc).__name__})")




_models_lock = threading.Lock()
_models_built = False


def _build_response_models() -> None:
    """Build the client's chat response models once per process, before any concurrent call.

    The openai package defers building its pydantic models until first use, and that
    deferred build is not thread-safe: the first concurrent replies of a fresh process
    failed once with "BaseModel cannot be instantiated directly".
    """
    global _models_built
    import typing

    import pydantic
    from openai.types.chat import ChatCompletion

    def build(cls: Any, seen: set[type]) -> None:
        if cls in seen:
            return
        seen.add(cls)
        cls.__pydantic_core_schema__["type"]  # reading a deferred schema builds it
        todo = [field.annotation for field in cls.model_fields.values()]
        while todo:
            kind = todo.pop()
            if isinstance(kind, type) and issubclass(kind, pydantic.BaseModel):
                build(kind, seen)
            todo.extend(typing.get_args(kind))

    with _models_lock:
        if not _models_built:
            build(ChatCompletion, set())
            _models_built = True


_clients: dict[tuple[str, str], Any] = {}
_clients_lock = threading.Lock()


def shared_client(base_url: str, api_key: str) -> Any:
    """One ``openai.OpenAI`` client per endpoint per process, shared by every engine and thread.

    A client costs about a quarter of a second of CPU to build (it loads the CA bundle for
    its SSL context, even for plain http) and keeps its own connection pool. Clients build
    engines for every message, and three clients in one process hold the GIL for that in
    turn, so a fresh client per message cost more than an LLM call; a shared one also
    keeps its connections alive from one message to the next. httpx clients are thread-safe.
    Each call passes its own timeout.
    """
    import openai

    key = (base_url, api_key)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            # retries are ours (counted, with jitter); the client must not retry on its own
            client = _clients[key] = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    return client


@dataclass
class EndpointFacts:
    """What the start-up check learned about one endpoint, kept for the life of the process."""

    kind: str  # a server_kind.KINDS value
    served: list[str]
    version: str | None = None  # vLLM's own (GET /version): its constraint field changed at 0.11


_facts: dict[tuple[str, str], EndpointFacts] = {}
_facts_lock = threading.Lock()
# endpoints this process waited out llm-startup-wait for in vain: (until when not to wait again, the error)
_down: dict[tuple[str, str], tuple[float, LLMError]] = {}


class OpenAIChat:
    """Chat completions against one endpoint; a callable ``(messages, constraint) -> (text, tokens in, tokens out)``."""

    def __init__(self, base_url: str, model: str, api_key: str, temperature: float, max_tokens: int,
                 timeout: float, kind: str = "auto"):
        self.base_url, self.model = base_url, model
        self.temperature, self.max_tokens = temperature, max_tokens
        self.configured_timeout = timeout  # 0: chosen by the server kind once it is known
        self.configured_kind = kind
        self.kind = kind if kind != "auto" else "unknown"
        self.server_version: str | None = None  # vLLM's, once checked
        self.client = shared_client(base_url, api_key)
        _build_response_models()

    @property
    def timeout(self) -> float:
        return self.configured_timeout or AUTO_TIMEOUT_SECONDS.get(self.kind, AUTO_TIMEOUT_SECONDS["unknown"])

    def describe(self) -> str:
        return _describe(self.base_url, self.model)

    def __call__(self, messages: list[dict[str, str]], constraint: Constraint | None = None) -> tuple[str, int, int]:
        from openai.types.chat import ChatCompletion

        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "temperature": self.temperature, "max_tokens": self.max_tokens}
        if constraint is not None:
            body = constraint.apply(body)
        try:
            # the client's low-level post: the same request, error and response handling as
            # chat.completions.create, without its recursive type-driven transform of the
            # request, a large share of the CPU each call holds the GIL for (docs/performance.md)
            response = self.client.post("/chat/completions", body=body, cast_to=ChatCompletion,
                                        options={"timeout": self.timeout})
        except Exception as exc:  # every failure leaves here named and sorted
            raise classify(exc, self.base_url, self.model) from exc
        if isinstance(response, str):  # what the openai client hands back for a body that is not JSON
            where = _describe(self.base_url, self.model)
            raise LLMError(_not_json(where, response), shared=_not_json(where, response, quote=False))
        choices = getattr(response, "choices", None)
        choice = choices[0] if choices else None
        text = getattr(getattr(choice, "message", None), "content", None)
        if text is None:
            raise LLMError(f"{_describe(self.base_url, self.model)} returned a reply without message text")
        if constraint is not None:
            text = constraint.unwrap(text)
        usage = response.usage
        return text, (usage.prompt_tokens or 0) if usage else 0, (usage.completion_tokens or 0) if usage else 0

    def check(self, setting_name: str, startup_wait: float = 0.0, echo: Callable[[str], None] | None = None
              ) -> EndpointFacts:
        """Ask ``/models`` once, so a wrong URL fails in seconds instead of after every call's timeout,
        and learn the kind of server from its answer.

        A server that is not answering yet (a vLLM loading a large model refuses connections for
        minutes) is asked again every few seconds for up to ``startup_wait`` seconds, said once.
        A model missing from the served list is only logged: some servers (llama.cpp) answer to
        any model name.
        """
        deadline = time.monotonic() + startup_wait
        said = False
        while True:
            raw = None
            try:
                raw = self.client.with_options(timeout=CHECK_TIMEOUT_SECONDS).models.with_raw_response.list()
                payload = raw.http_response.json()
                served = [m.id for m in raw.parse()]
                break
            except Exception as exc:
                if raw is not None:  # an answer, but not a model list (e.g. a web page): say what came back
                    where, body = _describe(self.base_url, self.model), raw.http_response.text
                    error = LLMError(_not_json(where, body), shared=_not_json(where, body, quote=False))
                else:
                    error = classify(exc, self.base_url, self.model)
                # a server still loading refuses connections (vLLM) or answers 503: worth waiting for;
                # any other answer means the server is up and something else is wrong
                loading = isinstance(error, TransientLLMError) and (
                    "unreachable" in str(error) or "HTTP 503" in str(error))
                if loading and time.monotonic() < deadline:
                    if not said:
                        (echo or _say)(f"fedtextgrad: {self.describe()} is not answering yet ({error}); waiting up "
                                       f"to {startup_wait:.0f} s for it to come up (llm-startup-wait)")
                        said = True
                    time.sleep(STARTUP_POLL_SECONDS)
                    continue
                waited = f"; waited {startup_wait:.0f} s for it (llm-startup-wait)" if said else ""
                hint = (f" (checked with GET {self.base_url.rstrip('/')}/models; is the server running and is "
                        f"'{setting_name}' right?{waited})")
                raise LLMError(f"{error}{hint}", shared=f"{error.shareable()}{hint}") from exc
        if served and self.model not in served:
            log.warning("%s: model %r is not among the served models %s", self.base_url, self.model, served)
        kind = self.configured_kind
        if kind == "auto":
            kind = detect_kind(payload if isinstance(payload, dict) else None, self.base_url,
                               headers=dict(raw.http_response.headers))
            if kind == "unknown":
                kind = probe_kind(self.base_url, str(self.client.api_key))
        self.kind = kind
        version = probe_vllm_version(self.base_url, str(self.client.api_key)) if kind == "vllm" else None
        self.server_version = version
        return EndpointFacts(kind=kind, served=served, version=version)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def check_once(chat: OpenAIChat, setting_name: str, startup_wait: float = 0.0) -> EndpointFacts:
    """Check each endpoint once per process (clients build engines for every message); later chats
    to the same endpoint learn its kind from the first check. An endpoint waited out for
    ``startup_wait`` seconds in vain is not waited for again for as long: its error comes at once."""
    key = (chat.base_url, str(chat.client.api_key))
    with _facts_lock:
        facts = _facts.get(key)
        down = _down.get(key)
    if facts is None:
        if down is not None and time.monotonic() < down[0]:
            # waited out moments ago: the next request of the same message (a client answers a round's
            # evaluation and the next training in one process) fails at once instead of waiting again
            note = f" (this process has just waited for it in vain, and waits again only after {startup_wait:.0f} s)"
            raise LLMError(f"{down[1]}{note}", shared=f"{down[1].shareable()}{note}")
        began = time.monotonic()
        try:
            facts = chat.check(setting_name, startup_wait)
        except LLMError as error:
            if startup_wait > 0 and time.monotonic() - began >= startup_wait:
                with _facts_lock:
                    _down[key] = (time.monotonic() + startup_wait, error)
            raise
        with _facts_lock:
            _facts[key] = facts
            _down.pop(key, None)
    if chat.configured_kind == "auto":
        chat.kind = facts.kind
    chat.server_version = facts.version
    return facts


def openai_chat(settings: EndpointSettings, key_setting: str) -> OpenAIChat:
    """The ``openai`` backend: chat completions at ``settings.base_url``, checked once per process."""
    base_setting = key_setting.replace("api-key-env", "base-url")
    if not settings.base_url:
        raise ConfigError(base_setting, "", "the URL of an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    chat = OpenAIChat(settings.base_url, settings.model, api_key_for(settings.api_key_env, key_setting),
                      settings.temperature, settings.max_tokens, settings.timeout, settings.server_kind)
    check_once(chat, base_setting, settings.startup_wait)
    return chat
