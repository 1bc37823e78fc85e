"""Scoring a prompt on a set of examples, with requests in flight concurrently.

LLM calls dominate the cost, so the examples are answered in parallel up to the
endpoint's concurrency limit; the order of results never depends on timing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from fedtextgrad_core.data.examples import Example
from fedtextgrad_core.llm.engine import ChatEngine
from fedtextgrad_core.data.tasks import Task


@dataclass(frozen=True)
class Scores:
    correct: int
    total: int
    malformed: int  # replies with no usable answer line
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def answer_all(engine: ChatEngine, prompt: str, questions: Sequence[str]) -> list[str]:
    """Replies to every question under ``prompt``, in question order."""
    return engine.map(lambda q: engine.generate(q, system_prompt=prompt), questions)


def score_replies(task: Task, replies: Sequence[str], examples: Sequence[Example]) -> list[tuple[bool, bool]]:
    return [task.score(reply, example.answer) for reply, example in zip(replies, examples)]


def evaluate_prompt(engine: ChatEngine, task: Task, prompt: str, examples: Sequence[Example]) -> Scores:
    start = time.perf_counter()
    replies = answer_all(engine, prompt, [example.question for example in examples])
    results = score_replies(task, replies, examples)
    return Scores(
        correct=sum(correct for correct, _ in results),
        total=len(results),
        malformed=sum(malformed for _, malformed in results),
        seconds=time.perf_counter() - start,
    )
