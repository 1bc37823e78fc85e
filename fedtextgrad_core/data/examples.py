"""What every task's data looks like: questions with target answers, cut into splits."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One question and its target answer, kept as text so that every task looks alike."""

    question: str
    answer: str


@dataclass(frozen=True)
class Splits:
    """A task's train, validation and test examples."""

    task: str
    train: list[Example]
    val: list[Example]
    test: list[Example]
