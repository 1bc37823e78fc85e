"""Plain text handling shared by every layer: counting tokens and splitting sentences.

It sits below everything else because the merge (which must fit a token budget), the
prompt metrics (which report lengths) and the simulated LLM (which reads prompts
sentence by sentence) must count and split the same way.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Any

REGEX_TOKEN_PATTERN = r"\w+|[^\w\s]"
REGEX_TOKENIZER = f"regex:{REGEX_TOKEN_PATTERN}"
TIKTOKEN_ENCODING = "cl100k_base"
_TOKEN_RE = re.compile(REGEX_TOKEN_PATTERN)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Quoted spans inside which a sentence never ends: "..." and '...' (the latter only
# when the quote is not an apostrophe inside a word, e.g. "don't").
_QUOTED = re.compile(r"\"[^\"]*\"|(?<![A-Za-z])'[^'\n]*'(?![A-Za-z])")


def split_sentences(text: str) -> list[str]:
    """Split a prompt into sentences, never inside a quoted span like 'Answer: $VALUE'.

    The answer-format sentence must stay whole, or a merge could separate its quoted
    template from the rest and the reply format would be lost.
    """
    text = " ".join((text or "").split())
    if not text:
        return []
    protected = [(m.start(), m.end()) for m in _QUOTED.finditer(text)]
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        if any(lo < match.start() < hi for lo, hi in protected):
            continue
        sentences.append(text[start:match.start()])
        start = match.end()
    sentences.append(text[start:])
    return [s.strip() for s in sentences if s.strip()]


# A sentence of a text, and what stood before it: "" (the first), " " (the same line), or line breaks
# and the line's indentation (a list item, a new paragraph). Merges cut and join prompts by sentence;
# with the separators kept, the lists and paragraphs a prompt carries survive them.
Unit = tuple[str, str]


def sentence_units(text: str) -> list[Unit]:
    """(separator, sentence) for each sentence of ``text``, line by line: spaces inside a line are
    folded, line breaks kept (blank lines as one paragraph break), each line's indentation kept."""
    units: list[Unit] = []
    blank = False
    for line in (text or "").split("\n"):
        sentences = split_sentences(line)
        if not sentences:
            blank = blank or bool(units)
            continue
        indent = line[: len(line) - len(line.lstrip())]
        for position, sentence in enumerate(sentences):
            if not units:
                separator = ""
            elif position:
                separator = " "
            else:
                separator = ("\n\n" if blank else "\n") + indent
            units.append((separator, sentence))
        blank = False
    return units


def join_units(units: list[Unit], keep: list[bool] | None = None) -> str:
    """The text of the ``units`` kept (all by default). A line break before a unit left out moves to the
    next unit kept, so leaving a sentence out never joins two lines or two list items."""
    parts: list[str] = []
    carried = ""
    for index, (separator, sentence) in enumerate(units):
        if ("\n" in separator and "\n" not in carried) or not carried:
            carried = separator
        if keep is not None and not keep[index]:
            continue
        parts.append(("" if not parts else carried or " ") + sentence)
        carried = ""
    return "".join(parts)


def regex_tokens(text: str) -> list[str]:
    """The fallback tokenizer: ``\\w+`` runs and single non-space characters."""
    return _TOKEN_RE.findall(text)


@lru_cache(maxsize=1)
def _cached_tiktoken() -> Any:
    """tiktoken's encoding if its BPE file is already cached locally; never downloads.

    tiktoken fetches its vocabulary over HTTP on first use; its download function is
    swapped for one that refuses while the encoding loads, so a missing cache means
    ``None`` (and the regex fallback) rather than a network request.
    """
    try:
        import tiktoken
        import tiktoken.load as tiktoken_load
    except Exception:
        return None
    if not callable(getattr(tiktoken_load, "read_file", None)):
        return None  # not the tiktoken this guard was written for: do not risk a download

    def refuse(blobpath: str) -> bytes:
        raise OSError(f"not downloading {blobpath}")

    original = tiktoken_load.read_file
    tiktoken_load.read_file = refuse
    try:
        return tiktoken.get_encoding(TIKTOKEN_ENCODING)
    except Exception:
        return None
    finally:
        tiktoken_load.read_file = original


_tiktoken_lock = threading.Lock()


def count_tokens(text: str) -> tuple[int, str]:
    """(token count, tokenizer name) without an LLM: cached tiktoken, else the regex split."""
    with _tiktoken_lock:
        encoding = _cached_tiktoken()
    if encoding is not None:
        return len(encoding.encode(text, disallowed_special=())), f"tiktoken:{TIKTOKEN_ENCODING}"
    return len(regex_tokens(text)), REGEX_TOKENIZER
