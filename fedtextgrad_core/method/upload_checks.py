"""Server-side checks of a client's uploaded prompt, before it may take part in a merge.

A client is not trusted: its upload is text that the server will save to disk, send to
its own summariser and hand back to every other client as part of the global prompt.
So an upload must be plain text of a bounded size. Anything else is rejected with a
reason that names what was wrong and what is accepted; the reason never repeats the
upload itself, which may be huge or hostile.
"""

from __future__ import annotations

import unicodedata

__all__ = ["ALLOWED_CONTROLS", "upload_problem"]

ALLOWED_CONTROLS = frozenset("\n\t")

# Characters that reorder how text is displayed (bidirectional overrides and isolates):
# they are not C0/C1 controls, but they let a prompt show one instruction to a reviewer
# and give another to a model, so they are refused with the controls.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def upload_problem(prompt: object, max_chars: int) -> str | None:
    """Why ``prompt`` may not be merged, or None when it may.

    Accepted: a non-empty ``str`` of at most ``max_chars`` characters whose only control
    characters are newlines and tabs.
    """
    if not isinstance(prompt, str):
        return f"the uploaded prompt is {type(prompt).__name__}, not text; a prompt must be a string"
    if not prompt.strip():
        return "the uploaded prompt is empty; a prompt must contain text"
    if len(prompt) > max_chars:
        return (f"the uploaded prompt has {len(prompt)} characters, more than max-prompt-chars = {max_chars}; "
                "raise max-prompt-chars or keep prompts shorter")
    for position, char in enumerate(prompt):
        if char in ALLOWED_CONTROLS:
            continue
        category = unicodedata.category(char)
        if category in ("Cc", "Cs") or char in _BIDI_CONTROLS:
            kind = "a surrogate code point" if category == "Cs" else "control character"
            return (f"the uploaded prompt contains {kind} U+{ord(char):04X} at position {position}; "
                    "only text with newlines and tabs is accepted")
    return None
