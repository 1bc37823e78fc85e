"""Scoring a prompt on a set of examples, with requests in flight concurrently.

LLM calls dominate the cost, so the examples are answered in parallel up to the
endpoint's concurrency limit; the order of results never depends on timing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from fedtextgrad_core.data.examples import Example
from fedtextgrad_core.data.tasks import Task
from fedtextgrad_core.llm.engine import ChatEngine


@dataclass(frozen=True)
class Scores:
    correct: int
    total: int
    malformed: int  # replies with no usable answer (no answer line; no digit for last-number)
    seconds: float
    parser_disagreements: int = 0  # replies the other answer parser would score the other way (numeric tasks)
    # per example, in the order scored: its id (data/examples.py), right or not, unreadable or not. Only ids
    # and booleans: what a paired comparison needs, and nothing of an example or a reply
    example_ids: tuple[str, ...] = ()
    example_correct: tuple[bool, ...] = ()
    example_malformed: tuple[bool, ...] = ()

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def outcomes(self) -> dict[str, bool]:
        """Example id -> scored right (empty for scores recorded before per-example outcomes)."""
        return dict(zip(self.example_ids, self.example_correct))


def answer_all(engine: ChatEngine, prompt: str, questions: Sequence[str]) -> list[str]:
    """Replies to every question under ``prompt``, in question order."""
    return engine.map(lambda q: engine.generate(q, system_prompt=prompt), questions)


def score_replies(task: Task, replies: Sequence[str], examples: Sequence[Example],
                  parser: str = "answer-line") -> list[tuple[bool, bool]]:
    return [task.score(reply, example.answer, parser) for reply, example in zip(replies, examples)]


def disagreements(task: Task, replies: Sequence[str], examples: Sequence[Example]) -> int:
    """How many replies the two answer parsers score differently: how much the parser alone moves
    an accuracy. Word tasks have one parser only (0)."""
    if task.answer_kind != "number":
        return 0
    ours = score_replies(task, replies, examples, "answer-line")
    theirs = score_replies(task, replies, examples, "last-number")
    return sum(a[0] != b[0] for a, b in zip(ours, theirs))


def evaluate_prompt(engine: ChatEngine, task: Task, prompt: str, examples: Sequence[Example],
                    parser: str = "answer-line") -> Scores:
    start = time.perf_counter()
    replies = answer_all(engine, prompt, [example.question for example in examples])
    results = score_replies(task, replies, examples, parser)
    return Scores(
        correct=sum(correct for correct, _ in results),
        total=len(results),
        malformed=sum(malformed for _, malformed in results),
        seconds=time.perf_counter() - start,
        parser_disagreements=disagreements(task, replies, examples),
        example_ids=tuple(example.id for example in examples),
        example_correct=tuple(correct for correct, _ in results),
        example_malformed=tuple(malformed for _, malformed in results),
    )
