"""Replies are claims: numbers that cannot be true fail that client and never reach a result.

Each test names the attack. The loop runs over a scripted pool (the server's real loop, recorder and
run folder; clients that say what the test makes them say). The same attacks under a real `flwr run`
are in tests/integration/test_hostile_participants.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fedtextgrad_core.llm.engine import Usage
from fedtextgrad_core.method.evaluation import Scores
from fedtextgrad_core.run.claims import Bounds, eval_problem, shown, train_problem
from fedtextgrad_core.run.messages import EvalReply, Phase
from fedtextgrad_core.run.run_folder import RunFolder
from fedtextgrad_core.run.settings import RunSettings
from tests.support.scripted_pool import ScriptedPool, eval_reply, evals, make_federation, start_prompt, uploads

BOUNDS = Bounds.of(RunSettings.from_config({}))  # synthetic-size 250: validation splits of at most 100


def lying(correct: int, total: int, **usage: float) -> EvalReply:
    return dataclasses.replace(eval_reply(2, 0, 10), scores=Scores(correct=correct, total=total, malformed=0,
                                                                    seconds=0.0),
                               usage=Usage(**{"calls": min(total, 10), **usage}))


@pytest.mark.parametrize("correct, total, why", [
    (10**9, 10**9, "evaluation total is 1e+09, more than the 100"),
    (-5, 10, "evaluation correct is -5, below 0"),
    (11, 10, "evaluation correct is 11, more than the 10"),
    (5, -10, "evaluation total is -10, below 0"),
])
def test_impossible_scores_are_refused(correct: int, total: int, why: str) -> None:
    """Attack: a client inflates, negates or invents its validation score to decide the best prompt."""
    assert why in (eval_problem(lying(correct, total), BOUNDS.val) or "")


def test_inflated_costs_and_non_finite_numbers_are_refused() -> None:
    """Attack: a client inflates the cost a run reports, or sends NaN to poison an average."""
    assert "prompt tokens" in (eval_problem(lying(5, 10, prompt_tokens=10**15), BOUNDS.val) or "")
    assert "LLM calls is 1e+06" in (eval_problem(lying(5, 10, calls=10**6), BOUNDS.val) or "")
    nan = dataclasses.replace(lying(5, 10), scores=Scores(correct=5, total=10, malformed=0, seconds=float("nan")))
    assert "not a finite number" in (eval_problem(nan, BOUNDS.val) or "")
    honest = uploads(start_prompt())[100]
    assert train_problem(honest, BOUNDS, 8000) is None
    more_steps = dataclasses.replace(honest, local=dataclasses.replace(honest.local, steps=100))
    assert "local steps is 100, but 3 were asked" in (train_problem(more_steps, BOUNDS, 8000) or "")
    huge = dataclasses.replace(honest, num_examples=10**7)
    assert "training examples is 1e+07" in (train_problem(huge, BOUNDS, 8000) or "")
    accuracy = dataclasses.replace(honest, local=dataclasses.replace(honest.local, batch_accuracy_after=7.0))
    assert "batch accuracy after is 7" in (train_problem(accuracy, BOUNDS, 8000) or "")


def test_the_bounds_follow_what_the_server_knows() -> None:
    assert (BOUNDS.train, BOUNDS.val, BOUNDS.test) == (50, 100, 100)  # BBH's reference split beats synthetic 250
    bigger = Bounds.of(RunSettings.from_config({"synthetic-size": 1000, "max-val-examples": 30}))
    assert (bigger.train, bigger.val, bigger.test) == (200, 30, 400)
    gsm8k = Bounds.of(RunSettings.from_config({"task": "gsm8k", "llm-backend": "openai", "llm-model": "m",
                                               "llm-base-url": "http://127.0.0.1:1/v1"}))
    assert (gsm8k.train, gsm8k.val) == (200, 300)


def test_a_lying_client_fails_that_round_and_never_changes_the_result(tmp_path: Path) -> None:
    """Attack: a client claims 10^9 correct of 10^9 to win the best prompt; the run goes on without it."""
    start = start_prompt()
    round1 = uploads(start)
    pool = ScriptedPool(3, {
        (Phase.EVALUATE, 0): evals((4, 10), (6, 10), (5, 10)),
        (Phase.TRAIN, 1): {**round1, 102: dataclasses.replace(round1[100], partition_id=2)},
        (Phase.EVALUATE, 1): {**evals((8, 10), (6, 10)), 102: lying(10**9, 10**9)},
        (Phase.TEST, 1): evals((9, 10), (7, 10), (1, 10)),
    })
    lines: list[str] = []
    fed = make_federation(tmp_path, pool, rounds=1, lines=lines)
    fed.run()
    (record,) = RunFolder(fed.recorder.path).read_rounds()
    assert record.val_accuracy == 0.7 and record.val_examples == 20  # the two honest clients only
    (failure,) = record.failures
    assert failure.node_id == 102 and failure.stage == "evaluate"
    assert failure.reason.startswith("reply refused: evaluation total is 1e+09, more than the 100")
    assert any("reply refused" in line for line in lines)


def test_client_text_reaches_the_terminal_and_files_as_one_safe_line(tmp_path: Path) -> None:
    """Attack: a client's error line or model name carries ANSI escapes (clear the screen, fake a line)
    and megabytes of text, to hide or forge what the operator reads."""
    assert shown("\x1b[2J\x1b[31mok\x1b[0m\nFAKE: round 9 best\u202e\u200b", 100) == "ok FAKE: round 9 best"
    assert shown("x" * 10_000, 500).endswith("... (10000 characters)")
    start = start_prompt()
    hostile = "\x1b]0;owned\x07\x1b[2J" + "y" * 20_000
    pool = ScriptedPool(3, {
        (Phase.EVALUATE, 0): {**evals((4, 10), (6, 10)), 102: hostile},
        (Phase.TRAIN, 1): {**uploads(start), 102: hostile},
        (Phase.EVALUATE, 1): {**evals((8, 10), (6, 10)),
                              102: dataclasses.replace(eval_reply(2, 1, 10), llm="\x1b[1mbig\x1b[0m model\n")},
        (Phase.TEST, 1): evals((9, 10), (7, 10), (1, 10)),
    })
    lines: list[str] = []
    fed = make_federation(tmp_path, pool, rounds=1, lines=lines)
    fed.run()
    printed = "\n".join(lines)
    assert "\x1b" not in printed and "y" * 600 not in printed
    written = (fed.recorder.path / "rounds.jsonl").read_text()
    assert "\\u001b" not in written and "y" * 600 not in written
    (record,) = RunFolder(fed.recorder.path).read_rounds()
    assert [e.reply.llm for e in record.evaluations if e.client.node_id == 102] == ["big model"]
    assert json.loads(written.splitlines()[0])["round"] == 1
