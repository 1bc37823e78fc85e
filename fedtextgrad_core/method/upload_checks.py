"""Server-side checks of a client's uploaded prompt, before it may take part in a merge.

A client is not trusted: its upload is text that the server will save to disk, send to its own
summariser and hand back to every other client as part of the global prompt. So an upload must be
visible plain text of a bounded size: no control characters but newlines and tabs, and no invisible
format characters (zero-width spaces and joiners, bidirectional controls, Unicode tag characters,
which can hide instructions from a human reader while a model reads them, or split a quote so the
leakage guard does not see it). Anything else is rejected with a reason that names what was wrong
and what is accepted; the reason never repeats the upload itself. Clients hold the prompt the server
sends them to the same rule (``hidden_text_problem``).
"""

from __future__ import annotations

import unicodedata

__all__ = ["ALLOWED_CONTROLS", "hidden_text_problem", "upload_problem", "visible_only"]

ALLOWED_CONTROLS = frozenset("\n\t")


def hidden_text_problem(text: str, what: str = "the uploaded prompt") -> str | None:
    """Why ``text`` holds a character a reader cannot see or that controls the terminal, or None.

    Refused: C0/C1 controls but newline and tab (Unicode category Cc), surrogates (Cs), and every
    format character (Cf: zero-width spaces and joiners, bidirectional overrides and isolates, the
    tag characters U+E0000-U+E007F, soft hyphens, byte-order marks).
    """
    for position, char in enumerate(text):
        if char in ALLOWED_CONTROLS:
            continue
        category = unicodedata.category(char)
        if category in ("Cc", "Cs", "Cf"):
            kind = {"Cc": "the control character", "Cs": "the surrogate code point",
                    "Cf": "the invisible format character"}[category]
            name = unicodedata.name(char, "")
            return (f"{what} contains {kind} U+{ord(char):04X}{f' ({name})' if name else ''} at position "
                    f"{position}; only visible text with newlines and tabs is accepted")
    return None


def visible_only(text: str) -> str:
    """``text`` without the characters ``hidden_text_problem`` refuses: what a client does to its own
    rewrite before it uploads it (an optimizer may copy invisible characters from what it read)."""
    return "".join(char for char in text
                   if char in ALLOWED_CONTROLS or unicodedata.category(char) not in ("Cc", "Cs", "Cf"))


def upload_problem(prompt: object, max_chars: int) -> str | None:
    """Why ``prompt`` may not be merged, or None when it may.

    Accepted: a non-empty ``str`` of at most ``max_chars`` characters with no hidden characters
    (``hidden_text_problem``).
    """
    if not isinstance(prompt, str):
        return f"the uploaded prompt is {type(prompt).__name__}, not text; a prompt must be a string"
    if not prompt.strip():
        return "the uploaded prompt is empty; a prompt must contain text"
    if len(prompt) > max_chars:
        return (f"the uploaded prompt has {len(prompt)} characters, more than max-prompt-chars = {max_chars}; "
                "raise max-prompt-chars or keep prompts shorter")
    return hidden_text_problem(prompt)
