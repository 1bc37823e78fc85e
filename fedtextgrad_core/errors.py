"""Errors a user can act on, each phrased as one plain line."""

from __future__ import annotations

SHOWN_CHARS = 120  # of a refused value, in the one line that names it


class FedTextGradError(Exception):
    """Base class: anything raised on purpose by this project."""


class ConfigError(FedTextGradError, ValueError):
    """A setting has a value that is not accepted.

    The message names the setting, the value given and what is accepted, so the
    run stops at start with one line a user can fix without reading code.
    """

    def __init__(self, setting: str, value: object, accepted: str):
        self.setting = setting
        self.value = value
        self.accepted = accepted
        shown = repr(value)
        if len(shown) > SHOWN_CHARS:  # a 5 MB value must not become a 5 MB line
            shown = f"{shown[:SHOWN_CHARS]}... ({len(shown)} characters)"
        super().__init__(f"setting '{setting}' = {shown} is not accepted; expected {accepted}")


class DataError(FedTextGradError):
    """A dataset file or folder is missing or not in the expected format."""


class LLMError(FedTextGradError):
    """An LLM endpoint could not give a usable answer (after retries, where retrying made sense)."""


class TransientLLMError(LLMError):
    """A failure that may pass (a connection refused, a timeout, HTTP 429 or 5xx): retried with backoff."""


class LLMTimeout(TransientLLMError):
    """A call that ran out of time: the server may still be busy with it, so a retry waits at least as long."""


class SimUnsupportedError(LLMError):
    """The simulated LLM was asked something it cannot answer (e.g. a GSM8K question)."""


class LeakageError(FedTextGradError):
    """A client refused to upload a prompt that quotes its own training data (leakage-guard = refuse)."""
