"""The client's leakage guard: find copied pieces of its own training data in a prompt.

An optimiser LLM that sees training questions may copy one into the prompt (as a worked example,
say), and the prompt is the one thing a client uploads. Before upload the client looks for runs of
``n`` or more tokens in a row that also occur in one of its training questions or answers, and then
redacts them, refuses to upload, or only counts them, as the site chose (``leakage-guard``).

Both texts are compared in a folded form, so a copy dressed up to look different still matches:
NFKC (fullwidth and mathematical letters, ligatures), invisible format characters removed (a
zero-width space inside a word), combining marks removed (accents added to letters), case folded,
and the common Latin look-alikes of Cyrillic and Greek letters mapped to Latin ones. Tokens are then
runs of letters and digits plus the arithmetic symbols ``+ - * / = ( )``; other punctuation is
ignored, so re-punctuating a quote does not hide it. What it cannot see: docs, security model.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fedtextgrad_core.data.examples import Example

__all__ = ["LEAKAGE_GUARDS", "LEAK_MARKER", "LeakCounts", "LeakReport", "find_leaks", "guard_prompt", "training_ngrams"]

LEAK_MARKER = "[redacted]"
LEAKAGE_GUARDS = ("redact", "refuse", "off")  # what a client does with an upload that quotes its training data
_TOKEN = re.compile(r"\w+|[-+*/=()]")
# Cyrillic and Greek letters (as case-folded) that look like Latin ones, mapped to them
LOOK_ALIKES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t",
    "у": "y", "х": "x", "ѕ": "s", "і": "i", "ј": "j", "ԁ": "d", "һ": "h", "ԛ": "q", "ԝ": "w", "ү": "y",
    "ӏ": "l", "ɡ": "g",
    "α": "a", "β": "b", "ε": "e", "ζ": "z", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x",
})

NGram = tuple[str, ...]


@dataclass(frozen=True)
class LeakCounts:
    """What the guard found in an upload, as numbers only: these travel to the server, the text never does."""

    passages: int = 0  # distinct verbatim passages (overlapping matches joined into one)
    ngrams: int = 0  # token windows of length n shared with a training example
    redactions: int = 0  # passages removed from the prompt
    longest: int = 0  # tokens in the longest passage


@dataclass(frozen=True)
class LeakReport:
    """What the guard found in one prompt, and the prompt it would upload."""

    prompt: str  # the prompt to upload: redacted when the guard redacts, else as given
    passages: int  # distinct verbatim passages (overlapping matches joined into one)
    ngrams: int  # token windows of length n shared with a training example
    redactions: int  # passages removed from the prompt
    longest: int  # tokens in the longest passage

    @property
    def counts(self) -> LeakCounts:
        return LeakCounts(self.passages, self.ngrams, self.redactions, self.longest)


def folded(text: str) -> tuple[str, list[int]]:
    """``text`` in the form the guard compares (module doc), and for each of its characters the
    position in ``text`` it came from (to redact the original characters)."""
    chars: list[str] = []
    origin: list[int] = []
    for position, char in enumerate(text or ""):
        if unicodedata.category(char) == "Cf":
            continue
        for part in unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", char)):
            if unicodedata.category(part) == "Mn":
                continue
            for piece in part.casefold().translate(LOOK_ALIKES):
                chars.append(piece)
                origin.append(position)
    return "".join(chars), origin


def _tokens(text: str) -> list[tuple[str, int, int]]:
    """(folded token, start, end in ``text``) of every token."""
    view, origin = folded(text)
    return [(m.group(0), origin[m.start()], origin[m.end() - 1] + 1) for m in _TOKEN.finditer(view)]


def training_ngrams(examples: Iterable[Example], n: int) -> set[NGram]:
    """Every run of ``n`` tokens in the questions and answers of ``examples``."""
    grams: set[NGram] = set()
    for example in examples:
        for text in (example.question, example.answer):
            words = [token for token, _, _ in _tokens(text)]
            grams.update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return grams


def find_leaks(prompt: str, grams: set[NGram], n: int) -> tuple[list[tuple[int, int]], int, int]:
    """Character spans of ``prompt`` copied from training text, the number of shared
    windows, and the longest passage in tokens. Overlapping or touching windows form one
    span, so a quoted question counts as one passage however long it is."""
    tokens = _tokens(prompt)
    words = [token for token, _, _ in tokens]
    runs: list[list[int]] = []  # [first token, last token] of each passage
    windows = 0
    for start in range(len(words) - n + 1):
        if tuple(words[start:start + n]) not in grams:
            continue
        windows += 1
        end = start + n - 1
        if runs and start <= runs[-1][1] + 1:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([start, end])
    spans = [(tokens[first][1], tokens[last][2]) for first, last in runs]
    longest = max((last - first + 1 for first, last in runs), default=0)
    return spans, windows, longest


def _redact(prompt: str, spans: Sequence[tuple[int, int]]) -> str:
    pieces, cursor = [], 0
    for start, end in spans:
        pieces += [prompt[cursor:start], LEAK_MARKER]
        cursor = end
    pieces.append(prompt[cursor:])
    return "".join(pieces)


def guard_prompt(prompt: str, train: Iterable[Example], n: int, mode: str) -> LeakReport:
    """Check ``prompt`` against the training examples; redact in mode 'redact'.

    Mode 'refuse' and 'off' leave the prompt as it is: refusing is the caller's move
    (it raises with the counts), and 'off' still counts, so a site that switched the
    guard off can see in its metrics what it would have caught.
    """
    spans, windows, longest = find_leaks(prompt, training_ngrams(train, n), n)
    redact = mode == "redact" and bool(spans)
    return LeakReport(
        prompt=_redact(prompt, spans) if redact else prompt,
        passages=len(spans),
        ngrams=windows,
        redactions=len(spans) if redact else 0,
        longest=longest,
    )
