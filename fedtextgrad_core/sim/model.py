"""The sim model: recognise the kind of request and dispatch it."""

from __future__ import annotations

import math
import time

from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.method.judge import FIELDS, JUDGE_INSTRUCTION
from fedtextgrad_core.sim.merging import MERGE_MARK, merge_reply
from fedtextgrad_core.sim.questions import answer_question, identify_task, match_question
from fedtextgrad_core.sim.textgrad_replies import BACKWARD_MARK, OPTIMIZER_MARK, feedback_reply, rewrite_reply


def approx_tokens(text: str) -> int:
    """Rough token count: one token per four characters, at least one.

    Good enough for usage accounting and cost comparisons between runs; it is not
    any real tokenizer, and the sim never needs an exact count.
    """
    return max(1, math.ceil(len(text or "") / 4))



# --------------------------------------------------------------------------- the model

_GENERIC_ANSWER = (
    "This is the sim backend, a deterministic test double. It answers object counting, "
    "word sorting and multistep arithmetic questions, and TextGrad feedback, optimizer "
    "and prompt-merge requests."
)


def _text(content: object) -> str:
    """Message content as text; OpenAI also allows a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "") if isinstance(part, dict) else str(part) for part in content
        )
    return "" if content is None else str(content)


class SimLLM:
    """A deterministic chat model for tests and demos (see the module docstring).

    Stateless apart from its configured latency, so one instance can serve many
    threads at once.
    """

    def __init__(self, latency_ms: float = 0.0):
        if latency_ms < 0:
            raise ValueError(f"latency_ms must be zero or more, got {latency_ms}")
        self.latency_ms = float(latency_ms)

    def complete(self, messages: list[dict[str, str]]) -> str:
        """Reply to OpenAI-style chat messages, after sleeping ``latency_ms``.

        Raises SimUnsupportedError for a task question the sim cannot answer (e.g. a
        GSM8K problem), so a run configured with the wrong task fails loudly instead
        of scoring zero.
        """
        if self.latency_ms:
            time.sleep(self.latency_ms / 1000.0)
        return respond(*split_messages(messages))


REQUEST_KINDS = ("answer", "feedback", "rewrite", "merge", "judge", "other")


def split_messages(messages: list[dict[str, str]]) -> tuple[str, str]:
    """(system text, the user message the reply answers) of OpenAI-style chat messages."""
    system = "\n".join(_text(m.get("content")) for m in messages if m.get("role") == "system")
    users = [_text(m.get("content")) for m in messages if m.get("role") == "user"]
    others = [_text(m.get("content")) for m in messages if m.get("role") != "system"]
    return system, users[-1] if users else others[-1] if others else ""


def request_kind(system: str, user: str) -> str:
    """Which of the four kinds of request this is (see ``REQUEST_KINDS``).

    The sim dispatches on it, and a served sim logs it per call, so a benchmark can
    rebuild a run's call structure (answers in parallel, feedback and rewrites in
    sequence, merges on the server) from what actually happened.
    """
    if BACKWARD_MARK in system:
        return "feedback"
    if OPTIMIZER_MARK in system:
        return "rewrite"
    if user.lstrip().startswith(MERGE_MARK):
        return "merge"
    if user.lstrip().startswith(JUDGE_INSTRUCTION[:60]):
        return "judge"
    task, _ = match_question(user)
    if task is not None or system.strip() or _looks_like_question(user):
        # A system prompt plus a user message is a task question; when it matches no
        # supported format, it belongs to an unsupported task.
        return "answer"
    return "other"


def respond(system: str, user: str) -> str:
    """The sim's reply to one system + user message pair (see :class:`SimLLM`)."""
    kind = request_kind(system, user)
    if kind == "feedback":
        return feedback_reply(user)
    if kind == "rewrite":
        return rewrite_reply(user)
    if kind == "merge":
        return merge_reply(user)
    if kind == "judge":
        return judge_reply(user)
    if kind == "answer":
        return answer_question(system, user)
    return _GENERIC_ANSWER


def judge_reply(user: str) -> str:
    """A judge that is always right: the reply's answer line scored against the ground truth in code."""
    fields: dict[str, str] = {}
    for index, name in enumerate(FIELDS):
        start = user.find(f"**{name}**: ")
        if start < 0:
            return "<ACCURACY> 0 </ACCURACY>"
        start += len(name) + 6
        end = user.find(f"\n**{FIELDS[index + 1]}**: ", start) if index + 1 < len(FIELDS) else len(user)
        fields[name] = user[start:end if end >= 0 else len(user)]
    question, gold, reply = (fields[name] for name in FIELDS)
    task = identify_task(question) or "object_counting"
    correct, _ = get_task(task).score(reply, gold.strip())
    return f"<ACCURACY> {1 if correct else 0} </ACCURACY>"


def _looks_like_question(user: str) -> bool:
    stripped = user.strip()
    return stripped.endswith("?") or stripped.endswith("=")
