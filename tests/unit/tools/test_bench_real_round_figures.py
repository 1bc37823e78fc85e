"""The arithmetic behind bench_real_round's figures: wall time of overlapping calls, and what side
by side feedback calls can give a step."""

from __future__ import annotations

import pytest

from tests.benchmarks.bench_real_round import covered, in_flight, spans_of, whole_step_reach


def test_covered_counts_overlapping_calls_once_and_gaps_not_at_all() -> None:
    assert covered([(0.0, 4.0), (1.0, 3.0), (2.0, 6.0), (10.0, 11.0)]) == pytest.approx(7.0)
    assert covered([]) == 0.0


def test_in_flight_is_call_seconds_over_wall_seconds_of_one_kind() -> None:
    calls = [("feedback", 0.0, 4.0), ("feedback", 0.0, 4.0), ("feedback", 2.0, 6.0), ("rewrite", 6.0, 9.0)]
    assert in_flight(spans_of(calls, "feedback")) == pytest.approx(12.0 / 6.0)
    assert in_flight(spans_of(calls, "other")) == 0.0


def test_whole_step_reach_shows_when_the_step_goal_cannot_be_met() -> None:
    # 85 s of feedback one call at a time, 27 s of the rest, a server twice as fast with 3 in flight
    reach = whole_step_reach(before_feedback=85.0, rest=27.0, gain=2.0)
    assert reach["goal"] == pytest.approx(56.0)
    assert reach["bound"] == pytest.approx(69.5)
    assert reach["most_rest"] == pytest.approx(0.1 * 85.0 / 0.9)
    assert reach["bound_over_goal"] > 1.1  # so the goal is out of reach with this rest
    # with the rest at its most the bound is exactly 1.1x the goal
    edge = whole_step_reach(before_feedback=85.0, rest=reach["most_rest"], gain=2.0)
    assert edge["bound_over_goal"] == pytest.approx(1.1)
    # a server that gains no more than 1.1x: any rest will do
    assert whole_step_reach(before_feedback=85.0, rest=27.0, gain=1.05)["most_rest"] == float("inf")
