"""Fitting prompt text into a token budget: count it, drop repeats, clip it, pack it in groups.

Why: with many clients the concatenated prompts overflow any context window, so the merge
(``merging.py``) keeps every text it sends or returns under ``merge-token-budget`` with these
helpers and says what it left out. Tokens are counted as the run folder's prompt metrics count
them (``text.count_tokens``), and text is cut only between sentences, keeping line breaks.
Details, and how much headroom to leave below a model's context: docs/method.md, "How the merge works".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fedtextgrad_core.text import Unit, count_tokens, join_units, sentence_units, split_sentences


def tokens(text: str) -> int:
    return count_tokens(text)[0]


def tokenizer_name() -> str:
    return count_tokens("")[1]


def sentence_key(sentence: str) -> str:
    """Two sentences are repeats when they differ only in case and spacing."""
    return " ".join(sentence.lower().split())


def joiner(texts: Sequence[str]) -> str:
    """What stands between whole prompts joined into one (concat): a line break, as the reference's
    concatenation; a blank line when a prompt has lines of its own."""
    return "\n\n" if any("\n" in text for text in texts) else "\n"


def distinct_sentences(texts: Sequence[str]) -> tuple[list[Unit], int]:
    """Every sentence of ``texts`` once, first-seen order, with its separator; and how many repeats
    were removed."""
    kept: list[Unit] = []
    seen: set[str] = set()
    repeats = 0
    between = joiner(texts)
    for text in texts:
        for position, (separator, sentence) in enumerate(sentence_units(text)):
            key = sentence_key(sentence)
            if key in seen:
                repeats += 1
                continue
            seen.add(key)
            kept.append((between if position == 0 else separator, sentence))
    return kept, repeats


def missing_sentences(cut: Sequence[str], prompt: str) -> list[str]:
    """The sentences of ``cut`` that ``prompt`` does not hold, each once: a sentence cut from
    one group's text may still have reached the merged prompt through another group."""
    present = {sentence_key(s) for s in split_sentences(prompt)}
    missing: list[str] = []
    for sentence in cut:
        key = sentence_key(sentence)
        if key not in present:
            present.add(key)
            missing.append(sentence)
    return missing


def clip_sentences(units: Sequence[Unit], max_tokens: int, suffix: str = "") -> tuple[str, list[str]]:
    """The text of the sentences, in order, that fit in ``max_tokens`` together with ``suffix``; and the
    sentences left out.

    A sentence that does not fit is skipped and later, shorter ones are still tried, so
    one long sentence does not cost every sentence after it. Token counts of single
    sentences add up exactly for the regex counter; for a BPE counter they are checked on
    the joined text and the last kept sentences are given up until it fits.
    """
    room = max_tokens - (tokens(suffix) if suffix else 0)
    units = list(units)
    keep = [False] * len(units)
    used = 0
    for index, (_, sentence) in enumerate(units):
        size = tokens(sentence)
        if used + size <= room:
            keep[index] = True
            used += size
    while any(keep) and tokens(_join([join_units(units, keep)], suffix)) > max_tokens:
        keep[max(i for i, k in enumerate(keep) if k)] = False
    dropped = [sentence for (_, sentence), kept in zip(units, keep) if not kept]
    return join_units(units, keep), dropped


def clip_text(text: str, max_tokens: int, suffix: str = "") -> tuple[str, list[str]]:
    """``text`` cut between sentences to fit in ``max_tokens`` with ``suffix``; unchanged if it fits."""
    if tokens(_join([text], suffix)) <= max_tokens:
        return text, []
    return clip_sentences(sentence_units(text), max_tokens, suffix)


def pack_groups(items: Sequence[str], fits: Callable[[Sequence[str]], bool]) -> list[list[str]]:
    """Consecutive groups of ``items``, each as large as ``fits`` allows (at least one item each).

    Greedy in order: when every item takes at most half of the room, every group but the
    last holds two or more items, so each round of merging at least nearly halves the count.
    """
    groups: list[list[str]] = []
    current: list[str] = []
    for item in items:
        if current and not fits(current + [item]):
            groups.append(current)
            current = []
        current.append(item)
    if current:
        groups.append(current)
    return groups


def _join(parts: Sequence[str], suffix: str) -> str:
    """The parts and the suffix as one text, for counting (the suffix as ``merging.with_format`` adds it)."""
    texts = [p for p in parts if p]
    return ("\n" if any("\n" in text for text in texts) else " ").join([*texts, *([suffix] if suffix else [])])
