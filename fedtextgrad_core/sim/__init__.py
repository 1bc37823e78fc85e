"""The "sim" backend: a deterministic, instant chat model. It is a test double, not an LLM.

Why: federated prompt optimisation makes thousands of LLM calls, and the project's tests,
demos and benchmarks would be slow, costly and flaky against a real model. The sim answers
the four kinds of request this system sends (task questions, TextGrad feedback and rewrites,
merges), and a prompt's accuracy rises only by learning the sentences of an instruction
catalogue, so a run has a known best prompt. Replies depend only on a hash of the inputs.
How it works and what each module holds: docs/architecture.md, "The simulated LLM".
"""

from fedtextgrad_core.sim.catalogue import (
    CATALOGUE,
    FORMAT_INSTRUCTIONS,
    Instruction,
    full_prompt,
    has_answer_format,
    insert_instruction,
    instructions_in,
)
from fedtextgrad_core.sim.model import SimLLM, approx_tokens, respond
from fedtextgrad_core.sim.questions import identify_task

__all__ = [
    "CATALOGUE",
    "FORMAT_INSTRUCTIONS",
    "Instruction",
    "SimLLM",
    "approx_tokens",
    "full_prompt",
    "has_answer_format",
    "identify_task",
    "insert_instruction",
    "instructions_in",
    "respond",
]
