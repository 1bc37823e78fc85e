"""The LLM judge of the reference code (``loss = judge``): is a reply's final prediction the target?

The reference scores word sorting and multistep arithmetic with TextGrad's multi-field,
token-parsed evaluation: a model reads the question, the ground truth and the reply and answers
``<ACCURACY> 1 </ACCURACY>`` or ``<ACCURACY> 0 </ACCURACY>``. The instruction, the field names and
the system prompt below are the reference's. Its verdict replaces exact match as the training
loss (the batch scores the keep-or-revert rule compares, and the 0/1 the feedback is computed
from); validation and test accuracy stay exact match in code, so runs stay comparable whatever
judge they used. A verdict that cannot be read counts as 0 and is counted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from fedtextgrad_core.data.examples import Example
from fedtextgrad_core.llm.engine import ChatEngine

JUDGE_SYSTEM_PROMPT = "You are an evaluation system that compares two variables."
JUDGE_INSTRUCTION = (
    "Below is a question from a question-answering task, the ground truth answer, and reasoning with the final "
    "prediction. Is the final prediction correct, i.e. the same as the ground truth answer? Say only 1 (yes) or 0 "
    "(no). Return your response within <ACCURACY> </ACCURACY> tags. e.g.<ACCURACY> 0 </ACCURACY> or "
    "<ACCURACY> 1 </ACCURACY>"
)
FIELDS = ("Question for the task", "Ground truth answer", "Reasoning and prediction from the language model")
_VERDICT = re.compile(r"<ACCURACY>\s*(\d+)\s*</ACCURACY>")


def judge_request(question: str, answer: str, reply: str) -> str:
    """The judge's message, laid out as TextGrad's multi-field evaluation lays it out."""
    values = (question, answer, reply)
    return JUDGE_INSTRUCTION + "".join(f"\n**{name}**: {value}" for name, value in zip(FIELDS, values))


def read_verdict(text: str) -> bool | None:
    """1 -> True, 0 -> False; None when the judge gave no readable verdict."""
    found = _VERDICT.search(text or "")
    if found is None:
        return None
    return found.group(1) == "1"


@dataclass
class Judge:
    """Verdicts on a batch of replies, asked concurrently of the judge's own endpoint."""

    engine: ChatEngine
    unreadable: int = 0  # verdicts that could not be read (counted as 0)

    def verdicts(self, examples: Sequence[Example], replies: Sequence[str]) -> list[bool]:
        texts = self.engine.map(
            lambda pair: self.engine.generate(judge_request(pair[0].question, pair[0].answer, pair[1]),
                                              system_prompt=JUDGE_SYSTEM_PROMPT),
            list(zip(examples, replies)))
        found = [read_verdict(text) for text in texts]
        self.unreadable += sum(verdict is None for verdict in found)
        return [bool(verdict) for verdict in found]
