"""Errors a user can act on, each phrased as one plain line."""

from __future__ import annotations

SHOWN_CHARS = 120  # of a refused value, in the one line that names it


class FedTextGradError(Exception):
    """Base class: anything raised on purpose by this project.

    ``shared``: the message as it may leave this process for another party (a client's error line
    goes to the server): without what it quotes of private data or of a server's answer. The full
    message stays in this process's own output."""

    def __init__(self, *args: object, shared: str | None = None) -> None:
        super().__init__(*args)
        self.shared = shared

    def shareable(self) -> str:
        return self.shared if self.shared is not None else str(self)


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
    """A failure that may pass (a connection refused, a timeout, HTTP 429 or 5xx): retried with backoff.
    ``retry_after``: the seconds the server asked to wait before the next request (a 429's Retry-After)."""

    def __init__(self, *args: object, shared: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(*args, shared=shared)
        self.retry_after = retry_after


class LLMTimeout(TransientLLMError):
    """A call that ran out of time: the server may still be busy with it, so a retry waits at least as long."""


class SimUnsupportedError(LLMError):
    """The simulated LLM was asked something it cannot answer (e.g. a GSM8K question)."""


class RefusedInput(FedTextGradError):
    """Input from another party (a prompt the server sent, an upload, a reply) that is refused as it is."""


class LeakageError(FedTextGradError):
    """A client refused to upload a prompt that quotes its own training data (leakage-guard = refuse)."""
