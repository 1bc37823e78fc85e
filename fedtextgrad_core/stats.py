"""How sure a number is: intervals for an accuracy, and paired comparisons of two prompts.

Accuracies here are counts of right answers on small sets (20 to 300 examples), and an LLM server
that batches requests does not answer the same way twice even at temperature 0, so a difference of
a few points may be noise. Every accuracy a run shows carries its sample size and a 95% Wilson
score interval, and two prompts scored on the same examples are compared pair by pair.

The paired comparison is McNemar's, exact: of the examples one prompt answers right and the other
wrong (the discordant pairs), how many go each way; without a difference each way is a coin flip.
It is exact for any sample size (no normal approximation, no resampling, so no seed), which the small
sets of this field need, and the interval of the difference comes from the same binomial (the
Clopper-Pearson interval of the share of discordant pairs the first prompt wins), so the interval
excludes zero exactly when the two-sided test rejects at 5%: the verdict and the interval never
disagree. The interval is conditional on the number of discordant pairs, as the test is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
ALPHA = 0.05
BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no detectable difference"


@dataclass(frozen=True)
class Interval:
    """An accuracy with its sample size and 95% interval."""

    correct: int
    n: int
    low: float
    high: float

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.n if self.n else None

    def shown(self) -> str:
        """'58.3% [41.0-74.1] (n=24)', or 'n=0' without examples."""
        if not self.n:
            return "- (n=0)"
        return f"{100 * self.correct / self.n:.1f}% [{100 * self.low:.1f}-{100 * self.high:.1f}] (n={self.n})"


def wilson(correct: int, n: int, z: float = Z95) -> Interval:
    """Wilson's score interval for ``correct`` of ``n`` (Wilson 1927): it stays inside [0, 1] and keeps
    its coverage near the nominal one for small n and accuracies near 0 or 1, where the textbook
    normal interval fails."""
    if n <= 0:
        return Interval(0, 0, 0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if correct <= 0 else max(0.0, centre - half)
    high = 1.0 if correct >= n else min(1.0, centre + half)
    return Interval(correct, n, low, high)


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (n up to tens of thousands)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    total = 0.0
    for i in range(k + 1):
        total += math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
    return min(1.0, total)


def clopper_pearson(k: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval for a binomial share of ``k`` in ``n``, by bisection."""
    if n <= 0:
        return 0.0, 1.0

    def solve(successes: int, goal: float) -> float:
        """The p at which P(X <= successes) falls to ``goal`` (it falls as p grows)."""
        low, high = 0.0, 1.0
        for _ in range(100):
            mid = (low + high) / 2
            if _binomial_cdf(successes, n, mid) > goal:
                low = mid
            else:
                high = mid
        return (low + high) / 2

    lower = 0.0 if k == 0 else solve(k - 1, 1 - alpha / 2)
    upper = 1.0 if k == n else solve(k, alpha / 2)
    return lower, upper


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided p-value of McNemar's exact test for ``b`` and ``c`` discordant pairs: twice the smaller
    binomial tail of Binomial(b + c, 1/2), at most 1."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * _binomial_cdf(min(b, c), n, 0.5))


@dataclass(frozen=True)
class PairedComparison:
    """Prompt A against prompt B on the same ``n`` examples: A's accuracy minus B's, its 95% interval,
    McNemar's exact p-value, and the verdict for A."""

    n: int
    a_only: int  # examples A answers right and B wrong
    b_only: int  # the other way
    difference: float  # A's accuracy minus B's, in [-1, 1]
    low: float
    high: float
    p_value: float
    verdict: str  # BETTER, WORSE or NO_DIFFERENCE (for A)

    def shown(self) -> str:
        if not self.n:
            return "no examples in common"
        return (f"{self.verdict} ({100 * self.difference:+.1f} points [{100 * self.low:+.1f}, {100 * self.high:+.1f}], "
                f"McNemar p = {self.p_value:.3g}, n = {self.n})")


def paired(a: Mapping[str, bool], b: Mapping[str, bool], alpha: float = ALPHA) -> PairedComparison:
    """Compare prompt A with prompt B on the examples both were scored on (keyed by example id)."""
    common = sorted(set(a) & set(b))
    a_only = sum(1 for key in common if a[key] and not b[key])
    b_only = sum(1 for key in common if b[key] and not a[key])
    n, discordant = len(common), a_only + b_only
    if not n:
        return PairedComparison(0, 0, 0, 0.0, 0.0, 0.0, 1.0, NO_DIFFERENCE)
    share_low, share_high = clopper_pearson(a_only, discordant, alpha) if discordant else (0.5, 0.5)
    low, high = discordant / n * (2 * share_low - 1), discordant / n * (2 * share_high - 1)
    p_value = mcnemar_exact(a_only, b_only)
    verdict = BETTER if low > 0 else WORSE if high < 0 else NO_DIFFERENCE
    return PairedComparison(n, a_only, b_only, (a_only - b_only) / n, low, high, p_value, verdict)
