"""Tests of the sim backend: calibration, determinism, TextGrad round trip and merging."""

from __future__ import annotations

import json
import os
import random
import re
import sys
import tempfile
import threading
import types

import pytest

from fedtextgrad_core.data.lexicon import CATEGORIES, NUMBER_NAMES, article
from fedtextgrad_core.data.tasks import NUMBER_FORMAT, PROMPT_OPENING, WORDS_FORMAT, get_task
from fedtextgrad_core.errors import SimUnsupportedError
from fedtextgrad_core.method.merging import merge_request
from fedtextgrad_core.sim import (
    CATALOGUE,
    SimLLM,
    approx_tokens,
    full_prompt,
    has_answer_format,
    insert_instruction,
    instructions_in,
)
from fedtextgrad_core.text import split_sentences
from tests import SHARED_DATA

TASKS = list(CATALOGUE)
BBH_DIR = SHARED_DATA / "bbh"
BACKWARD_SYSTEM = (
    "You are part of an optimization system that improves a given text (i.e. the variable). "
    "You are the gradient (feedback) engine. ..."
)
OPTIMIZER_SYSTEM = "You are part of an optimization system that improves text (i.e., variable). ..."

SIM = SimLLM()


def ask(prompt: str, question: str) -> str:
    return SIM.complete([{"role": "system", "content": prompt}, {"role": "user", "content": question}])


def accuracy(task_name: str, prompt: str, examples: list[tuple[str, str]]) -> float:
    task = get_task(task_name)
    return sum(task.score(ask(prompt, q), t)[0] for q, t in examples) / len(examples)


# --------------------------------------------------------------------------- data


def _own_questions(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    """BBH-format questions written here, for when the project generator is absent."""
    rng = random.Random(f"test/{task}/{seed}")
    out = []
    for _ in range(n):
        if task == "object_counting":
            asked = rng.choice([c for c in CATEGORIES if c != "objects"])
            others = [p for c, ps in CATEGORIES.items() if c != asked for p in ps]
            chosen = [(p, True) for p in rng.sample(CATEGORIES[asked], 5)]
            chosen += [(p, False) for p in rng.sample(others, rng.randint(0, 2))]
            rng.shuffle(chosen)
            entries, total = [], 0
            for (singular, plural), counted in chosen:
                k = rng.choice([1, 1, 1, 2, 3])
                entries.append(f"{article(singular)} {singular}" if k == 1 else f"{NUMBER_NAMES[k]} {plural}")
                total += k if counted else 0
            items = ", ".join(entries[:-1]) + ", and " + entries[-1]
            out.append((f"I have {items}. How many {asked} do I have?", str(total)))
        elif task == "word_sorting":
            pool = ["apple", "apricot", "banana", "bandit", "berry", "cherry", "chalk", "delta", "dog", "eagle",
                    "early", "fig", "film"]
            words = rng.sample(pool, rng.randint(3, 8))
            out.append(("Sort the following words alphabetically: List: " + " ".join(words), " ".join(sorted(words))))
        else:
            def group() -> str:
                text = str(rng.randint(-9, 9))
                for _ in range(3):
                    text += f" {rng.choice('+-*')} {rng.randint(-9, 9)}"
                return text
            expr = f"(({group()}) {rng.choice('+-*')} ({group()}))"
            out.append((expr + " =", str(eval(expr))))  # test-only: trusted, generated text
    return out


def synthetic(task: str, n: int = 120, seed: int = 0) -> list[tuple[str, str]]:
    """The project's generator when it is importable, else questions written here."""
    try:
        from fedtextgrad_core.data.synthetic import generate

        return [(e.question, e.answer) for e in generate(task, n, seed)]
    except (ImportError, AttributeError, TypeError):
        return _own_questions(task, n, seed)


def bbh(task: str) -> list[tuple[str, str]]:
    path = BBH_DIR / f"{task}.json"
    if not path.exists():
        pytest.skip(f"BBH file not found: {path}")
    return [(e["input"], e["target"]) for e in json.loads(path.read_text())["examples"]]


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("task", TASKS)
def test_instructions_raise_accuracy_on_real_bbh(task: str) -> None:
    examples = bbh(task)
    start = accuracy(task, get_task(task).start_prompt, examples)
    best = accuracy(task, full_prompt(task), examples)
    assert 0.30 <= start <= 0.60, start
    assert best >= 0.90
    assert best - start >= 0.25


@pytest.mark.parametrize("task", TASKS)
def test_instructions_raise_accuracy_on_synthetic(task: str) -> None:
    examples = synthetic(task)
    start = accuracy(task, get_task(task).start_prompt, examples)
    best = accuracy(task, full_prompt(task), examples)
    assert best >= 0.90
    assert best - start >= 0.25


@pytest.mark.parametrize("task", TASKS)
def test_each_instruction_helps(task: str) -> None:
    examples = synthetic(task)
    start_prompt = get_task(task).start_prompt
    start = accuracy(task, start_prompt, examples)
    for instruction in CATALOGUE[task]:
        assert accuracy(task, insert_instruction(start_prompt, instruction.sentence), examples) > start


@pytest.mark.parametrize("task", TASKS)
def test_missing_format_gives_malformed_replies(task: str) -> None:
    for question, target in synthetic(task, 20):
        reply = ask(f"{PROMPT_OPENING}", question)
        assert "answer:" not in reply.lower()
        assert get_task(task).score(reply, target) == (False, True)
        assert ask(get_task(task).start_prompt, question).splitlines()[-1].startswith("Answer: ")


def test_catalogue_detection_and_full_prompt() -> None:
    for task in TASKS:
        prompt = full_prompt(task)
        assert instructions_in(prompt, task) == [i.id for i in CATALOGUE[task]]
        assert instructions_in(get_task(task).start_prompt, task) == []
        assert split_sentences(prompt)[-1] == get_task(task).format_instruction
        assert has_answer_format(prompt)
    assert instructions_in("LIST EVERY ITEM WITH ITS QUANTITY.", "object_counting") == ["quantities"]


def test_sentence_split_keeps_format_whole() -> None:
    text = f"{PROMPT_OPENING} {CATALOGUE['object_counting'][0].sentence} {NUMBER_FORMAT}"
    sentences = split_sentences(text)
    assert sentences[-1] == NUMBER_FORMAT
    assert CATALOGUE["object_counting"][0].sentence in sentences
    assert split_sentences("Use 'Answer: 5. Done' at the end. Be brief.") == [
        "Use 'Answer: 5. Done' at the end.", "Be brief.",
    ]


def test_approx_tokens() -> None:
    assert approx_tokens("") == 1
    assert approx_tokens("abcd") == 1
    assert approx_tokens("abcde") == 2


# --------------------------------------------------------------------------- determinism


def test_deterministic_across_calls_and_threads() -> None:
    questions = [q for task in TASKS for q, _ in synthetic(task, 15)]
    prompt = get_task("object_counting").start_prompt
    first = [ask(prompt, q) for q in questions]
    assert first == [ask(prompt, q) for q in questions]
    results: dict[int, list[str]] = {}

    def work(slot: int) -> None:
        results[slot] = [SimLLM().complete([{"role": "system", "content": prompt}, {"role": "user", "content": q}])
                         for q in questions]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1] == first


# --------------------------------------------------------------------------- unsupported and generic


def test_unsupported_question_raises() -> None:
    gsm8k = "Natalia sold clips to 48 of her friends in April. How many clips did she sell?"
    with pytest.raises(SimUnsupportedError, match="object counting, word sorting and multistep arithmetic"):
        ask(get_task("gsm8k").start_prompt, gsm8k)
    with pytest.raises(SimUnsupportedError):
        ask("", gsm8k)


def test_generic_requests_never_raise() -> None:
    assert SIM.complete([{"role": "user", "content": "hello"}])
    assert SIM.complete([{"role": "system", "content": BACKWARD_SYSTEM}, {"role": "user", "content": "anything"}])
    assert SIM.complete([{"role": "system", "content": OPTIMIZER_SYSTEM}, {"role": "user", "content": "no tags"}]) == (
        "<IMPROVED_VARIABLE></IMPROVED_VARIABLE>"
    )


# --------------------------------------------------------------------------- feedback and rewrite


def _backward(prompt: str, question: str, output: str) -> str:
    user = (
        f"<LM_SYSTEM_PROMPT> {prompt} </LM_SYSTEM_PROMPT>\n\n<LM_INPUT> {question} </LM_INPUT>\n\n"
        f"<LM_OUTPUT> {output} </LM_OUTPUT>\n\n"
    )
    return SIM.complete([{"role": "system", "content": BACKWARD_SYSTEM}, {"role": "user", "content": user}])


def test_feedback_names_the_missing_instruction() -> None:
    prompt = get_task("object_counting").start_prompt
    sentences = {i.sentence for i in CATALOGUE["object_counting"]}
    wrong = right = 0
    for question, target in synthetic("object_counting", 30):
        output = ask(prompt, question)
        feedback = _backward(prompt, question, output)
        if get_task("object_counting").score(output, target)[0]:
            right += 1
            assert "no change is needed" in feedback
        else:
            wrong += 1
            assert any(f'"{s}"' in feedback for s in sentences), feedback
    assert wrong and right
    question = synthetic("word_sorting", 1)[0][0]
    no_format = _backward(PROMPT_OPENING, question, ask(PROMPT_OPENING, question))
    assert f'"{WORDS_FORMAT}"' in no_format


def test_feedback_on_scorer_output() -> None:
    def scorer(result: str) -> str:
        user = f"<INPUTS_TO_FUNCTION> x </INPUTS_TO_FUNCTION>\n\n<OUTPUT_OF_FUNCTION> {result} </OUTPUT_OF_FUNCTION>"
        return SIM.complete([{"role": "system", "content": BACKWARD_SYSTEM}, {"role": "user", "content": user}])

    assert "correct" in scorer("1") and "wrong" not in scorer("True")
    assert "wrong" in scorer("0")


def test_rewrite_inserts_most_frequent_sentence_before_format() -> None:
    prompt = get_task("object_counting").start_prompt
    quantities, category, _ = (i.sentence for i in CATALOGUE["object_counting"])
    feedback = "".join(
        f"<CONVERSATION><LM_SYSTEM_PROMPT> {prompt} </LM_SYSTEM_PROMPT></CONVERSATION>"
        f'<FEEDBACK>Adding the instruction "{s}" can fix this error.</FEEDBACK>\n'
        for s in (category, quantities, category)
    )
    user = f"<VARIABLE> short </VARIABLE>\n<CONTEXT>{feedback}</CONTEXT>"
    reply = SIM.complete([{"role": "system", "content": OPTIMIZER_SYSTEM}, {"role": "user", "content": user}])
    new_prompt = re.fullmatch(r"<IMPROVED_VARIABLE>(.*)</IMPROVED_VARIABLE>", reply, re.DOTALL).group(1)
    assert new_prompt == f"{PROMPT_OPENING} {category} {NUMBER_FORMAT}"
    # Already learned: the next most frequent one is taken instead.
    user2 = user.replace(prompt, new_prompt)
    reply2 = SIM.complete([{"role": "system", "content": OPTIMIZER_SYSTEM}, {"role": "user", "content": user2}])
    assert reply2 == f"<IMPROVED_VARIABLE>{PROMPT_OPENING} {category} {quantities} {NUMBER_FORMAT}</IMPROVED_VARIABLE>"


# --------------------------------------------------------------------------- TextGrad end to end


def _import_textgrad() -> types.ModuleType:
    if "textgrad" not in sys.modules:
        stub = types.ModuleType("litellm")
        stub.completion = lambda *a, **k: None  # type: ignore[attr-defined]
        sys.modules.setdefault("litellm", stub)
        os.environ.setdefault("TEXTGRAD_LOG_DIR", tempfile.mkdtemp(prefix="tg-logs-"))
    import textgrad

    return textgrad


def test_textgrad_step_learns_a_catalogue_sentence() -> None:
    tg = _import_textgrad()

    class SimEngine(tg.EngineLM):
        model_string = "sim"

        def __init__(self) -> None:
            self.sim = SimLLM()

        def generate(self, prompt, system_prompt=None, **kwargs):  # type: ignore[override]
            messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
            return self.sim.complete(messages + [{"role": "user", "content": prompt}])

        def __call__(self, prompt, system_prompt=None, **kwargs):  # type: ignore[override]
            return self.generate(prompt, system_prompt=system_prompt, **kwargs)

    task = get_task("object_counting")
    engine = SimEngine()
    failing = [(q, t) for q, t in synthetic("object_counting", 60) if not task.score(ask(task.start_prompt, q), t)[0]][:4]
    assert len(failing) == 4

    prompt = tg.Variable(task.start_prompt, requires_grad=True, role_description="system prompt to the language model")
    model = tg.BlackboxLLM(engine, system_prompt=prompt)
    optimizer = tg.TextualGradientDescent(engine=engine, parameters=[prompt])

    def exact_match(prediction, ground_truth):
        return str(int(task.score(prediction.value, ground_truth.value)[0]))

    loss_fn = tg.autograd.StringBasedFunction(exact_match, "exact match of the answer with the ground truth")
    losses = []
    for question, target in failing:
        q = tg.Variable(question, requires_grad=False, role_description="question to the language model")
        y = tg.Variable(target, requires_grad=False, role_description="correct answer")
        prediction = model(q)
        losses.append(loss_fn(inputs={"prediction": prediction, "ground_truth": y}))
    tg.sum(losses).backward(engine)
    optimizer.step()

    learned = instructions_in(prompt.value, "object_counting")
    assert len(learned) == 1
    assert prompt.value.startswith(PROMPT_OPENING)
    assert split_sentences(prompt.value)[-1] == NUMBER_FORMAT


# --------------------------------------------------------------------------- merging


def _merge_request(prompts: list[str], uid: bool) -> str:
    """The simulator's reply to the server's own merge request (method/merging.py's wording)."""
    request = merge_request(prompts, "summarize-uid" if uid else "summarize", "0" * 16)
    return SIM.complete([{"role": "user", "content": request}])


def test_uid_merge_keeps_every_instruction_and_plain_summary_loses_some() -> None:
    start = get_task("object_counting").start_prompt
    prompts = [insert_instruction(start, i.sentence) for i in CATALOGUE["object_counting"]]

    uid = _merge_request(prompts, uid=True)
    assert instructions_in(uid, "object_counting") == ["quantities", "category", "recount"]
    assert split_sentences(uid)[-1] == NUMBER_FORMAT
    assert uid.count(PROMPT_OPENING) == 1

    plain = _merge_request(prompts, uid=False)
    assert len(instructions_in(plain, "object_counting")) < 3
    assert split_sentences(plain)[-1] == NUMBER_FORMAT
    assert len(plain) <= max(len(p) for p in prompts)


def test_uid_merge_deduplicates_reworded_instruction() -> None:
    start = get_task("word_sorting").start_prompt
    a = insert_instruction(start, CATALOGUE["word_sorting"][0].sentence)
    b = insert_instruction(start.upper().replace("ANSWER:", "Answer:"), "Always compare letter by letter.")
    merged = _merge_request([a, b], uid=True)
    assert merged == a
