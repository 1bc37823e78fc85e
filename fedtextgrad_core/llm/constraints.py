"""Constrain the optimizer's reply to ``<IMPROVED_VARIABLE>BODY</IMPROVED_VARIABLE>``, per server kind.

TextGrad takes the new prompt from between these tags and small models rarely write them; a server
that decodes under a grammar, regex or JSON schema can only produce the allowed shape. BODY is
non-empty, holds no ``<`` (so only the real closing tag ends it) and is bounded, and ``max_tokens``
is sent high enough that the closing tag always fits. The field each server kind reads, its
sources and the guarantees are in docs/real-model.md, "Constrained rewrites". A field a server does
not know is ignored without an error, so a wrong kind fails open: the reply is unconstrained.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedtextgrad_core.llm.server_kind import KINDS

OPEN_TAG = "<IMPROVED_VARIABLE>"
CLOSE_TAG = "</IMPROVED_VARIABLE>"
JSON_FIELD = "improved_variable"
SCHEMA_NAME = "improved_variable"  # OpenAI: [a-zA-Z0-9_-], at most 64 characters

TAG_BYTES = len(OPEN_TAG) + len(CLOSE_TAG)  # 39 ASCII bytes: at most 39 tokens
ASCII_BYTES_PER_CHAR = 1
UTF8_BYTES_PER_CHAR = 4
JSON_BYTES_PER_CHAR = 6  # the longest JSON string escape, \uXXXX
# {"improved_variable":"…"}: 24 fixed characters, and 5 whitespace gaps of at most 21 characters
# each in llama.cpp's JSON-schema grammar ('"\n" [ \t]{0,20}'): 129, rounded up for other converters
JSON_OVERHEAD_BYTES = 160

GRAMMAR_KINDS = ("llama.cpp", "vllm", "sglang")  # the reply is the tagged text itself
JSON_KINDS = ("ollama", "openai")  # the reply is JSON, unwrapped into the tagged text

VLLM_STRUCTURED_OUTPUTS_SINCE = (0, 11)  # structured_outputs accepted; guided_* removed in 0.12

# printable ASCII without '<': its first character also not a space (regex and GBNF spell the
# ranges the same way: ' '..';' and '='..'~')
_ASCII_FIRST = "!-;=-~"
_ASCII_REST = "\\t\\n -;=-~"


@dataclass(frozen=True)
class Constraint:
    """The extra request-body fields for one server kind, the ``max_tokens`` to send, and the reply decoder.

    ``body`` is merged into the chat-completions request (``extra_body=`` of the openai client, or
    ``apply``); ``max_tokens`` is the smallest limit under which the closing tag is always reached.
    """

    kind: str
    body_chars: int
    max_tokens: int
    body: dict[str, Any] = field(default_factory=dict)
    reply_format: str = "tagged"  # "tagged" or "json"

    def apply(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of ``request`` with the constraint fields merged in and ``max_tokens`` raised to the bound."""
        merged = {**request, **self.body}
        merged["max_tokens"] = max(int(request.get("max_tokens") or 0), self.max_tokens)
        return merged

    def unwrap(self, reply_text: str) -> str:
        """The tagged text of a reply: itself for grammar kinds; from ``{"improved_variable": …}`` for JSON kinds.

        A reply that does not parse, or whose value is empty or holds a tag, comes back unchanged, so
        the caller's tag parsing counts it as malformed exactly as it would any other bad reply.
        """
        if self.reply_format != "json":
            return reply_text
        try:
            data = json.loads(reply_text)
        except (TypeError, ValueError):
            return reply_text
        value = data.get(JSON_FIELD) if isinstance(data, dict) else None
        if not isinstance(value, str) or not value.strip() or OPEN_TAG in value or CLOSE_TAG in value:
            return reply_text
        return f"{OPEN_TAG}{value}{CLOSE_TAG}"


def well_formed(text: str) -> bool:
    """True for exactly ``<IMPROVED_VARIABLE>BODY</IMPROVED_VARIABLE>`` with a BODY that is not blank and holds no tag."""
    if not text.startswith(OPEN_TAG) or not text.endswith(CLOSE_TAG) or len(text) < TAG_BYTES:
        return False
    inner = text[len(OPEN_TAG): len(text) - len(CLOSE_TAG)]
    return bool(inner.strip()) and OPEN_TAG not in inner and CLOSE_TAG not in inner


def _version_tuple(version: str | None) -> tuple[int, ...] | None:
    """(0, 10, 1) from "0.10.1", "0.10.1.1", "0.11.0rc2" or "v0.11.0+cu128"; None if unreadable."""
    if not version:
        return None
    parts: list[int] = []
    for piece in version.strip().lstrip("vV").split("+")[0].split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
        if match.end() < len(piece):  # "0rc2": the numbers end here
            break
    return tuple(parts) or None


def tagged_regex(body_chars: int, ascii_only: bool = True) -> str:
    """The regular expression of a well-formed reply (vLLM and SGLang read it; Python's ``re`` agrees)."""
    rest = body_chars - 1
    if ascii_only:
        first, tail = f"[{_ASCII_FIRST}]", f"[{_ASCII_REST}]"
    else:
        first, tail = r"[^\s<]", r"[^<\x00-\x08\x0b-\x1f\x7f]"
    repeat = f"{tail}{{0,{rest}}}" if rest > 0 else ""
    return f"{OPEN_TAG}{first}{repeat}{CLOSE_TAG}"


def tagged_gbnf(body_chars: int, ascii_only: bool = True) -> str:
    """The GBNF grammar of a well-formed reply (llama.cpp's ``grammar`` field)."""
    rest = body_chars - 1
    if ascii_only:
        first, tail = f"[{_ASCII_FIRST}]", f"[{_ASCII_REST}]"
    else:
        first, tail = r"[^<\x00-\x20\x7F]", r"[^<\x00-\x08\x0B-\x1F\x7F]"
    repeat = f" rest{{0,{rest}}}" if rest > 0 else ""
    return (f'root ::= "{OPEN_TAG}" first{repeat} "{CLOSE_TAG}"\n'
            f"first ::= {first}\n"
            f"rest ::= {tail}\n")


def tagged_json_schema(body_chars: int | None) -> dict[str, Any]:
    """The JSON schema of ``{"improved_variable": "..."}``; lengths only when ``body_chars`` is given."""
    value: dict[str, Any] = {"type": "string",
                             "description": "The improved variable: plain text, without the tags."}
    if body_chars is not None:
        value.update(minLength=1, maxLength=body_chars)
    return {"type": "object", "properties": {JSON_FIELD: value},
            "required": [JSON_FIELD], "additionalProperties": False}


def _check(kind: str, body_chars: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"server kind {kind!r} is not one of {', '.join(KINDS)}")
    if not isinstance(body_chars, int) or isinstance(body_chars, bool) or body_chars < 1:
        raise ValueError(f"body_chars = {body_chars!r}: the improved prompt must be allowed at least 1 character")


def constraint_for(kind: str, body_chars: int, *, ascii_only: bool = True,
                   server_version: str | None = None) -> Constraint | None:
    """The constraint to send to a server of ``kind`` for a BODY of at most ``body_chars`` characters.

    None for ``"unknown"``: the caller sends the plain request. ``server_version`` matters only for
    vLLM, whose field was ``guided_regex`` before 0.11 (``server_kind.probe_vllm_version`` reads it);
    without it the current field ``structured_outputs`` is sent. ``ascii_only`` applies to the
    grammar kinds; the JSON kinds allow any character (their schema has no character rule).
    """
    _check(kind, body_chars)
    if kind == "unknown":
        return None
    if kind in GRAMMAR_KINDS:
        per_char = ASCII_BYTES_PER_CHAR if ascii_only else UTF8_BYTES_PER_CHAR
        max_tokens = TAG_BYTES + per_char * body_chars
        if kind == "llama.cpp":
            body: dict[str, Any] = {"grammar": tagged_gbnf(body_chars, ascii_only)}
        elif kind == "sglang":
            body = {"regex": tagged_regex(body_chars, ascii_only)}
        else:
            regex = tagged_regex(body_chars, ascii_only)
            version = _version_tuple(server_version)
            if version is not None and version < VLLM_STRUCTURED_OUTPUTS_SINCE:
                body = {"guided_regex": regex}
            else:
                body = {"structured_outputs": {"regex": regex}}
        return Constraint(kind, body_chars, max_tokens, body, "tagged")
    max_tokens = JSON_OVERHEAD_BYTES + JSON_BYTES_PER_CHAR * body_chars
    if kind == "ollama":
        schema = tagged_json_schema(body_chars)
        body = {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": SCHEMA_NAME, "schema": schema}}}
    else:  # openai: strict mode rejects keywords outside its subset, and minLength/maxLength are not in it
        schema = tagged_json_schema(None)
        body = {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": SCHEMA_NAME, "strict": True, "schema": schema}}}
    return Constraint(kind, body_chars, max_tokens, body, "json")


def body_chars_within(kind: str, max_tokens: int, *, ascii_only: bool = True) -> int:
    """The longest BODY whose constraint fits in ``max_tokens`` (0 if none does, or for ``"unknown"``).

    For a caller that starts from its token limit: ``constraint_for(kind, body_chars_within(kind, n))``
    then sends at most ``n`` tokens.
    """
    if kind not in KINDS:
        raise ValueError(f"server kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "unknown":
        return 0
    if kind in GRAMMAR_KINDS:
        per_char = ASCII_BYTES_PER_CHAR if ascii_only else UTF8_BYTES_PER_CHAR
        return max(0, (max_tokens - TAG_BYTES) // per_char)
    return max(0, (max_tokens - JSON_OVERHEAD_BYTES) // JSON_BYTES_PER_CHAR)
