"""LLM engines: one TextGrad ``EngineLM`` over either an OpenAI-compatible endpoint or the sim.

Everything above this module asks an engine for text and never cares which backend
answers: vLLM, Ollama, SGLang, llama.cpp's server and hosted APIs all speak the
OpenAI chat protocol, and the simulated LLM answers in-process through the same class.
Each engine counts its own calls and tokens (thread-safe) so clients can report cost.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .errors import ConfigError, LLMError
from .textgrad_import import tg

BACKENDS = ("sim", "openai")

# (messages) -> (reply text, prompt tokens, completion tokens)
ChatFn = Callable[[list[dict[str, str]]], tuple[str, int, int]]


@dataclass(frozen=True)
class EndpointSettings:
    """Where one model lives and how to sample from it."""

    backend: str = "sim"
    base_url: str = ""
    model: str = "sim"
    api_key_env: str = ""  # the NAME of an environment variable; the key never enters config
    temperature: float = 0.0
    max_tokens: int = 512
    timeout: float = 60.0
    concurrency: int = 8
    sim_latency_ms: float = 0.0

    def describe(self) -> str:
        if self.backend == "sim":
            return "sim (simulated LLM, in-process)"
        return f"{self.model} at {self.base_url}"


@dataclass
class Usage:
    """What an engine has spent; added up per client and per round."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0
    seconds: float = 0.0

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{key}": value for key, value in asdict(self).items()}


class ChatEngine(tg.EngineLM):
    """A TextGrad engine that sends (system, user) chat messages through ``chat``."""

    def __init__(self, settings: EndpointSettings, chat: ChatFn):
        self.settings = settings
        self.model_string = settings.model
        self._chat = chat
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(settings.concurrency)
        self.usage = Usage()

    def generate(self, prompt: str, system_prompt: str | None = None, **kwargs) -> str:
        messages = [{"role": "system", "content": system_prompt or self.system_prompt}]
        messages.append({"role": "user", "content": prompt})
        start = time.perf_counter()
        with self._slots:
            try:
                text, prompt_tokens, completion_tokens = self._chat(messages)
            except Exception:
                with self._lock:
                    self.usage.errors += 1
                raise
        with self._lock:
            self.usage.calls += 1
            self.usage.prompt_tokens += prompt_tokens
            self.usage.completion_tokens += completion_tokens
            self.usage.seconds += time.perf_counter() - start
        return text or ""

    def __call__(self, prompt: str, system_prompt: str | None = None, **kwargs) -> str:
        return self.generate(prompt, system_prompt=system_prompt, **kwargs)

    def take_usage(self) -> Usage:
        """Return what was spent since the last call and start counting afresh."""
        with self._lock:
            spent, self.usage = self.usage, Usage()
        return spent


def _sim_chat(settings: EndpointSettings) -> ChatFn:
    from .sim_llm import SimLLM, approx_tokens

    sim = SimLLM(latency_ms=settings.sim_latency_ms)

    def chat(messages: list[dict[str, str]]) -> tuple[str, int, int]:
        reply = sim.complete(messages)
        prompt_tokens = sum(approx_tokens(m["content"]) for m in messages)
        return reply, prompt_tokens, approx_tokens(reply)

    return chat


def api_key_for(settings: EndpointSettings, setting_name: str) -> str:
    """The API key from the environment variable the config names.

    Local servers (vLLM, Ollama, llama.cpp) accept any key, so no variable means a
    placeholder; a named variable that is not set is a configuration error.
    """
    if not settings.api_key_env:
        return "EMPTY"
    key = os.environ.get(settings.api_key_env)
    if not key:
        raise ConfigError(
            setting_name,
            settings.api_key_env,
            "the NAME of an environment variable that is set in this process (it is not set)",
        )
    return key


def _openai_chat(settings: EndpointSettings, key_setting: str) -> ChatFn:
    import openai

    client = openai.OpenAI(
        base_url=settings.base_url,
        api_key=api_key_for(settings, key_setting),
        timeout=settings.timeout,
        max_retries=2,
    )

    def chat(messages: list[dict[str, str]]) -> tuple[str, int, int]:
        try:
            response = client.chat.completions.create(
                model=settings.model,
                messages=messages,
                temperature=settings.temperature,
                max_tokens=settings.max_tokens,
            )
        except openai.APIError as exc:
            raise LLMError(f"LLM endpoint {settings.base_url} (model {settings.model}) failed: {exc}") from exc
        if not response.choices:
            raise LLMError(f"LLM endpoint {settings.base_url} returned no choices")
        usage = response.usage
        text = response.choices[0].message.content or ""
        return text, (usage.prompt_tokens if usage else 0), (usage.completion_tokens if usage else 0)

    return chat


def make_engine(settings: EndpointSettings, key_setting: str = "llm-api-key-env") -> ChatEngine:
    """The one way to get an engine; ``key_setting`` names the config key in errors."""
    if settings.backend == "sim":
        return ChatEngine(settings, _sim_chat(settings))
    if settings.backend == "openai":
        if not settings.base_url:
            raise ConfigError(key_setting.replace("api-key-env", "base-url"), "", "the URL of an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
        return ChatEngine(settings, _openai_chat(settings, key_setting))
    raise ConfigError(key_setting.replace("api-key-env", "backend"), settings.backend, "sim or openai")
