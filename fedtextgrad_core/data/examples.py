"""What every task's data looks like: questions with target answers, cut into splits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Example:
    """One question and its target answer, kept as text so that every task looks alike.

    ``id`` names it within its task's split ("object_counting/val/17": the 18th validation example of
    the reference split), stable across runs of the same split: the evaluations record outcomes by it,
    and two prompts are compared pair by pair on the ids both were scored on. It says where an example
    stands, not what it holds, so it may travel where the example may not."""

    question: str
    answer: str
    id: str = field(default="", compare=False)


def numbered(task: str, split: str, examples: Sequence[Example]) -> list[Example]:
    """``examples`` with their ids: task, split and position in the split."""
    return [replace(example, id=f"{task}/{split}/{index}") for index, example in enumerate(examples)]


@dataclass(frozen=True)
class Splits:
    """A task's train, validation and test examples."""

    task: str
    train: list[Example]
    val: list[Example]
    test: list[Example]
