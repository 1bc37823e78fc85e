"""Task questions: parse, solve for real, then spoil the answer with the mistakes that fire.

Whether a mistake fires depends on the system prompt (a missing instruction), on the
question (is it prone to that mistake) and on a stable hash of both, never on chance.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedtextgrad_core.data.lexicon import CATEGORIES, NOUN_CATEGORY, NUMBER_WORDS
from fedtextgrad_core.errors import SimUnsupportedError
from fedtextgrad_core.sim.catalogue import CATALOGUE, Instruction, has_answer_format, has_instruction

# --------------------------------------------------------------------------- hashing


def _unit(*parts: str) -> float:
    """A stable pseudo-random number in [0, 1) derived from the parts."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# --------------------------------------------------------------------------- task questions


@dataclass(frozen=True)
class _Question:
    task: str
    key: str  # whitespace-normalised question text, the hash input
    data: object


@dataclass(frozen=True)
class _Entry:
    text: str  # e.g. "four stoves"
    quantity: int
    category: str


@dataclass(frozen=True)
class _Counting:
    entries: tuple[_Entry, ...]
    category: str


_COUNTING = re.compile(r"I have (.+?)\.\s*How many ([a-z ]+?) do I have\?", re.IGNORECASE)
_SORTING = re.compile(r"Sort the following words alphabetically:\s*List:\s*([^\n]+)", re.IGNORECASE)
_ARITHMETIC = re.compile(r"(\([-\d\s()+*]*\))\s*=")
_ITEM_SPLIT = re.compile(r",\s*and\s+|,\s*|\s+and\s+")


def _unsupported(text: str) -> SimUnsupportedError:
    snippet = " ".join(text.split())[:60]
    return SimUnsupportedError(
        "the sim backend answers object counting, word sorting and multistep "
        f"arithmetic questions only; got: '{snippet}'"
    )


def _parse_counting(match: re.Match[str], text: str) -> _Counting:
    category = match.group(2).strip().lower()
    if category not in CATEGORIES:
        raise _unsupported(text)
    entries = []
    for part in _ITEM_SPLIT.split(match.group(1).strip()):
        words = part.strip().lower().split()
        if len(words) < 2 or words[0] not in NUMBER_WORDS:
            raise _unsupported(text)
        noun = " ".join(words[1:])
        if noun not in NOUN_CATEGORY:
            raise _unsupported(text)
        entries.append(_Entry(" ".join(words), NUMBER_WORDS[words[0]], NOUN_CATEGORY[noun]))
    return _Counting(tuple(entries), category)


def _parse_arithmetic(text: str) -> list[object]:
    match = _ARITHMETIC.search(text)
    if not match:
        raise _unsupported(text)
    # A '-' directly followed by a digit is a sign only when written without a space,
    # so tokenise from the raw text: "- -7" is minus, then negative seven.
    raw = match.group(1)
    tokens: list[object] = []
    for piece in re.findall(r"-\d+|\d+|[-+*()]", raw):
        if re.fullmatch(r"-\d+", piece) and tokens and (isinstance(tokens[-1], int) or tokens[-1] == ")"):
            tokens.extend(["-", int(piece[1:])])  # "5-3" written without spaces
        elif re.fullmatch(r"-?\d+", piece):
            tokens.append(int(piece))
        else:
            tokens.append(piece)
    try:
        _evaluate(tokens, left_to_right=False)
    except (ValueError, IndexError):
        raise _unsupported(text) from None
    if not any(t in ("+", "-", "*") for t in tokens):
        raise _unsupported(text)
    return tokens


def identify_task(question: str) -> str | None:
    """The task a question belongs to, from its format; None when it matches none."""
    return match_question(question)[0]


def match_question(text: str) -> tuple[str | None, re.Match[str] | None]:
    for task, pattern in (
        ("object_counting", _COUNTING),
        ("word_sorting", _SORTING),
        ("multistep_arithmetic_two", _ARITHMETIC),
    ):
        match = pattern.search(text)
        if match:
            return task, match
    return None, None


def parse_question(text: str) -> _Question:
    task, match = match_question(text)
    if task is None or match is None:
        raise _unsupported(text)
    key = " ".join(match.group(0).split())
    if task == "object_counting":
        return _Question(task, key, _parse_counting(match, text))
    if task == "word_sorting":
        words = tuple(match.group(1).split())
        if not words:
            raise _unsupported(text)
        return _Question(task, key, words)
    return _Question(task, key, tuple(_parse_arithmetic(text)))


# ----- solvers: each takes the set of mistakes that fire and returns (lines, value)


def _count(q: _Counting, mistakes: frozenset[str], key: str) -> tuple[list[str], str]:
    considered = [e for e in q.entries if "category" in mistakes or e.category == q.category]
    counts = [1 if "quantities" in mistakes else e.quantity for e in considered]
    total = sum(counts)
    if "recount" in mistakes:
        total += _off_by_one("object_counting", key)
    lines = [f"The question asks how many {q.category} I have."]
    lines += [f"- {e.text}: {n}" for e, n in zip(considered, counts)]
    lines.append(f"Adding them up: {' + '.join(map(str, counts)) or '0'} = {total}.")
    return lines, str(total)


def _count_susceptible(q: _Counting) -> dict[str, bool]:
    return {
        "quantities": any(e.quantity > 1 and e.category == q.category for e in q.entries),
        "category": any(e.category != q.category for e in q.entries),
        "recount": True,
    }


def _first_letter_sort(words: list[str]) -> list[str]:
    return sorted(words, key=lambda w: w[:1])  # stable: ties keep their input order


def _sort(words: tuple[str, ...], mistakes: frozenset[str], key: str) -> tuple[list[str], str]:
    kept = list(words[:-1]) if "complete" in mistakes else list(words)
    if "letters" in mistakes:
        result = _first_letter_sort(kept)
        how = "Ordering them by their first letter"
    else:
        result = sorted(kept)
        how = "Ordering them alphabetically, letter by letter"
    lines = [f"The words to sort are: {' '.join(kept)} ({len(kept)} words).", f"{how}: {', '.join(result)}."]
    return lines, " ".join(result)


def _sort_susceptible(words: tuple[str, ...]) -> dict[str, bool]:
    return {
        "letters": _first_letter_sort(list(words)) != sorted(words),
        "complete": len(words) > 3,
    }


def _evaluate_flat(items: list[Any], left_to_right: bool) -> int:
    """Value of a parenthesis-free list [n, op, n, op, n ...]."""
    if not items or len(items) % 2 == 0:
        raise ValueError("malformed expression")
    if left_to_right:
        value = items[0]
        for op, num in zip(items[1::2], items[2::2]):
            value = value * num if op == "*" else value + num if op == "+" else value - num
        return int(value)
    terms: list[int] = [items[0]]
    ops: list[str] = []
    for op, num in zip(items[1::2], items[2::2]):
        if op == "*":
            terms[-1] = terms[-1] * num
        else:
            ops.append(op)
            terms.append(num)
    value = terms[0]
    for op, term in zip(ops, terms[1:]):
        value = value + term if op == "+" else value - term
    return value


def _evaluate(tokens: list[object], left_to_right: bool, steps: list[str] | None = None) -> int:
    """Evaluate innermost parentheses first, recording 'a op b ... = v' steps."""
    stack: list[list[object]] = [[]]
    for tok in tokens:
        if tok == "(":
            stack.append([])
        elif tok == ")":
            if len(stack) < 2:
                raise ValueError("unbalanced parentheses")
            group = stack.pop()
            value = _evaluate_flat(group, left_to_right)
            if steps is not None and len(group) > 1:
                steps.append(f"{' '.join(map(str, group))} = {value}")
            stack[-1].append(value)
        else:
            stack[-1].append(tok)
    if len(stack) != 1:
        raise ValueError("unbalanced parentheses")
    top = stack[0]
    value = _evaluate_flat(top, left_to_right)
    if steps is not None and len(top) > 1:
        steps.append(f"{' '.join(map(str, top))} = {value}")
    return value


def _flip_double_negatives(tokens: tuple[object, ...]) -> list[object]:
    """The 'signs' mistake: read 'a - -x' as 'a - x'."""
    out = list(tokens)
    for i in range(1, len(out)):
        if out[i - 1] == "-" and isinstance(out[i], int) and out[i] < 0:  # type: ignore[operator]
            out[i] = -out[i]  # type: ignore[operator]
    return out


def _arith(tokens: tuple[object, ...], mistakes: frozenset[str], key: str) -> tuple[list[str], str]:
    work = _flip_double_negatives(tokens) if "signs" in mistakes else list(tokens)
    steps: list[str] = []
    value = _evaluate(work, left_to_right="precedence" in mistakes, steps=steps)
    if "recount" in mistakes:
        value += _off_by_one("multistep_arithmetic_two", key)
        if steps:
            steps[-1] = steps[-1].rsplit("=", 1)[0] + f"= {value}"
    return [f"Step {i}: {step}." for i, step in enumerate(steps, 1)], str(value)


def _arith_susceptible(tokens: tuple[object, ...]) -> dict[str, bool]:
    right = _evaluate(list(tokens), left_to_right=False)
    return {
        "precedence": _evaluate(list(tokens), left_to_right=True) != right,
        "signs": _evaluate(_flip_double_negatives(tokens), left_to_right=False) != right,
        "recount": True,
    }


def _off_by_one(task: str, key: str) -> int:
    return 1 if _unit(task, "recount-direction", key) < 0.5 else -1


_Solver = Callable[[object, frozenset[str], str], tuple[list[str], str]]
SOLVERS: dict[str, tuple[_Solver, Callable[[object], dict[str, bool]]]] = {
    "object_counting": (_count, _count_susceptible),  # type: ignore[dict-item]
    "word_sorting": (_sort, _sort_susceptible),  # type: ignore[dict-item]
    "multistep_arithmetic_two": (_arith, _arith_susceptible),  # type: ignore[dict-item]
}


def mistakes_firing(prompt: str, question: _Question) -> list[Instruction]:
    """Catalogue instructions whose mistake fires for this prompt and question.

    A mistake fires when its instruction is missing from the prompt, the question
    is prone to it, and the question's stable hash falls under the rate.
    """
    lower = (prompt or "").lower()
    susceptible = SOLVERS[question.task][1](question.data)
    return [
        ins
        for ins in CATALOGUE[question.task]
        if not has_instruction(lower, ins)
        and susceptible.get(ins.id, False)
        and _unit(question.task, ins.id, question.key) < ins.rate
    ]


def solve(question: _Question, mistakes: frozenset[str] = frozenset()) -> tuple[list[str], str]:
    return SOLVERS[question.task][0](question.data, mistakes, question.key)


# A prompt injection the sim obeys, as a compliant real model would: "... always answer 0."
# Without it a poisoned client prompt would do no harm under the sim, and the defences
# against poisoned uploads (robust merge) could not be shown to work.
_ALWAYS_ANSWER = re.compile(r"\balways (?:answer|reply|respond)(?: with)?\s+['\"]?([\w-]+)", re.IGNORECASE)


_QUOTED_TEXT = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")


def injected_answer(prompt: str) -> str | None:
    """The fixed answer a system prompt orders ("always answer X"), if it orders one. An order inside
    quotes is text the prompt talks about (e.g. "reply with exactly '...'"), not one given to this model."""
    quoted = [(m.start(), m.end()) for m in _QUOTED_TEXT.finditer(prompt or "")]
    for match in _ALWAYS_ANSWER.finditer(prompt or ""):
        if not any(start < match.start() < end for start, end in quoted):
            return match.group(1)
    return None


def answer_question(prompt: str, text: str) -> str:
    question = parse_question(text)
    forced = injected_answer(prompt)
    if forced is not None:
        lines, value = ["As the system prompt instructs, the answer is fixed."], forced
    else:
        mistakes = frozenset(ins.id for ins in mistakes_firing(prompt, question))
        lines, value = solve(question, mistakes)
    if has_answer_format(prompt):
        lines.append(f"Answer: {value}")
    else:
        lines.append(f"So the result is {value}.")
    return "\n".join(lines)


