"""Statistics of final validation losses: summary, the public significance rule, baseline comparison,
Holm's correction for many comparisons.

The public speedrun rule for a new record with n runs of mean final loss m:

    (target - m) * sqrt(n) >= 0.004,   with the run-to-run sigma taken as 0.0013.

Dividing by sigma, this is exactly the one-sided one-sample z-test (sigma known = 0.0013) of
    H0: the true mean loss >= target   against   H1: the true mean loss < target,
with statistic z = (target - m) * sqrt(n) / sigma, rejecting H0 when z >= 0.004 / 0.0013 = 3.0769,
i.e. at one-sided level p = P(Z >= 3.0769) = 0.00105 (the rule's "p < 0.001" rounds this;
strict p < 0.001 would need z >= 3.0902). `public_significance` applies the rule as written and
reports z and that p-value. That p is one-sided; the p of `compare_means` (ours vs the baseline)
is two-sided.

The rule's verdict is decided in exact decimal arithmetic on the logged digits, so that a set
exactly on the margin passes (n = 4 runs of mean 3.278 at target 3.28: (3.28 - 3.278) * 2 = 0.004,
which binary floating point computes as 0.0039999...). Each loss is taken as the shortest decimal
that reads back as the same double (`repr`), which is the logged text itself for any value logged
with at most 15 significant digits (ours have 7). With S the sum of the n losses and t the target,
(t - S/n) * sqrt(n) >= c  <=>  n*t - S >= 0  and  (n*t - S)^2 >= c^2 * n, all exact in Decimal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, localcontext

from scipy import stats as _scipy_stats

PUBLIC_TARGET = 2.92
PUBLIC_SIGMA = 0.0013
PUBLIC_THRESHOLD = 0.004


@dataclass
class Summary:
    """mean, sample standard deviation (ddof=1; nan when n < 2) and count of a list of values."""

    mean: float
    std: float
    n: int


@dataclass
class Significance:
    """The public rule applied to n losses: margin = (target - mean) * sqrt(n) (a float, for
    display); significant = margin >= threshold decided exactly (`rule_passes`); z = margin / sigma;
    p_value = P(Z >= z), Z ~ N(0, 1): one-sided."""

    target: float
    mean: float
    n: int
    margin: float
    threshold: float
    significant: bool
    z: float
    p_value: float


@dataclass
class Comparison:
    """ours - baseline: difference of means, the test used and its two-sided p-value
    (None when no test is possible, e.g. a single run on each side)."""

    diff: float
    test: str
    p_value: float | None
    n_ours: int
    n_baseline: int


def summarize(values: list[float]) -> Summary:
    """[n] -> Summary(mean, std with ddof=1, n). Raises ValueError on an empty list."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarize")
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return Summary(mean, std, n)


def _exact(value: float) -> Decimal:
    """The decimal a float was logged as: its shortest round-trip text (module docstring)."""
    return Decimal(repr(float(value)))


def rule_passes(losses: list[float], target: float, threshold: float = PUBLIC_THRESHOLD) -> bool:
    """(target - mean) * sqrt(n) >= threshold, decided exactly in decimal arithmetic (see the
    module docstring). losses [n], all finite."""
    n = len(losses)
    with localcontext() as ctx:
        ctx.prec = 200  # far more digits than any sum or square below needs: every step is exact
        gap = n * _exact(target) - sum((_exact(v) for v in losses), Decimal(0))  # n * (target - mean)
        return gap >= 0 and gap * gap >= _exact(threshold) ** 2 * n


def public_significance(
    losses: list[float],
    target: float = PUBLIC_TARGET,
    sigma: float = PUBLIC_SIGMA,
    threshold: float = PUBLIC_THRESHOLD,
) -> Significance:
    """The public record rule (module docstring) on final losses [n]. Raises ValueError when a
    loss or the target is not finite (nan or inf would make the rule meaningless)."""
    bad = [v for v in [*losses, target] if not math.isfinite(v)]
    if bad:
        raise ValueError(f"the significance rule needs finite losses and target, got {bad[0]}")
    s = summarize(losses)
    margin = (target - s.mean) * math.sqrt(s.n)
    z = margin / sigma
    p_value = float(_scipy_stats.norm.sf(z))
    significant = rule_passes(losses, target, threshold)
    return Significance(target, s.mean, s.n, margin, threshold, significant, z, p_value)


def compare_means(ours: list[float], baseline: list[float]) -> Comparison:
    """Difference of mean losses (ours - baseline) and its two-sided p-value.

    Both sides n >= 2: Welch's t-test (unequal variances). One side a single run: one-sample t-test
    of the other side's runs against that value (its own noise ignored). Both single: no test.
    """
    a, b = summarize(ours), summarize(baseline)
    diff = a.mean - b.mean
    if a.n >= 2 and b.n >= 2:
        result = _scipy_stats.ttest_ind(ours, baseline, equal_var=False)
        test = "Welch's t-test"
    elif a.n >= 2:
        result = _scipy_stats.ttest_1samp(ours, b.mean)
        test = "one-sample t-test vs the baseline's single run"
    elif b.n >= 2:
        result = _scipy_stats.ttest_1samp(baseline, a.mean)
        test = "one-sample t-test of the baseline runs vs our single run"
    else:
        return Comparison(diff, "none (one run on each side)", None, a.n, b.n)
    p = float(result.pvalue)
    return Comparison(diff, test, None if math.isnan(p) else p, a.n, b.n)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: sorted ascending, the i-th smallest (i = 1..m)
    times m - i + 1, made non-decreasing (a running maximum) and capped at 1. Rejecting where the adjusted p
    is below alpha is Holm's procedure (reject p_(i) while p_(i) <= alpha / (m - i + 1)): the probability of
    any false rejection among the m stays at most alpha, whatever their dependence."""
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda k: p_values[k])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
