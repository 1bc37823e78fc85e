"""Where one model lives and how to ask it: the settings every backend reads."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit


@dataclass(frozen=True)
class EndpointSettings:
    """Where one model lives and how to sample from it (defaults: run/schema.py, the one table of settings)."""

    backend: str
    base_url: str
    model: str
    api_key_env: str  # the NAME of an environment variable; the key never enters config
    temperature: float
    max_tokens: int
    timeout: float
    concurrency: int
    max_retries: int
    retry_backoff: float  # seconds before the first retry; doubles each time
    cache_path: str  # empty: no reply cache
    sim_latency_ms: float
    server_kind: str  # auto, or the kind of server (llama.cpp, vllm, sglang, ollama, openai, unknown)
    startup_wait: float  # seconds the start-up check waits for a server that is not answering yet

    @property
    def simulated(self) -> bool:
        return self.backend == "sim"

    def describe(self) -> str:
        if self.backend == "sim":
            return "sim (simulated LLM, in-process)"
        return f"{self.model} at {shown_url(self.base_url)}"


def shown_url(url: str) -> str:
    """``url`` as it may be shown and written down: without a user, password, query or fragment, which
    may hold a key (a run config's URL cannot hold a user or password; a query may still)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
