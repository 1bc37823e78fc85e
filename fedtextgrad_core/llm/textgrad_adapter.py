"""Import TextGrad without its slow, unused LiteLLM dependency.

``import textgrad`` imports its experimental LiteLLM engine, which imports ``litellm``:
several seconds (docs/performance.md), plus an attempt to download a price list. We
never use that engine (our engines subclass ``EngineLM`` directly), so unless
LiteLLM was already imported we register a placeholder module for it. TextGrad's
own log file goes to a temporary folder instead of ``./logs`` in the working
directory, and only its warnings are logged: at INFO level it writes every prompt
and reply to disk, which costs time on the hot path and copies private examples into
a file nobody asked for.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile
import types
from typing import Any


def _placeholder_litellm() -> types.ModuleType:
    module = types.ModuleType("litellm")

    def completion(*args: object, **kwargs: object) -> None:
        raise RuntimeError("litellm is not used by fedtextgrad; use fedtextgrad_core.llm.engine engines")

    module.completion = completion  # type: ignore[attr-defined]
    return module


def _placeholder_experimental_engines() -> dict[str, types.ModuleType]:
    """Stand-ins for ``textgrad.engine_experimental``, whose package imports ``openai``.

    ``textgrad.engine`` imports only its LiteLLM engine from there, but the package's
    ``__init__`` also imports its OpenAI engine and with it the ``openai`` client: about half
    of the ClientApp's import time (docs/performance.md).
    Our own openai backend imports the client when an endpoint is first built, so a
    node on the sim never pays for it.
    """
    package = types.ModuleType("textgrad.engine_experimental")
    package.__path__ = []  # a package with nothing else in it
    engines = types.ModuleType("textgrad.engine_experimental.litellm")

    class LiteLLMEngine:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("textgrad's experimental engines are not used by fedtextgrad; "
                               "use fedtextgrad_core.llm.engine engines")

    engines.LiteLLMEngine = LiteLLMEngine  # type: ignore[attr-defined]
    package.litellm = engines  # type: ignore[attr-defined]
    return {package.__name__: package, engines.__name__: engines}


def import_textgrad() -> types.ModuleType:
    if "textgrad" not in sys.modules:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        os.environ.setdefault("TEXTGRAD_LOG_DIR", os.path.join(tempfile.gettempdir(), "textgrad-logs"))
        sys.modules.setdefault("litellm", _placeholder_litellm())
        for name, module in _placeholder_experimental_engines().items():
            sys.modules.setdefault(name, module)
    textgrad: types.ModuleType = importlib.import_module("textgrad")

    logging.getLogger("textgrad").setLevel(logging.WARNING)
    return textgrad


tg = import_textgrad()
# TextGrad's engine interface, which our engines implement (a name mypy can follow)
EngineLM: Any = tg.EngineLM
