"""Replies to the server's merge requests: plain summarisation under a length budget, or UID.

Plain summarisation drops instructions when clients learned different ones; the UID
merge keeps one sentence per distinct instruction (the paper's qualitative finding).
"""

from __future__ import annotations

from fedtextgrad_core.method.merging import MERGE_OPENING, UID_NAME, listed_prompts
from fedtextgrad_core.sim.catalogue import CATALOGUE, has_instruction, is_format_sentence
from fedtextgrad_core.text import split_sentences

# what the simulator recognises a merge request by, and a UID one: the server's own wording
MERGE_MARK = MERGE_OPENING

# --------------------------------------------------------------------------- merging


def _sentence_key(sentence: str) -> str:
    """Identity of a sentence for de-duplication: its catalogue entry, else its text."""
    lower = sentence.lower()
    for task, instructions in CATALOGUE.items():
        for ins in instructions:
            if has_instruction(lower, ins):
                return f"catalogue:{task}:{ins.id}"
    return "text:" + " ".join(lower.split())


def merge_reply(user: str) -> str:
    prompts = [p for p in listed_prompts(user) if p]
    if not prompts:
        return ""
    split = [split_sentences(p) for p in prompts]
    format_sentence = next((s for ss in split for s in ss if is_format_sentence(s)), None)
    if UID_NAME.lower() in user.lower():
        return _merge_uid(split, format_sentence)
    return _merge_summary(split, format_sentence, max(len(p) for p in prompts))


def _merge_uid(split: list[list[str]], format_sentence: str | None) -> str:
    """One sentence per distinct instruction, first-seen order, format last."""
    seen: set[str] = set()
    kept: list[str] = []
    for sentences in split:
        for sentence in sentences:
            if is_format_sentence(sentence):
                continue
            key = _sentence_key(sentence)
            if key not in seen:
                seen.add(key)
                kept.append(sentence)
    return " ".join(kept + ([format_sentence] if format_sentence else []))


def _merge_summary(split: list[list[str]], format_sentence: str | None, budget: int) -> str:
    """Round-robin sentences under a length budget, as a summariser that keeps the
    summary about as long as one input would: learned instructions that differ
    between clients do not all fit, so some are lost."""
    reserved = len(format_sentence) + 1 if format_sentence else 0
    kept: list[str] = []
    seen: set[str] = set()
    length = reserved
    rounds = max(len(s) for s in split)
    for position in range(rounds):
        for sentences in split:
            if position >= len(sentences) or is_format_sentence(sentences[position]):
                continue
            sentence = sentences[position]
            norm = " ".join(sentence.lower().split())
            if norm in seen:
                continue
            if length + len(sentence) + 1 > budget + 1:
                return " ".join(kept + ([format_sentence] if format_sentence else []))
            seen.add(norm)
            kept.append(sentence)
            length += len(sentence) + 1
    return " ".join(kept + ([format_sentence] if format_sentence else []))


