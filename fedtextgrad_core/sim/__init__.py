"""The "sim" backend: a deterministic, instant chat model. It is a test double, not an LLM.

Why it exists: federated prompt optimisation makes thousands of LLM calls, so the
project's tests, demos and benchmarks would be slow, costly and flaky against a
real model. The sim answers the same four kinds of request a real model gets in
this system, quickly and always the same way:

1. task questions (object counting, word sorting, multistep arithmetic), solved
   for real and then spoiled by *mistakes* that the system prompt can prevent (a
   system prompt that says "always answer X" is obeyed, as an injected instruction
   would be by a compliant model, so poisoned prompts do real damage);
2. TextGrad feedback (backward) requests, which name the instruction that would
   have prevented the mistake;
3. TextGrad optimizer (rewrite) requests, which add that instruction to the prompt;
4. prompt-merge requests from the server (plain summarise or UID merge).

The link between prompt and accuracy is an explicit *instruction catalogue*: each
entry is one sentence an optimiser can add, the phrases that detect it in a prompt,
the mistake it prevents, how often that mistake happens and which questions are
prone to it. A prompt's accuracy therefore rises only by learning catalogue
sentences, so an optimisation run has a known best prompt and the experiments'
qualitative effects (e.g. plain summarisation losing instructions) are reproducible.

Randomness comes only from a SHA-256 hash of the inputs, never from ``random`` or
Python's ``hash()`` (salted per process), so every process gives the same reply to
the same messages. The model holds no mutable state, so it is thread-safe.

The package: ``catalogue`` (instructions and prompt text), ``questions`` (parse,
solve, spoil), ``textgrad_replies`` (feedback and rewrites), ``merging`` (merge
requests) and ``model`` (dispatch).
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
