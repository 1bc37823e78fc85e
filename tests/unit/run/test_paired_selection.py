"""The best prompt chosen with noise in mind (best-rule) and the paired comparisons a run reports.

The clients are scripted: their validation and test outcomes are set example by example, so one
improvement is large enough to be detected on the same examples and another is one example, as
noise would be. These are the scripted outcomes of a test double, not evidence about a method.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtextgrad_core.run.messages import Phase
from fedtextgrad_core.run.run_folder import RunFolder
from fedtextgrad_core.stats import BETTER, NO_DIFFERENCE
from tests.support.scripted_pool import ScriptedPool, eval_outcomes, make_federation, start_prompt, uploads

N = 10  # validation examples per client


def right(count: int, n: int = N) -> list[bool]:
    return [i < count for i in range(n)]


def script(start: str) -> dict:
    """Round 1 lifts validation from 6/20 to 18/20 (detectable); round 2 to 19/20 (one example)."""
    return {
        (Phase.EVALUATE, 0): {100: eval_outcomes(0, right(3)), 101: eval_outcomes(1, right(3))},
        (Phase.TRAIN, 1): uploads(start),
        (Phase.EVALUATE, 1): {100: eval_outcomes(0, right(9)), 101: eval_outcomes(1, right(9))},
        (Phase.TRAIN, 2): lambda request: uploads(request.prompt),
        (Phase.EVALUATE, 2): {100: eval_outcomes(0, right(10)), 101: eval_outcomes(1, right(9))},
        (Phase.TEST, 2): lambda request: {100: eval_outcomes(0, right(8 if "List" in request.prompt else 2), "test"),
                                          101: eval_outcomes(1, right(5), "test")},
    }


@pytest.mark.parametrize("rule, best_round", [("reference", 2), ("paired", 1)])
def test_scripted_outcomes_one_detectable_improvement_and_one_within_noise(tmp_path: Path, rule: str,
                                                                           best_round: int) -> None:
    """Scripted: the reference rule takes round 2's one-example gain; the paired rule keeps round 1's prompt,
    whose gain over the start prompt was detectable and round 2's over it was not."""
    lines: list[str] = []
    fed = make_federation(tmp_path, ScriptedPool(2, script(start_prompt())), lines=lines,
                          **{"best-rule": rule, "test-prompts": "best,last,initial", "min-train-clients": 2})
    summary = fed.run()
    first, second = RunFolder(tmp_path / "run").read_rounds()
    assert first.best_comparison.verdict == BETTER and first.best_comparison.n == 20
    assert (first.best_comparison.a_only, first.best_comparison.b_only) == (12, 0)
    assert second.best_comparison.verdict == NO_DIFFERENCE and second.best_comparison.a_only == 1
    assert summary.best_round == best_round and summary.best_rule == rule
    assert first.val_interval.shown() == "90.0% [69.9-97.2] (n=20)"
    assert any("against the best before: better" in line for line in lines)
    assert any("decides: best-rule paired" in line for line in lines) == (rule == "paired")


def test_the_summary_holds_intervals_comparisons_and_every_outcome(tmp_path: Path) -> None:
    """Scripted: best and last against the start prompt on the same test examples, and the outcomes on disk."""
    lines: list[str] = []
    fed = make_federation(tmp_path, ScriptedPool(2, script(start_prompt())), lines=lines,
                          **{"best-rule": "reference", "test-prompts": "best,last,initial", "min-train-clients": 2})
    summary = fed.run()
    assert summary.initial_val_interval.shown() == "30.0% [14.5-51.9] (n=20)"
    assert set(summary.test_intervals) == {"best", "last", "initial"}
    assert set(summary.comparisons) == {"best vs initial", "last vs initial"}
    best = summary.comparisons["best vs initial"]  # client 0: 8 of 10 right against 2; client 1: 5 against 5
    assert (best.n, best.a_only, best.b_only, best.verdict) == (20, 6, 0, BETTER)
    assert summary.test_intervals["initial"].shown() == "35.0% [18.1-56.7] (n=20)"
    outcomes = summary.test_outcomes["initial"]
    assert len(outcomes) == 20 and all(key.startswith("object_counting/test/") for key in outcomes)
    written = RunFolder(tmp_path / "run").read_summary()
    assert written.comparisons == summary.comparisons and written.test_outcomes == summary.test_outcomes
    assert any(line.startswith("test, best vs initial: ") for line in lines)
