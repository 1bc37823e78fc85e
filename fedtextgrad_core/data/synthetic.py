"""Seeded generator of BIG-Bench-Hard-style questions with exact answers.

It lets the whole system run (and be tested) with no dataset files and no network.
Questions are written in exactly the BBH formats, so the simulated LLM and any code
that reads questions handle synthetic and real data alike.

Determinism: each call seeds its own ``random.Random`` with the task name and the seed
as a string. String seeds are hashed with SHA-512 by ``random``, never with Python's
per-process ``hash()``, so every client process generates the same examples.
"""

from __future__ import annotations

import random

from fedtextgrad_core.data.examples import Example
from fedtextgrad_core.data.lexicon import CATEGORIES, NUMBER_NAMES, article
from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.errors import ConfigError

__all__ = ["SUPPORTED_TASKS", "WORDS", "generate"]

SUPPORTED_TASKS = ("object_counting", "word_sorting", "multistep_arithmetic_two")

# Ordinary English words for word sorting, grouped by first letter so that lists can
# be built with several words sharing a letter (or a longer prefix): that is where
# sorting goes wrong, so it is what makes the task worth optimising a prompt for.
_VOCABULARY = """
    able absent account acid across actor address admit adult advice afford after
    again agent agree airport alarm album almost alone amount ancient angle animal
    ankle answer apple april area argue army arrow artist autumn average
    baby badge baker balance ballet bamboo banana band bank barrel basket battle beach
    bean beard beauty become bedroom beef before begin belt bench bicycle bird
    blanket blossom board boat bottle bottom brain branch bread breeze brick bridge
    cabin cable cactus camera camp canal candle canvas captain carbon card care
    carpet carrot castle cattle ceiling cellar center chain chair chalk champion
    channel cheese cherry chicken circle city clay cliff clock cloud coast coffee
    daisy damage dance danger dawn debate decade deer degree delay dentist desert
    design desk detail diamond diary dinner doctor dolphin donkey door dragon drawer
    eagle early earth echo edge effort eight elbow elder elephant elevator empire
    energy engine enjoy equal escape evening event exit extra
    fabric face factory family farmer father feather fence festival fever field
    finger fire fish flag flame flavor floor flower forest fortune fountain fox
    galaxy garage garden garlic gate gentle giant ginger giraffe glass glove goat
    gold grape grass gravel guitar
    habit hammer hand harbor harvest hat hazard heart heaven helmet herb hero hill
    history hobby honey horizon horse hotel hunger
    ice idea igloo image impact inch income index ink insect island item ivory
    jacket jaguar jar jelly jewel journey judge juice jungle
    kayak kettle key kidney kingdom kitchen kite kitten knee knife knot
    ladder lake lamp language lantern laptop laundry lawn leaf lemon lesson letter
    library light lion liquid lizard lobster lunch
    machine magnet mango maple marble market meadow medal melon memory message metal
    middle minute mirror monkey morning mountain muscle museum
    napkin narrow nation nature needle nephew nest network night noodle north novel
    nurse
    oak ocean office olive onion opera orange orbit orchard organ otter oven owl
    paddle palace panda paper parade parrot pasta peach pencil pepper piano picnic
    pillow planet plate pocket pond potato powder pumpkin puzzle
    quarter queen question quiet quilt
    rabbit radio rain ranch raven record ribbon river road robot rocket roof rope
    saddle salad salmon sand school season shadow shelf shell shoe shoulder silver
    sister soap soup spider spring square stone storm summer sunset
    table tablet tail teacher temple tennis thunder ticket tiger timber toast tomato
    tower train travel tree tunnel turtle
    umbrella uncle uniform universe
    valley vanilla velvet village violin visitor voice volcano
    wagon wallet walnut water weather whale wheel window winter wizard wolf wonder
    yard yellow yogurt
    zebra zero zipper
"""
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_VOCABULARY.split()))
_WORDS_BY_LETTER: dict[str, tuple[str, ...]] = {
    letter: tuple(w for w in WORDS if w[0] == letter) for letter in sorted({w[0] for w in WORDS})
}
_SHARED_LETTERS = tuple(letter for letter, words in _WORDS_BY_LETTER.items() if len(words) >= 4)

# Object counting: how often an entry has a quantity above one, and how often a
# question (outside the "objects" category) mixes in items from other categories.
# Both are the cases where counting slips, so both must be common.
_MULTIPLE_RATE = 0.25
_DISTRACTOR_RATE = 0.5
_OBJECTS = "objects"

# A cap on rejected duplicates, so an impossible request fails instead of looping.
_MAX_ATTEMPTS_PER_EXAMPLE = 50


def generate(task: str, n: int, seed: int) -> list[Example]:
    """``n`` distinct examples of ``task``, the same for the same (task, n, seed).

    The first ``k`` examples of ``generate(task, n, seed)`` are those of
    ``generate(task, k, seed)``, so growing the data set never reshuffles it.
    """
    if get_task(task).name not in SUPPORTED_TASKS:
        raise ConfigError(
            "task", task,
            f"one of {', '.join(SUPPORTED_TASKS)} (the synthetic generator has no {task} questions)",
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError("synthetic-size", n, "a whole number of examples, 0 or more")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError("seed", seed, "a whole number")

    rng = random.Random(f"{task}/{seed}")
    make = _MAKERS[task]
    examples: list[Example] = []
    seen: set[str] = set()
    attempts = 0
    while len(examples) < n:
        attempts += 1
        if attempts > _MAX_ATTEMPTS_PER_EXAMPLE * max(n, 1):
            raise ConfigError(
                "synthetic-size", n, f"fewer examples: only {len(examples)} distinct {task} questions were found"
            )
        question, answer = make(rng)
        if question not in seen:
            seen.add(question)
            examples.append(Example(question=question, answer=answer))
    return examples


# --- object counting ---------------------------------------------------------------


def _object_counting(rng: random.Random) -> tuple[str, str]:
    asked = rng.choice(list(CATEGORIES))
    pool = CATEGORIES[asked]
    size = rng.randint(5, 10)
    distractors = 0
    if asked != _OBJECTS and rng.random() < _DISTRACTOR_RATE:
        distractors = rng.randint(1, 3)
    # The asked category must fill the rest from distinct nouns (instruments has only 8).
    distractors = max(distractors, size - len(pool))

    chosen = [(pair, True) for pair in rng.sample(pool, size - distractors)]
    others = [pair for category, pairs in CATEGORIES.items() if category != asked for pair in pairs]
    chosen += [(pair, False) for pair in rng.sample(others, distractors)]
    rng.shuffle(chosen)

    entries: list[str] = []
    total = 0
    for (singular, plural), counted in chosen:
        quantity = rng.choice((2, 2, 2, 3, 3, 4, 5)) if rng.random() < _MULTIPLE_RATE else 1
        if quantity == 1:
            entries.append(f"{article(singular)} {singular}")
        else:
            entries.append(f"{NUMBER_NAMES[quantity]} {plural}")
        if counted:
            total += quantity
    return f"I have {_join(entries)}. How many {asked} do I have?", str(total)


def _join(entries: list[str]) -> str:
    """'A', 'A and B', 'A, B, and C': the way BBH lists what 'I have'."""
    if len(entries) <= 2:
        return " and ".join(entries)
    return ", ".join(entries[:-1]) + ", and " + entries[-1]


# --- word sorting ------------------------------------------------------------------


def _word_sorting(rng: random.Random) -> tuple[str, str]:
    size = rng.randint(3, 15)
    words: list[str] = []
    if rng.random() < 0.6:
        same_letter = _WORDS_BY_LETTER[rng.choice(_SHARED_LETTERS)]
        words = rng.sample(same_letter, rng.randint(2, min(4, size)))
    rest = [w for w in WORDS if w not in words]
    words += rng.sample(rest, size - len(words))
    rng.shuffle(words)
    question = "Sort the following words alphabetically: List: " + " ".join(words)
    return question, " ".join(sorted(words))


# --- multistep arithmetic ----------------------------------------------------------

_OPERATORS = ("+", "-", "*")


def _multistep_arithmetic(rng: random.Random) -> tuple[str, str]:
    left, right = _group(rng), _group(rng)
    op = rng.choice(_OPERATORS)
    question = f"(({_render(left)}) {op} ({_render(right)})) ="
    return question, str(_apply(_value(left), op, _value(right)))


def _group(rng: random.Random) -> tuple[list[int], list[str]]:
    count = rng.randint(2, 4)
    numbers = [rng.randint(-9, 9) for _ in range(count)]
    ops = [rng.choice(_OPERATORS) for _ in range(count - 1)]
    return numbers, ops


def _render(group: tuple[list[int], list[str]]) -> str:
    numbers, ops = group
    text = str(numbers[0])
    for op, number in zip(ops, numbers[1:]):
        text += f" {op} {number}"  # a negative operand reads '- -4', as in BBH
    return text


def _value(group: tuple[list[int], list[str]]) -> int:
    """Value with the usual precedence: products first, then + and - left to right."""
    numbers, ops = group
    terms: list[int] = [numbers[0]]
    signs: list[str] = []
    for op, number in zip(ops, numbers[1:]):
        if op == "*":
            terms[-1] *= number
        else:
            signs.append(op)
            terms.append(number)
    total = terms[0]
    for sign, term in zip(signs, terms[1:]):
        total = _apply(total, sign, term)
    return total


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


_MAKERS = {
    "object_counting": _object_counting,
    "word_sorting": _word_sorting,
    "multistep_arithmetic_two": _multistep_arithmetic,
}
