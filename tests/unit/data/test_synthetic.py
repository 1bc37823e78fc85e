"""The synthetic generator: BBH formats, exact answers, seeded determinism.

Answers are re-derived here by independent means (lexicon lookups, sorted(), an AST
evaluator), and those solvers are themselves checked against the real BBH files when
present, so a wrong format or a wrong answer in the generator cannot slip through.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys

import pytest

from fedtextgrad_core.data.lexicon import CATEGORIES, NOUN_CATEGORY, NUMBER_WORDS
from fedtextgrad_core.data.synthetic import SUPPORTED_TASKS, generate
from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.errors import ConfigError
from tests import ROOT as REPO_ROOT

DATA_DIR = REPO_ROOT.parent / "shared" / "data"

N = 300


def _real_bbh(task: str) -> list[dict]:
    path = DATA_DIR / "bbh" / f"{task}.json"
    if not path.is_file():
        pytest.skip(f"real data not found at {path}")
    return json.loads(path.read_text())["examples"]


# --- independent solvers -----------------------------------------------------------

_COUNTING = re.compile(r"^I have (.+)\. How many (.+) do I have\?$")


def solve_counting(question: str) -> tuple[int, str, list[tuple[int, str, str]]]:
    """(answer, asked category, [(quantity, noun, category)]) read with the lexicon alone."""
    match = _COUNTING.match(question)
    assert match, question
    body, asked = match.groups()
    entries = []
    for entry in re.split(r", and |, | and ", body):
        word, noun = entry.split(" ", 1)
        entries.append((NUMBER_WORDS[word], noun, NOUN_CATEGORY[noun]))
    return sum(q for q, _, c in entries if c == asked), asked, entries


_WORDS_PREFIX = "Sort the following words alphabetically: List: "


def solve_sorting(question: str) -> str:
    assert question.startswith(_WORDS_PREFIX), question
    return " ".join(sorted(question[len(_WORDS_PREFIX):].split()))


def safe_eval(expression: str) -> int:
    """Integer value of + - * expressions, walking the AST (no eval)."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp):
            a, b = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
        raise AssertionError(f"unexpected syntax in {expression!r}: {ast.dump(node)}")

    assert expression.endswith(" ="), expression
    return walk(ast.parse(expression[:-2], mode="eval"))


def test_solvers_agree_with_real_bbh_targets():
    # Proves the solvers (and therefore the format the generator must follow) are right.
    for example in _real_bbh("object_counting"):
        assert str(solve_counting(example["input"])[0]) == example["target"]
    for example in _real_bbh("word_sorting"):
        assert solve_sorting(example["input"]) == example["target"]
    for example in _real_bbh("multistep_arithmetic_two"):
        assert str(safe_eval(example["input"])) == example["target"]


# --- determinism -------------------------------------------------------------------


@pytest.mark.parametrize("task", SUPPORTED_TASKS)
def test_same_seed_same_examples_other_seed_other_examples(task):
    first = generate(task, 50, seed=3)
    assert first == generate(task, 50, seed=3)
    other = generate(task, 50, seed=4)
    assert len({e.question for e in first} & {e.question for e in other}) < 5


@pytest.mark.parametrize("task", SUPPORTED_TASKS)
def test_longer_runs_extend_shorter_ones_and_questions_are_distinct(task):
    long = generate(task, N, seed=0)
    assert long[:40] == generate(task, 40, seed=0)
    assert len({e.question for e in long}) == N


def test_tasks_get_different_streams_for_the_same_seed():
    counting = generate("object_counting", 5, seed=0)
    assert generate("object_counting", 5, seed=1) != counting
    assert len(generate("word_sorting", 0, seed=0)) == 0


def test_examples_are_identical_across_processes_with_different_hash_seeds():
    script = (
        "from fedtextgrad_core.data.synthetic import generate\n"
        "for t in ('object_counting', 'word_sorting', 'multistep_arithmetic_two'):\n"
        "    print(repr(generate(t, 20, 7)))\n"
    )
    outputs = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
        )
        outputs.add(done.stdout)
    assert len(outputs) == 1
    expected = "".join(repr(generate(t, 20, 7)) + "\n" for t in SUPPORTED_TASKS)
    assert outputs == {expected}


# --- exact answers and BBH formats --------------------------------------------------


def test_object_counting_answers_and_format():
    examples = generate("object_counting", N, seed=11)
    with_multiples = with_distractors = 0
    asked_seen = set()
    for example in examples:
        answer, asked, entries = solve_counting(example.question)
        assert example.answer == str(answer)
        asked_seen.add(asked)
        assert 5 <= len(entries) <= 10
        nouns = [noun for _, noun, _ in entries]
        singulars = {NOUN_CATEGORY[n] + "/" + _singular(n) for n in nouns}
        assert len(singulars) == len(nouns), f"repeated item in {example.question!r}"
        for quantity, noun, _ in entries:
            assert quantity <= 5
            plural = _is_plural(noun)
            assert plural == (quantity > 1) or _singular(noun) == noun == "fish"
        for_asked = [q for q, _, c in entries if c == asked]
        assert for_asked, example.question
        if asked == "objects":
            assert all(c == "objects" for _, _, c in entries), example.question
        with_multiples += any(q > 1 for q in for_asked)
        with_distractors += any(c != asked for _, _, c in entries)
        assert get_task("object_counting").score("...\nAnswer: " + example.answer, example.answer) == (True, False)
    assert asked_seen == set(CATEGORIES)
    assert with_multiples >= 0.5 * N
    assert with_distractors >= 0.3 * N


def test_object_counting_uses_articles_and_bbh_joins():
    for example in generate("object_counting", 100, seed=2):
        body = _COUNTING.match(example.question).group(1)
        assert ", and " in body  # 5 or more entries: "A, B, ..., and Z"
        for entry in re.split(r", and |, ", body):
            word, noun = entry.split(" ", 1)
            if word in ("a", "an"):
                assert word == ("an" if noun[0] in "aeiou" else "a"), entry


def test_word_sorting_answers_and_format():
    examples = generate("word_sorting", N, seed=5)
    sharing = 0
    lengths = set()
    for example in examples:
        assert example.answer == solve_sorting(example.question)
        words = example.question[len(_WORDS_PREFIX):].split(" ")
        lengths.add(len(words))
        assert 3 <= len(words) <= 15
        assert len(set(words)) == len(words)
        assert all(re.fullmatch(r"[a-z]+", w) for w in words), words
        sharing += len({w[0] for w in words}) < len(words)
        assert get_task("word_sorting").score("...\nAnswer: " + example.answer, example.answer) == (True, False)
    assert lengths == set(range(3, 16))
    assert sharing >= 0.5 * N


_ARITHMETIC = re.compile(r"^\(\((.+)\) ([-+*]) \((.+)\)\) =$")
_GROUP = re.compile(r"^-?\d( [-+*] -?\d){1,3}$")


def test_multistep_arithmetic_answers_and_format():
    examples = generate("multistep_arithmetic_two", N, seed=9)
    negative_operands = 0
    for example in examples:
        assert example.answer == str(safe_eval(example.question))
        match = _ARITHMETIC.match(example.question)
        assert match, example.question
        left, _, right = match.groups()
        assert _GROUP.match(left) and _GROUP.match(right), example.question
        negative_operands += " - -" in example.question
        assert get_task("multistep_arithmetic_two").score("...\nAnswer: " + example.answer, example.answer) == (
            True, False,
        )
    assert negative_operands >= 0.1 * N


# --- errors ------------------------------------------------------------------------


def test_gsm8k_and_unknown_tasks_are_config_errors():
    with pytest.raises(ConfigError) as info:
        generate("gsm8k", 5, 0)
    assert info.value.setting == "task" and "gsm8k" in str(info.value)
    with pytest.raises(ConfigError) as info:
        generate("no_such_task", 5, 0)
    assert info.value.setting == "task" and "no_such_task" in str(info.value)


@pytest.mark.parametrize("n", [-1, 2.5, True])
def test_bad_sizes_are_config_errors(n):
    with pytest.raises(ConfigError) as info:
        generate("word_sorting", n, 0)
    assert info.value.setting == "synthetic-size"


# --- helpers -----------------------------------------------------------------------

_PLURAL_TO_SINGULAR = {plural: singular for pairs in CATEGORIES.values() for singular, plural in pairs}
_SINGULARS = {singular for pairs in CATEGORIES.values() for singular, _ in pairs}


def _singular(noun: str) -> str:
    return noun if noun in _SINGULARS else _PLURAL_TO_SINGULAR[noun]


def _is_plural(noun: str) -> bool:
    return noun not in _SINGULARS
