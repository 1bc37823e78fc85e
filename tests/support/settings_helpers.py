"""Settings for tests, built from the one table of defaults (fedtextgrad_core/run/schema.py)."""

from __future__ import annotations

from dataclasses import replace

from fedtextgrad_core.llm.endpoint import EndpointSettings
from fedtextgrad_core.method.local_training import LocalSettings
from fedtextgrad_core.run.settings import default_endpoint, defaults


def endpoint(**changes: object) -> EndpointSettings:
    """The default forward endpoint (the simulated LLM) with ``changes``."""
    return default_endpoint(**changes)


def local(**changes: object) -> LocalSettings:
    """The default local-training settings with ``changes``."""
    return replace(defaults().local, **changes)  # type: ignore[arg-type]
