"""The OpenAI-compatible transport: one chat call, the start-up check, and error sorting.

vLLM, Ollama, SGLang, llama.cpp's server and hosted APIs all answer the OpenAI chat
protocol, so one client serves them all. Retrying is the engine's job (``llm.py``);
this module only says whether a failure is worth retrying: connection errors,
timeouts, 429 and 5xx are; other 4xx answers and unusable bodies are not.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading

from fedtextgrad_core.errors import ConfigError, LLMError
from fedtextgrad_core.llm.endpoint import EndpointSettings

log = logging.getLogger(__name__)

CHECK_TIMEOUT_SECONDS = 5.0
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class TransientLLMError(LLMError):
    """A failure that may pass: the engine retries it with backoff."""


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
    return f"LLM endpoint {base_url} (model {model})"


def _not_json(where: str, body: str) -> str:
    """A plain message for a 200 whose body is not an OpenAI-style JSON answer."""
    body = (body or "").strip()
    if not body:
        return f"{where} returned an empty body instead of a JSON answer"
    return f"{where} returned a body that is not an OpenAI-style JSON answer: {body[:120]!r}"


def classify(exc: Exception, base_url: str, model: str) -> LLMError:
    """Turn an ``openai`` exception into a retryable or final error naming the endpoint."""
    import openai

    where = _describe(base_url, model)
    if isinstance(exc, openai.APITimeoutError):
        return TransientLLMError(f"{where} did not answer in time")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return TransientLLMError(f"{where} is unreachable: {cause}")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        detail = str(exc.message)[:300]
        if status == 429 or status >= 500:
            return TransientLLMError(f"{where} answered HTTP {status}: {detail}")
        return LLMError(f"{where} refused the request with HTTP {status}: {detail}")
    if isinstance(exc, json.JSONDecodeError):  # the body was declared JSON but is not
        return LLMError(_not_json(where, exc.doc))
    return LLMError(f"{where} returned an unusable response: {type(exc).__name__}: {str(exc)[:300]}")


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

    def build(cls: type, seen: set[type]) -> None:
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


_clients: dict[tuple[str, str, float], object] = {}
_clients_lock = threading.Lock()


def shared_client(base_url: str, api_key: str, timeout: float):
    """One ``openai.OpenAI`` client per endpoint per process, shared by every engine and thread.

    A client costs about a quarter of a second of CPU to build (it loads the CA bundle for
    its SSL context, even for plain http) and keeps its own connection pool. Clients build
    engines for every message, and three clients in one process hold the GIL for that in
    turn, so a fresh client per message cost more than an LLM call; a shared one also
    keeps its connections alive from one message to the next. httpx clients are thread-safe.
    """
    import openai

    key = (base_url, api_key, timeout)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            # retries are ours (counted, with jitter); the client must not retry on its own
            client = _clients[key] = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout,
                                                   max_retries=0)
    return client


class OpenAIChat:
    """Chat completions against one endpoint; a callable ``messages -> (text, tokens in, tokens out)``."""

    def __init__(self, base_url: str, model: str, api_key: str, temperature: float, max_tokens: int,
                 timeout: float):
        self.base_url, self.model = base_url, model
        self.temperature, self.max_tokens = temperature, max_tokens
        self.client = shared_client(base_url, api_key, timeout)
        _build_response_models()

    def __call__(self, messages: list[dict[str, str]]) -> tuple[str, int, int]:
        from openai.types.chat import ChatCompletion

        body = {"model": self.model, "messages": messages,
                "temperature": self.temperature, "max_tokens": self.max_tokens}
        try:
            # the client's low-level post: the same request, error and response handling as
            # chat.completions.create, without its recursive type-driven transform of the
            # request, which cost 2 of the 5 ms of CPU per call that clients hold the GIL for
            response = self.client.post("/chat/completions", body=body, cast_to=ChatCompletion)
        except Exception as exc:  # every failure leaves here named and sorted
            raise classify(exc, self.base_url, self.model) from exc
        if isinstance(response, str):  # what the openai client hands back for a body that is not JSON
            raise LLMError(_not_json(_describe(self.base_url, self.model), response))
        choices = getattr(response, "choices", None)
        choice = choices[0] if choices else None
        text = getattr(getattr(choice, "message", None), "content", None)
        if text is None:
            raise LLMError(f"{_describe(self.base_url, self.model)} returned a reply without message text")
        usage = response.usage
        return text, (usage.prompt_tokens or 0) if usage else 0, (usage.completion_tokens or 0) if usage else 0

    def check(self, setting_name: str) -> list[str]:
        """Ask ``/models`` once, so a wrong URL fails in seconds instead of after every call's timeout.

        Returns the served model names. A model missing from the list is only logged:
        some servers (llama.cpp) answer to any model name.
        """
        raw = None
        try:
            raw = self.client.with_options(timeout=CHECK_TIMEOUT_SECONDS).models.with_raw_response.list()
            served = [m.id for m in raw.parse()]
        except Exception as exc:
            if raw is not None:  # an answer, but not a model list (e.g. a web page): say what came back
                error = LLMError(_not_json(_describe(self.base_url, self.model), raw.http_response.text))
            else:
                error = classify(exc, self.base_url, self.model)
            raise LLMError(f"{error} (checked with GET {self.base_url.rstrip('/')}/models; "
                           f"is the server running and is '{setting_name}' right?)") from exc
        if served and self.model not in served:
            log.warning("%s: model %r is not among the served models %s", self.base_url, self.model, served)
        return served


_checked: set[tuple[str, str]] = set()
_checked_lock = threading.Lock()


def check_once(chat: OpenAIChat, setting_name: str) -> None:
    """Check each endpoint once per process: clients build engines for every message."""
    key = (chat.base_url, chat.client.api_key)
    with _checked_lock:
        if key in _checked:
            return
    chat.check(setting_name)
    with _checked_lock:
        _checked.add(key)


def openai_chat(settings: EndpointSettings, key_setting: str) -> OpenAIChat:
    """The ``openai`` backend: chat completions at ``settings.base_url``, checked once per process."""
    base_setting = key_setting.replace("api-key-env", "base-url")
    if not settings.base_url:
        raise ConfigError(base_setting, "", "the URL of an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    chat = OpenAIChat(settings.base_url, settings.model, api_key_for(settings.api_key_env, key_setting),
                      settings.temperature, settings.max_tokens, settings.timeout)
    check_once(chat, base_setting)
    return chat
