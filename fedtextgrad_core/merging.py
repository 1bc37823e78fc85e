"""Merging client prompts into one global prompt: concat, summarize, summarize-uid.

Following the paper's code, the task's answer-format instruction is stripped from
the client prompts and appended once to the result, so the format survives any
merge. The summariser sees each prompt ending with the format, as the merge request
asks it to keep that final instruction; a reply that drops it is repaired and
flagged. A summariser that returns nothing usable is not trusted: the merge falls
back to concatenation and says why.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ConfigError
from .llm import ChatEngine

log = logging.getLogger(__name__)

MERGE_METHODS = ("concat", "summarize", "summarize-uid")

MERGE_REQUEST = (
    "Merge the following list of prompts into a single, cohesive prompt while preserving all "
    "original information. Ensure that the final instruction remains unchanged and is placed as "
    "the last sentence. Provide only the merged prompt."
)
UID_REQUEST = (
    "Apply the Uniform Information Density principle: spread the information evenly across the "
    "merged prompt, keep one clear sentence for each distinct instruction, and remove redundancy "
    "so that no part is overloaded or padded."
)
MERGER_SYSTEM_PROMPT = "You merge system prompts for language models. Reply with the merged prompt only."


@dataclass(frozen=True)
class MergeResult:
    prompt: str
    method: str
    fallback_reason: str = ""  # why the LLM's merge was not used, if it was not
    format_repaired: bool = False  # the summariser dropped the answer format; it was re-appended


def check_method(method: str) -> str:
    if method not in MERGE_METHODS:
        raise ConfigError("merge", method, ", ".join(MERGE_METHODS))
    return method


def strip_format(prompt: str, format_instruction: str) -> str:
    return re.sub(r"\s+", " ", prompt.replace(format_instruction, " ")).strip()


def with_format(prompt: str, format_instruction: str) -> str:
    """``prompt`` with the format instruction exactly once, as its last sentence."""
    body = strip_format(prompt, format_instruction)
    return f"{body} {format_instruction}".strip()


def merge_request(prompts: Sequence[str], uid: bool) -> str:
    parts = [MERGE_REQUEST]
    if uid:
        parts.append(UID_REQUEST)
    listed = "\n".join(f"<PROMPT>{p}</PROMPT>" for p in prompts)
    return " ".join(parts) + "\n\n" + listed


def _clean_reply(reply: str) -> str:
    reply = re.sub(r"</?PROMPT>", " ", reply or "")
    return re.sub(r"\s+", " ", reply).strip()


def merge_prompts(prompts: Sequence[str], method: str, format_instruction: str,
                  engine: ChatEngine | None = None) -> MergeResult:
    """Merge ``prompts`` (at least one) with ``method``; LLM methods need ``engine``."""
    check_method(method)
    if not prompts:
        raise ValueError("no prompts to merge")
    bodies = [strip_format(p, format_instruction) for p in prompts]
    concatenated = with_format(" ".join(b for b in bodies if b), format_instruction)
    if method == "concat":
        return MergeResult(concatenated, method)
    if engine is None:
        raise ValueError(f"merge method {method} needs an LLM engine")
    # Each prompt as a client holds it: its instructions, then the format as the last
    # sentence, which the request asks the summariser to keep unchanged.
    shown = [with_format(b, format_instruction) for b in bodies]
    reply = _clean_reply(engine.generate(merge_request(shown, uid=method == "summarize-uid"),
                                         system_prompt=MERGER_SYSTEM_PROMPT))
    merged_body = strip_format(reply, format_instruction)
    reason = ""
    if not merged_body:
        reason = "the summariser returned an empty prompt" if not reply else "the summariser returned only the answer format"
    elif MERGE_REQUEST[:48] in merged_body:  # weak models copy the request into the "prompt"
        reason = "the summariser echoed the merge request instead of merging"
    if reason:
        log.warning("merge: %s; using the concatenated prompts instead", reason)
        return MergeResult(concatenated, method, fallback_reason=reason)
    repaired = format_instruction not in reply
    if repaired:
        log.info("merge: the summariser dropped the answer format; appending it again")
    return MergeResult(with_format(merged_body, format_instruction), method, format_repaired=repaired)
