"""The reasoning tasks: their prompts, answer formats and exact-match scoring.

Scoring is exact match in code, so a score never depends on a second model. Two answer
parsers are offered (``answer-parser``):

- ``answer-line`` (this project's default): the text after the last ``Answer:``; a reply
  without one is wrong and counted as malformed.
- ``last-number`` (the reference code's ``parse_integer_answer``, from DSPy): the last
  whitespace-separated token holding a digit, cut at its first ``.``, digits only, as an
  integer; applied to the reply and to the target alike, so minus signs are dropped and a
  reply without any digit reads as 0. Numeric tasks only.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass

from fedtextgrad_core.errors import ConfigError

NUMBER_FORMAT = (
    "The last line of your response should be of the following format: "
    "'Answer: $VALUE' where VALUE is a numerical value."
)
WORDS_FORMAT = (
    "The last line of your response should be of the following format: "
    "'Answer: $VALUE' where VALUE is the sorted words separated by single spaces."
)
# Heterogeneous federations share one prompt across tasks with different formats.
GENERIC_FORMAT = (
    "The last line of your response should be of the following format: "
    "'Answer: $VALUE' where VALUE is the final answer."
)
PROMPT_OPENING = "You will answer a reasoning question. Think step by step."

ANSWER_PARSERS = ("answer-line", "last-number")
_ANSWER_MARK = re.compile(r"answer\s*:", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Task:
    """One task: what the model is asked and how its reply is scored."""

    name: str
    answer_kind: str  # "number" or "words"
    format_instruction: str
    synthetic: bool  # whether the seeded generator and the sim backend support it

    @property
    def start_prompt(self) -> str:
        return f"{PROMPT_OPENING} {self.format_instruction}"

    def extract_answer(self, response: str) -> str | None:
        """The text after the last 'Answer:' in a reply, or None when there is none.

        None marks a malformed reply: it is scored wrong and counted, never guessed at.
        """
        text = response or ""
        # Only the last mark matters: keep one match, not a list of all of them, so a
        # reply that repeats "Answer:" a million times costs time, not memory.
        marks = deque(_ANSWER_MARK.finditer(text), maxlen=1)
        if not marks:
            return None
        # From the last mark to the end of its line (or of the next line, when the
        # mark ends a line), so "Answer: 5. Final answer: 6" gives "6", not "5".
        rest = text[marks[0].end():].lstrip()
        answer = rest.split("\n", 1)[0].strip().strip("*").strip()
        return answer or None

    def normalize(self, answer: str) -> str | None:
        """Canonical form of an answer or target, so that '15.0', '$15' and '15' agree."""
        if self.answer_kind == "number":
            found = _NUMBER.findall(answer.replace(",", "").replace("$", ""))
            if not found:
                return None
            value = float(found[0])
            if not math.isfinite(value):  # more than ~308 digits: no float holds it, so keep it as written
                return found[0].lstrip("0") or "0"
            return str(int(value)) if value == int(value) else str(value)
        words = re.sub(r"[^\w&'\-\s]", " ", answer.lower()).split()
        return " ".join(words) or None

    def score(self, response: str, target: str, parser: str = "answer-line") -> tuple[bool, bool]:
        """(correct, malformed) for one reply against its target, read with ``parser``."""
        if parser == "last-number":
            return last_number(response) == last_number(target), not any(c.isdigit() for c in response or "")
        answer = self.extract_answer(response)
        if answer is None:
            return False, True
        predicted = self.normalize(answer)
        return predicted is not None and predicted == self.normalize(target), False


def last_number(text: str) -> int:
    """The reference code's answer parser (``parse_integer_answer``), kept exactly as it behaves:
    the last whitespace-separated token holding a digit, cut at its first '.', digits only. No such
    token reads as 0, and a minus sign is dropped ('-5' reads as 5)."""
    tokens = [token for token in (text or "").split() if any(c.isdigit() for c in token)]
    if not tokens:
        return 0
    digits = "".join(c for c in tokens[-1].split(".")[0] if c.isdigit())
    return int(digits) if digits else 0


def check_parser(parser: str, task_names: list[str]) -> str:
    """``parser`` if it can read every task's answers; last-number reads numbers only."""
    if parser not in ANSWER_PARSERS:
        raise ConfigError("answer-parser", parser, ", ".join(ANSWER_PARSERS))
    words = [name for name in task_names if get_task(name).answer_kind != "number"]
    if parser == "last-number" and words:
        raise ConfigError("answer-parser", parser, f"answer-line for {', '.join(words)}, whose answers are words "
                          "(last-number reads numbers only)")
    return parser


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("object_counting", "number", NUMBER_FORMAT, synthetic=True),
        Task("word_sorting", "words", WORDS_FORMAT, synthetic=True),
        Task("multistep_arithmetic_two", "number", NUMBER_FORMAT, synthetic=True),
        Task("gsm8k", "number", NUMBER_FORMAT, synthetic=False),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError("task", name, ", ".join(TASKS)) from None


def format_for(task_names: list[str]) -> str:
    """The answer-format instruction of a prompt shared by ``task_names``."""
    formats = {get_task(name).format_instruction for name in task_names}
    return formats.pop() if len(formats) == 1 else GENERIC_FORMAT


def start_prompt_for(task_names: list[str]) -> str:
    return f"{PROMPT_OPENING} {format_for(task_names)}"
