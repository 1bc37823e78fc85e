"""Replies to TextGrad's feedback (backward) and rewrite (optimizer) requests.

Feedback names the catalogue sentence that would have prevented the mistake; the
rewrite adds the most requested one, so the optimisation has a known best prompt.
"""

from __future__ import annotations

import re
from collections import Counter

from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.errors import SimUnsupportedError
from fedtextgrad_core.sim.catalogue import (
    CATALOGUE,
    FORMAT_INSTRUCTIONS,
    Instruction,
    has_answer_format,
    has_instruction,
    insert_instruction,
)
from fedtextgrad_core.sim.questions import SOLVERS, mistakes_firing, parse_question, solve

# --------------------------------------------------------------------------- TextGrad feedback

BACKWARD_MARK = "You are the gradient (feedback) engine"
OPTIMIZER_MARK = "You are part of an optimization system that improves text (i.e., variable)"

_NO_CHANGE = (
    "The system prompt worked for this question: the response is correct and ends with "
    "the answer line in the required format, so no change is needed."
)
_GENERIC_FEEDBACK = (
    "No specific problem found. Keep the variable focused on the task and make sure "
    "the answer format is stated clearly."
)


def _span(text: str, tag: str) -> str | None:
    match = re.search(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
    return match.group(1).strip() if match else None


def feedback_reply(user: str) -> str:
    prompt, question_text, output = (_span(user, t) for t in ("LM_SYSTEM_PROMPT", "LM_INPUT", "LM_OUTPUT"))
    if prompt is not None and question_text is not None and output is not None:
        return _prompt_feedback(prompt, question_text, output)
    if "<INPUTS_TO_FUNCTION>" in user:
        result = (_span(user, "OUTPUT_OF_FUNCTION") or "").strip().lower()
        if result in ("1", "1.0", "true", "correct", "yes"):
            return "The prediction is correct: it matches the ground truth answer, so no change is needed."
        return (
            "The prediction is wrong: it does not match the ground truth answer. The response "
            "must reach the correct value and end with the answer line in the required format."
        )
    return _GENERIC_FEEDBACK


def _prompt_feedback(prompt: str, question_text: str, output: str) -> str:
    try:
        question = parse_question(question_text)
    except SimUnsupportedError:
        return _GENERIC_FEEDBACK
    task = get_task(question.task)
    _, target = solve(question)
    correct, malformed = task.score(output, target)
    if correct and not malformed:
        return _NO_CHANGE
    if not has_answer_format(prompt):
        return (
            "The response has no final answer line in the expected format, because the system "
            "prompt does not state the answer format. Adding the instruction "
            f'"{task.format_instruction}" to the end of the system prompt can fix this error.'
        )
    firing = mistakes_firing(prompt, question)
    if not firing:
        # The output came from elsewhere (e.g. another model): point at the first
        # missing instruction this question is prone to, if any.
        susceptible = SOLVERS[question.task][1](question.data)
        lower = prompt.lower()
        firing = [i for i in CATALOGUE[question.task] if susceptible.get(i.id) and not has_instruction(lower, i)]
    if not firing:
        return (
            "The response is wrong although the system prompt covers the known pitfalls; "
            "asking the model to check its work step by step may help."
        )
    ins = firing[0]
    return (
        f"The response went wrong because the system prompt does not say {ins.topic}: the "
        f"model {ins.mistake}. Adding the instruction \"{ins.sentence}\" to the system "
        "prompt can fix this error."
    )


# --------------------------------------------------------------------------- TextGrad optimizer


def _candidates() -> list[tuple[str, str | None, Instruction | None]]:
    """Every sentence an optimiser may add: format sentences first, then the catalogues."""
    out: list[tuple[str, str | None, Instruction | None]] = [(s, None, None) for s in FORMAT_INSTRUCTIONS]
    for task, instructions in CATALOGUE.items():
        out += [(ins.sentence, task, ins) for ins in instructions]
    return out


def rewrite_reply(user: str) -> str:
    prompt = _span(user, "LM_SYSTEM_PROMPT")
    if prompt is None:
        prompt = _span(user, "VARIABLE") or ""
    feedback_spans = re.findall(r"<FEEDBACK>(.*?)</FEEDBACK>", user, re.DOTALL)
    feedback = "\n".join(feedback_spans) if feedback_spans else user
    counts: Counter[int] = Counter()
    order = _candidates()
    for index, (sentence, _, _) in enumerate(order):
        hits = feedback.count(f'"{sentence}"')
        if hits:
            counts[index] = hits
    lower = prompt.lower()
    chosen = None
    for index, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        sentence, _kind, ins = order[index]
        present = has_answer_format(prompt) if ins is None else (has_instruction(lower, ins) or sentence in prompt)
        if not present:
            chosen = sentence
            break
    new_prompt = insert_instruction(prompt, chosen) if chosen else prompt
    return f"<IMPROVED_VARIABLE>{new_prompt}</IMPROVED_VARIABLE>"


