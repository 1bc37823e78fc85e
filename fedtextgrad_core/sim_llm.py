"""The "sim" backend: a deterministic, instant chat model. It is a test double, not an LLM.

Why it exists: federated prompt optimisation makes thousands of LLM calls, so the
project's tests, demos and benchmarks would be slow, costly and flaky against a
real model. The sim answers the same four kinds of request a real model gets in
this system, quickly and always the same way:

1. task questions (object counting, word sorting, multistep arithmetic), solved
   for real and then spoiled by *mistakes* that the system prompt can prevent;
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
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from .errors import SimUnsupportedError
from .lexicon import CATEGORIES, NOUN_CATEGORY, NUMBER_WORDS
from .tasks import NUMBER_FORMAT, WORDS_FORMAT, get_task

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
    "split_sentences",
]


def approx_tokens(text: str) -> int:
    """Rough token count: one token per four characters, at least one.

    Good enough for usage accounting and cost comparisons between runs; it is not
    any real tokenizer, and the sim never needs an exact count.
    """
    return max(1, math.ceil(len(text or "") / 4))


# --------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class Instruction:
    """One sentence the optimiser can learn, and the mistake it prevents.

    ``key_phrases`` detect the instruction in a prompt (case-insensitive, any one
    suffices), so a prompt counts as having learned it even if it was worded by a
    real LLM, as long as it uses one of the phrases.
    """

    id: str
    sentence: str
    key_phrases: tuple[str, ...]
    topic: str  # completes "the system prompt does not say ..."
    mistake: str  # what the model does without the instruction
    rate: float  # share of susceptible questions on which the mistake fires
    susceptible: str  # which questions are prone to the mistake


CATALOGUE: dict[str, list[Instruction]] = {
    "object_counting": [
        Instruction(
            "quantities",
            "List every item with its quantity, and count a word like 'two' or 'three' "
            "as that many items.",
            ("with its quantity", "as that many items"),
            "how to handle quantities",
            "counted each entry as one item, ignoring quantity words such as 'two' or 'three'",
            0.6,
            "an entry of the asked category has a quantity above one",
        ),
        Instruction(
            "category",
            "Count only the items that belong to the category asked about, and ignore "
            "every other item.",
            ("belong to the category", "ignore every other item"),
            "that items of other categories must be left out",
            "also counted items that are not in the category asked about",
            0.5,
            "the list has items of other categories",
        ),
        Instruction(
            "recount",
            "Add the counts one at a time and double-check the total before answering.",
            ("double-check the total", "add the counts one at a time"),
            "to check the total",
            "added the counts wrongly and was off by one",
            0.2,
            "every question",
        ),
    ],
    "word_sorting": [
        Instruction(
            "letters",
            "Compare words letter by letter: when two words start with the same letter, "
            "order them by their next letters.",
            ("letter by letter", "by their next letters"),
            "how to order words that start with the same letter",
            "sorted by first letter only, keeping words with the same first letter "
            "in their original order",
            0.6,
            "two words share a first letter and this changes the order",
        ),
        Instruction(
            "complete",
            "Make sure every word of the list appears exactly once in the answer.",
            ("appears exactly once", "every word of the list"),
            "that every word must be kept",
            "dropped the last word of the list",
            0.3,
            "the list has more than three words",
        ),
    ],
    "multistep_arithmetic_two": [
        Instruction(
            "precedence",
            "Apply the order of operations: inside each parenthesis, multiply before "
            "adding or subtracting.",
            ("order of operations", "multiply before adding"),
            "to apply the order of operations",
            "evaluated each parenthesis strictly from left to right",
            0.6,
            "evaluating left to right changes the value",
        ),
        Instruction(
            "signs",
            "Track negative numbers carefully: subtracting a negative number means "
            "adding it.",
            ("subtracting a negative", "negative numbers carefully"),
            "how to subtract negative numbers",
            "treated subtracting a negative number as subtracting a positive one",
            0.5,
            "the expression subtracts a negative number",
        ),
        Instruction(
            "recount",
            "Recompute each intermediate result before answering.",
            ("recompute each intermediate", "recompute every intermediate"),
            "to check intermediate results",
            "made an arithmetic slip and was off by one",
            0.2,
            "every question",
        ),
    ],
}

FORMAT_INSTRUCTIONS: tuple[str, ...] = (NUMBER_FORMAT, WORDS_FORMAT)
_FORMAT_MARK = "answer:"


def has_answer_format(prompt: str) -> bool:
    """Whether a prompt states the answer format (detected by the text 'answer:')."""
    return _FORMAT_MARK in (prompt or "").lower()


def _has(prompt_lower: str, instruction: Instruction) -> bool:
    return any(phrase.lower() in prompt_lower for phrase in instruction.key_phrases)


def instructions_in(prompt: str, task: str) -> list[str]:
    """Ids of the task's catalogue instructions present in ``prompt``, in catalogue order.

    The answer format is not a catalogue entry; see :func:`has_answer_format`.
    """
    lower = (prompt or "").lower()
    return [ins.id for ins in _catalogue(task) if _has(lower, ins)]


def _catalogue(task: str) -> list[Instruction]:
    if task not in CATALOGUE:
        raise SimUnsupportedError(
            f"the sim backend has no instruction catalogue for task '{task}'; "
            f"it knows {', '.join(CATALOGUE)}"
        )
    return CATALOGUE[task]


# --------------------------------------------------------------------------- sentences

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Quoted spans inside which a sentence never ends: "..." and '...' (the latter only
# when the quote is not an apostrophe inside a word, e.g. "don't").
_QUOTED = re.compile(r"\"[^\"]*\"|(?<![A-Za-z])'[^'\n]*'(?![A-Za-z])")


def split_sentences(text: str) -> list[str]:
    """Split a prompt into sentences, never inside a quoted span like 'Answer: $VALUE'.

    The answer-format sentence must stay whole, or a merge could separate its quoted
    template from the rest and the reply format would be lost.
    """
    text = " ".join((text or "").split())
    if not text:
        return []
    protected = [(m.start(), m.end()) for m in _QUOTED.finditer(text)]
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        if any(lo < match.start() < hi for lo, hi in protected):
            continue
        sentences.append(text[start:match.start()])
        start = match.end()
    sentences.append(text[start:])
    return [s.strip() for s in sentences if s.strip()]


def _is_format_sentence(sentence: str) -> bool:
    return _FORMAT_MARK in sentence.lower()


def insert_instruction(prompt: str, sentence: str) -> str:
    """Add ``sentence`` to ``prompt``: before the answer-format sentence, else at the end.

    The format sentence stays last because it describes the reply's last line, and
    that is where a reader (human or model) expects it. A format sentence itself is
    appended at the end.
    """
    sentences = split_sentences(prompt)
    if _is_format_sentence(sentence):
        return " ".join(sentences + [sentence])
    for index in range(len(sentences) - 1, -1, -1):
        if _is_format_sentence(sentences[index]):
            return " ".join(sentences[:index] + [sentence] + sentences[index:])
    return " ".join(sentences + [sentence])


def full_prompt(task: str) -> str:
    """The task's start prompt with every catalogue instruction learned (the sim's optimum)."""
    prompt = get_task(task).start_prompt
    for instruction in _catalogue(task):
        prompt = insert_instruction(prompt, instruction.sentence)
    return prompt


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
    return _match_question(question)[0]


def _match_question(text: str) -> tuple[str | None, re.Match[str] | None]:
    for task, pattern in (
        ("object_counting", _COUNTING),
        ("word_sorting", _SORTING),
        ("multistep_arithmetic_two", _ARITHMETIC),
    ):
        match = pattern.search(text)
        if match:
            return task, match
    return None, None


def _parse_question(text: str) -> _Question:
    task, match = _match_question(text)
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


def _evaluate_flat(items: list[object], left_to_right: bool) -> int:
    """Value of a parenthesis-free list [n, op, n, op, n ...]."""
    if not items or len(items) % 2 == 0:
        raise ValueError("malformed expression")
    if left_to_right:
        value = items[0]
        for op, num in zip(items[1::2], items[2::2]):
            value = value * num if op == "*" else value + num if op == "+" else value - num
        return int(value)  # type: ignore[arg-type]
    terms: list[int] = [items[0]]  # type: ignore[list-item]
    ops: list[str] = []
    for op, num in zip(items[1::2], items[2::2]):
        if op == "*":
            terms[-1] = terms[-1] * num  # type: ignore[operator]
        else:
            ops.append(op)  # type: ignore[arg-type]
            terms.append(num)  # type: ignore[arg-type]
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
_SOLVERS: dict[str, tuple[_Solver, Callable[[object], dict[str, bool]]]] = {
    "object_counting": (_count, _count_susceptible),  # type: ignore[dict-item]
    "word_sorting": (_sort, _sort_susceptible),  # type: ignore[dict-item]
    "multistep_arithmetic_two": (_arith, _arith_susceptible),  # type: ignore[dict-item]
}


def _firing(prompt: str, question: _Question) -> list[Instruction]:
    """Catalogue instructions whose mistake fires for this prompt and question.

    A mistake fires when its instruction is missing from the prompt, the question
    is prone to it, and the question's stable hash falls under the rate.
    """
    lower = (prompt or "").lower()
    susceptible = _SOLVERS[question.task][1](question.data)
    return [
        ins
        for ins in CATALOGUE[question.task]
        if not _has(lower, ins)
        and susceptible.get(ins.id, False)
        and _unit(question.task, ins.id, question.key) < ins.rate
    ]


def _solve(question: _Question, mistakes: frozenset[str] = frozenset()) -> tuple[list[str], str]:
    return _SOLVERS[question.task][0](question.data, mistakes, question.key)


def _answer_question(prompt: str, text: str) -> str:
    question = _parse_question(text)
    mistakes = frozenset(ins.id for ins in _firing(prompt, question))
    lines, value = _solve(question, mistakes)
    if has_answer_format(prompt):
        lines.append(f"Answer: {value}")
    else:
        lines.append(f"So the result is {value}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- TextGrad feedback

_BACKWARD_MARK = "You are the gradient (feedback) engine"
_OPTIMIZER_MARK = "You are part of an optimization system that improves text (i.e., variable)"
_MERGE_MARK = "Merge the following list of prompts"
_UID_MARK = "Uniform Information Density"

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


def _feedback(user: str) -> str:
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
        question = _parse_question(question_text)
    except SimUnsupportedError:
        return _GENERIC_FEEDBACK
    task = get_task(question.task)
    _, target = _solve(question)
    correct, malformed = task.score(output, target)
    if correct and not malformed:
        return _NO_CHANGE
    if not has_answer_format(prompt):
        return (
            "The response has no final answer line in the expected format, because the system "
            "prompt does not state the answer format. Adding the instruction "
            f'"{task.format_instruction}" to the end of the system prompt can fix this error.'
        )
    firing = _firing(prompt, question)
    if not firing:
        # The output came from elsewhere (e.g. another model): point at the first
        # missing instruction this question is prone to, if any.
        susceptible = _SOLVERS[question.task][1](question.data)
        lower = prompt.lower()
        firing = [i for i in CATALOGUE[question.task] if susceptible.get(i.id) and not _has(lower, i)]
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


def _rewrite(user: str) -> str:
    prompt = _span(user, "LM_SYSTEM_PROMPT")
    if prompt is None:
        prompt = _span(user, "VARIABLE") or ""
    feedback_spans = re.findall(r"<FEEDBACK>(.*?)</FEEDBACK>", user, re.DOTALL)
    feedback = "\n".join(feedback_spans) if feedback_spans else user
    counts = Counter()
    order = _candidates()
    for index, (sentence, _, _) in enumerate(order):
        hits = feedback.count(f'"{sentence}"')
        if hits:
            counts[index] = hits
    lower = prompt.lower()
    chosen = None
    for index, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        sentence, _, ins = order[index]
        present = has_answer_format(prompt) if ins is None else (_has(lower, ins) or sentence in prompt)
        if not present:
            chosen = sentence
            break
    new_prompt = insert_instruction(prompt, chosen) if chosen else prompt
    return f"<IMPROVED_VARIABLE>{new_prompt}</IMPROVED_VARIABLE>"


# --------------------------------------------------------------------------- merging


def _sentence_key(sentence: str) -> str:
    """Identity of a sentence for de-duplication: its catalogue entry, else its text."""
    lower = sentence.lower()
    for task, instructions in CATALOGUE.items():
        for ins in instructions:
            if _has(lower, ins):
                return f"catalogue:{task}:{ins.id}"
    return "text:" + " ".join(lower.split())


def _merge(user: str) -> str:
    prompts = [p.strip() for p in re.findall(r"<PROMPT>(.*?)</PROMPT>", user, re.DOTALL) if p.strip()]
    if not prompts:
        return ""
    split = [split_sentences(p) for p in prompts]
    format_sentence = next((s for ss in split for s in ss if _is_format_sentence(s)), None)
    if _UID_MARK.lower() in user.lower():
        return _merge_uid(split, format_sentence)
    return _merge_summary(split, format_sentence, max(len(p) for p in prompts))


def _merge_uid(split: list[list[str]], format_sentence: str | None) -> str:
    """One sentence per distinct instruction, first-seen order, format last."""
    seen: set[str] = set()
    kept: list[str] = []
    for sentences in split:
        for sentence in sentences:
            if _is_format_sentence(sentence):
                continue
            key = _sentence_key(sentence)
            if key not in seen:
                seen.add(key)
                kept.append(sentence)
    return " ".join(kept + ([format_sentence] if format_sentence else []))


def _merge_summary(split: list[list[str]], format_sentence: str | None, budget: int) -> str:
    """Round-robin sentences under a length budget, as a summariser that keeps the
    summary about as long as one input would: learned instructions that differ
    between clients do not all fit, so some are lost."""
    reserved = len(format_sentence) + 1 if format_sentence else 0
    kept: list[str] = []
    seen: set[str] = set()
    length = reserved
    rounds = max(len(s) for s in split)
    for position in range(rounds):
        for sentences in split:
            if position >= len(sentences) or _is_format_sentence(sentences[position]):
                continue
            sentence = sentences[position]
            norm = " ".join(sentence.lower().split())
            if norm in seen:
                continue
            if length + len(sentence) + 1 > budget + 1:
                return " ".join(kept + ([format_sentence] if format_sentence else []))
            seen.add(norm)
            kept.append(sentence)
            length += len(sentence) + 1
    return " ".join(kept + ([format_sentence] if format_sentence else []))


# --------------------------------------------------------------------------- the model

_GENERIC_ANSWER = (
    "This is the sim backend, a deterministic test double. It answers object counting, "
    "word sorting and multistep arithmetic questions, and TextGrad feedback, optimizer "
    "and prompt-merge requests."
)


def _text(content: object) -> str:
    """Message content as text; OpenAI also allows a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "") if isinstance(part, dict) else str(part) for part in content
        )
    return "" if content is None else str(content)


class SimLLM:
    """A deterministic chat model for tests and demos (see the module docstring).

    Stateless apart from its configured latency, so one instance can serve many
    threads at once.
    """

    def __init__(self, latency_ms: float = 0.0):
        if latency_ms < 0:
            raise ValueError(f"latency_ms must be zero or more, got {latency_ms}")
        self.latency_ms = float(latency_ms)

    def complete(self, messages: list[dict[str, str]]) -> str:
        """Reply to OpenAI-style chat messages, after sleeping ``latency_ms``.

        Raises SimUnsupportedError for a task question the sim cannot answer (e.g. a
        GSM8K problem), so a run configured with the wrong task fails loudly instead
        of scoring zero.
        """
        if self.latency_ms:
            time.sleep(self.latency_ms / 1000.0)
        system = "\n".join(_text(m.get("content")) for m in messages if m.get("role") == "system")
        users = [_text(m.get("content")) for m in messages if m.get("role") == "user"]
        others = [_text(m.get("content")) for m in messages if m.get("role") != "system"]
        user = users[-1] if users else others[-1] if others else ""
        return respond(system, user)


def respond(system: str, user: str) -> str:
    """The sim's reply to one system + user message pair (see :class:`SimLLM`)."""
    if _BACKWARD_MARK in system:
        return _feedback(user)
    if _OPTIMIZER_MARK in system:
        return _rewrite(user)
    if user.lstrip().startswith(_MERGE_MARK):
        return _merge(user)
    task, _ = _match_question(user)
    if task is not None or system.strip() or _looks_like_question(user):
        # A system prompt plus a user message is a task question; when it matches no
        # supported format, it belongs to an unsupported task.
        return _answer_question(system, user)
    return _GENERIC_ANSWER


def _looks_like_question(user: str) -> bool:
    stripped = user.strip()
    return stripped.endswith("?") or stripped.endswith("=")
