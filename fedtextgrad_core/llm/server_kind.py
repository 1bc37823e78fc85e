"""Which kind of server answers at an OpenAI-compatible base URL: llama.cpp, vLLM, SGLang, Ollama, OpenAI.

Each kind constrains a reply through its own request field and ignores the others silently, so the
kind decides what ``constraints.constraint_for`` sends. It is read from the ``owned_by`` of
``GET /v1/models``, which the start-up check fetches anyway (``llamacpp``, ``vllm``, ``sglang``,
Ollama's ``library``, OpenAI's ``openai``/``system``; docs/real-model.md, "Constrained rewrites"),
then from a few cheap probes (``/props``, ``/api/version``, ``/get_model_info``, ``/version``);
anything else is ``"unknown"`` and gets the plain request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from fedtextgrad_core.errors import LLMError
from fedtextgrad_core.llm.http import get_json

KINDS = ("llama.cpp", "vllm", "sglang", "ollama", "openai", "unknown")

# owned_by values that name the server outright (lower-cased)
_OWNERS = {
    "llamacpp": "llama.cpp",
    "llama.cpp": "llama.cpp",
    "vllm": "vllm",
    "sglang": "sglang",
    "library": "ollama",
    "ollama": "ollama",
    "openai": "openai",
    "system": "openai",
    "openai-internal": "openai",
    "openai-dev": "openai",
}
# hosts of the hosted OpenAI API (Azure OpenAI serves the same request fields)
_OPENAI_HOSTS = ("api.openai.com",)
_OPENAI_HOST_SUFFIXES = (".openai.azure.com",)
# an Ollama model name: [host/][namespace/]model:tag, with owned_by = the namespace
_OLLAMA_NAME = re.compile(r"^(?:[^/\s]+/)?(?P<namespace>[^/\s:]+)/[^/\s:]+:[^/\s:]+$")

PROBE_TIMEOUT_SECONDS = 2.0
PROBE_MAX_BYTES = 1_000_000  # of a probe's answer; a longer one tells nothing


def _server_root(base_url: str) -> str:
    """The server's own root: the base URL without a trailing ``/v1`` (the extra endpoints live there)."""
    root = (base_url or "").rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def _kind_from_host(base_url: str) -> str | None:
    host = (urlsplit(base_url or "").hostname or "").lower()
    if host in _OPENAI_HOSTS or host.endswith(_OPENAI_HOST_SUFFIXES):
        return "openai"
    return None


def _kind_from_model(model: Mapping[str, Any]) -> str | None:
    owner = model.get("owned_by")
    if not isinstance(owner, str):
        return None
    kind = _OWNERS.get(owner.strip().lower())
    if kind:
        return kind
    # Ollama with a model from a user namespace: owned_by repeats that namespace
    model_id = model.get("id")
    if isinstance(model_id, str):
        match = _OLLAMA_NAME.match(model_id)
        if match and match.group("namespace") == owner:
            return "ollama"
    return None


def _kind_from_headers(headers: Mapping[str, str] | None) -> str | None:
    """llama.cpp's server names itself in every response (``Server: llama.cpp``)."""
    if not headers:
        return None
    for name, value in headers.items():
        if name.lower() == "server" and "llama.cpp" in str(value).lower():
            return "llama.cpp"
    return None


def detect_kind(models_payload: Mapping[str, Any] | None, base_url: str, *, headers: Mapping[str, str] | None = None) -> str:
    """The server kind from the JSON of ``GET /v1/models`` (and the base URL); ``"unknown"`` if unsure.

    Pure: no network. The host ``api.openai.com`` wins; then ``owned_by`` of the listed models, where
    models that disagree make the answer ``"unknown"`` (a proxy in front of several servers cannot be
    constrained one way); then, only if no model names a kind, the response headers of that same GET.
    """
    by_host = _kind_from_host(base_url)
    if by_host:
        return by_host
    kinds: set[str] = set()
    data = models_payload.get("data") if isinstance(models_payload, dict) else None
    if isinstance(data, list):
        for model in data:
            if isinstance(model, Mapping):
                kind = _kind_from_model(model)
                kinds.add(kind or "unknown")
    # one answer only when every listed model names the same kind: a mixed list (a proxy, or an
    # unrecognised owner beside a known one) is not a safe basis for a server-specific field
    known = kinds - {"unknown"}
    if len(known) == 1 and "unknown" not in kinds:
        return known.pop()
    if not known:
        return _kind_from_headers(headers) or "unknown"
    return "unknown"


def _get_json(url: str, api_key: str, timeout: float) -> tuple[Any, Mapping[str, str]] | None:
    """GET ``url``; its JSON body and headers, or None on any failure (a probe must never raise).

    Through ``http.get_json``: a redirect to another origin is not followed, so the key stays home.
    """
    try:
        return get_json(url, api_key=api_key, timeout=timeout, max_bytes=PROBE_MAX_BYTES)
    except LLMError:
        return None


def probe_kind(base_url: str, api_key: str = "", timeout: float = PROBE_TIMEOUT_SECONDS) -> str:
    """Ask the server who it is: ``GET /v1/models`` first, then the kind-specific endpoints in turn.

    For an endpoint whose model list is not conclusive (e.g. a llama.cpp behind a proxy that drops
    ``owned_by``). At most five GETs, each bounded by ``timeout``; every failure just moves on.
    """
    root = _server_root(base_url)
    listed = _get_json(f"{root}/v1/models", api_key, timeout)
    payload, headers = listed if listed else (None, {})
    kind = detect_kind(payload if isinstance(payload, dict) else None, base_url, headers=headers)
    if kind != "unknown":
        return kind
    props = _get_json(f"{root}/props", api_key, timeout)  # llama.cpp: server properties
    if props and isinstance(props[0], dict) and ("default_generation_settings" in props[0] or "build_info" in props[0]):
        return "llama.cpp"
    version = _get_json(f"{root}/api/version", api_key, timeout)  # Ollama's native API
    if version and isinstance(version[0], dict) and isinstance(version[0].get("version"), str):
        return "ollama"
    info = _get_json(f"{root}/get_model_info", api_key, timeout)  # SGLang's native API
    if info and isinstance(info[0], dict) and "model_path" in info[0] and "is_generation" in info[0]:
        return "sglang"
    version = _get_json(f"{root}/version", api_key, timeout)  # vLLM
    if version and isinstance(version[0], dict) and isinstance(version[0].get("version"), str):
        return "vllm"
    return "unknown"


def probe_vllm_version(base_url: str, api_key: str = "", timeout: float = PROBE_TIMEOUT_SECONDS) -> str | None:
    """vLLM's version from ``GET /version`` (e.g. ``"0.10.1"``), or None.

    The constraint field changed name across vLLM versions (``guided_regex`` before 0.11,
    ``structured_outputs`` from 0.11; the old one was removed in 0.12), and either is ignored
    without an error where unknown, so the version decides which to send.
    """
    answer = _get_json(f"{_server_root(base_url)}/version", api_key, timeout)
    if answer and isinstance(answer[0], dict) and isinstance(answer[0].get("version"), str):
        return str(answer[0]["version"])
    return None
