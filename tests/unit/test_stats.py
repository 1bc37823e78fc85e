"""Intervals and paired comparisons (fedtextgrad_core/stats.py) against textbook values."""

from __future__ import annotations

import pytest

from fedtextgrad_core.stats import BETTER, NO_DIFFERENCE, WORSE, clopper_pearson, mcnemar_exact, paired, wilson


@pytest.mark.parametrize("correct, n, low, high", [
    (81, 263, 0.2553, 0.3662),  # Newcombe (1998), Statistics in Medicine 17:857, table I
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (15, 148, 0.0624, 0.1605),  # ibid.
])
def test_wilson_intervals_match_the_textbook(correct: int, n: int, low: float, high: float) -> None:
    interval = wilson(correct, n)
    assert (round(interval.low, 4), round(interval.high, 4)) == (low, high)
    assert interval.shown() == f"{100 * correct / n:.1f}% [{100 * interval.low:.1f}-{100 * interval.high:.1f}] (n={n})"


def test_an_empty_set_has_no_accuracy_and_the_widest_interval() -> None:
    empty = wilson(0, 0)
    assert (empty.accuracy, empty.low, empty.high, empty.shown()) == (None, 0.0, 1.0, "- (n=0)")


@pytest.mark.parametrize("k, n, low, high", [
    (0, 10, 0.0, 0.3085), (10, 10, 0.6915, 1.0), (5, 10, 0.1871, 0.8129), (1, 20, 0.0013, 0.2487),
])
def test_clopper_pearson_intervals_match_the_tables(k: int, n: int, low: float, high: float) -> None:
    found = clopper_pearson(k, n)
    assert (round(found[0], 4), round(found[1], 4)) == (low, high)


@pytest.mark.parametrize("b, c, p", [
    (10, 2, 158 / 4096),  # 2 * P(X <= 2 | 12, 1/2) = 2 * (1 + 12 + 66) / 2**12
    (5, 0, 0.0625),  # the fewest one-sided discordant pairs that cannot reach 5%
    (6, 0, 0.03125),  # ... and that can
    (3, 3, 1.0),
    (0, 0, 1.0),
])
def test_mcnemar_exact_p_values_by_hand(b: int, c: int, p: float) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(p)


def test_the_paired_verdict_follows_the_interval_and_the_test_alike() -> None:
    ids = [f"t/val/{i}" for i in range(40)]
    a = {i: n < 30 for n, i in enumerate(ids)}  # right on 30
    b = {i: n < 20 for n, i in enumerate(ids)}  # right on 20, each also right under a
    better = paired(a, b)
    assert (better.n, better.a_only, better.b_only, better.difference) == (40, 10, 0, 0.25)
    assert better.verdict == BETTER and better.low > 0 and better.p_value < 0.05
    assert paired(b, a).verdict == WORSE
    close = paired({i: n < 22 for n, i in enumerate(ids)}, b)  # two more right: not detectable
    assert close.verdict == NO_DIFFERENCE and close.low < 0 < close.high and close.p_value > 0.05
    # only the examples both were scored on are paired
    assert paired({**a, "t/val/99": True}, b).n == 40 and paired({}, b).n == 0
