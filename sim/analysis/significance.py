"""The paired t tests behind ``sim.compare``: one-sided p-values, equivalence (TOST), the Holm correction.

For paired differences d_1..d_n with mean m and standard error se = sd(d) / sqrt(n) (sd with n - 1 degrees of
freedom), the one-sided paired t test of "the mean difference exceeds s" has

    t = (m - s) / se,   p = P(T_{n-1} >= t)            (alternative "greater"; "less": P(T_{n-1} <= t))

(Student 1908; ``scipy.stats.ttest_rel(config, baseline + s, alternative=...)`` gives the same p). The two-sided
test of "no difference" is twice the smaller one-sided p-value at s = 0. Equivalence within a margin e > 0 is the
two one-sided tests (TOST; Schuirmann, J. Pharmacokinet. Biopharm. 15, 1987): reject "mean <= -e" and reject
"mean >= e"; its p-value is the larger of the two, and it rejects at level alpha exactly when the (1 - 2 alpha)
t interval lies inside (-e, e). Holm's step-down correction (Holm, Scand. J. Statist. 6, 1979) controls the
family-wise error rate over the m tests of one call without assuming anything about their dependence.
"""
from __future__ import annotations

import math

import numpy as np

ALTERNATIVES = ("greater", "less")
CORRECTIONS = (None, "holm")


def one_sided_p(differences: np.ndarray, shift: float, alternative: str) -> float:
    """p-value of the paired t test of H1: mean(differences) > shift ("greater") or < shift ("less").

    NaN with fewer than 2 differences. With no spread the data say the mean exactly, so p is 0 when it lies
    strictly on H1's side and 1 otherwise (scipy returns NaN or a 0/0 there).
    """
    from scipy import stats  # here, not at import: `import sim` stays light (scipy.stats loads ~1,000 modules)

    if alternative not in ALTERNATIVES:
        raise ValueError(f"one_sided_p: alternative={alternative!r} is invalid; allowed: one of 'greater', 'less'")
    n = len(differences)
    if n < 2:
        return math.nan
    mean = float(np.mean(differences))
    se = float(stats.sem(differences))
    if se == 0.0 or np.all(differences == differences[0]):
        beyond = mean > shift if alternative == "greater" else mean < shift
        return 0.0 if beyond else 1.0
    t = (mean - shift) / se
    return float(stats.t.sf(t, n - 1) if alternative == "greater" else stats.t.cdf(t, n - 1))


def difference_p(differences: np.ndarray, trust_greater: bool = True, trust_less: bool = True) -> float:
    """Two-sided p-value of "mean difference 0": twice the smaller one-sided p-value, at most 1.

    ``trust_greater=False`` (or ``trust_less``) drops that side: its one-sided p-value counts as 1. ``compare``
    does this where censored runs bias the differences toward that side, so the data cannot show it.
    """
    greater = one_sided_p(differences, 0.0, "greater") if trust_greater else 1.0
    less = one_sided_p(differences, 0.0, "less") if trust_less else 1.0
    if math.isnan(greater) or math.isnan(less):
        return math.nan
    return min(1.0, 2.0 * min(greater, less))


def equivalence_p(differences: np.ndarray, margin: float, trust_greater: bool = True,
                  trust_less: bool = True) -> float:
    """TOST p-value of "|mean difference| < margin": the larger of the two one-sided p-values.

    "greater" is the test of mean > -margin, "less" the test of mean < margin; an untrusted side counts as 1.
    """
    above = one_sided_p(differences, -margin, "greater") if trust_greater else 1.0
    below = one_sided_p(differences, margin, "less") if trust_less else 1.0
    if math.isnan(above) or math.isnan(below):
        return math.nan
    return max(above, below)


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values: sorted ascending, p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).

    m counts every entry, NaN ones too (a comparison with no p-value still belongs to the family; counting it
    only makes the others' adjustment larger); NaN entries stay NaN. Rejecting where p~ < alpha is Holm's test.
    """
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    adjusted = np.full(m, math.nan)
    order = np.argsort(np.where(np.isnan(p), np.inf, p), kind="stable")
    running = 0.0
    for rank, index in enumerate(order):
        if math.isnan(p[index]):
            break  # NaN entries sort last
        running = max(running, min(1.0, (m - rank) * p[index]))  # the max keeps the adjusted values monotone
        adjusted[index] = running
    return adjusted


def adjust(p_values, correction: str | None) -> np.ndarray:
    """The p-values adjusted by ``correction`` (None: unchanged)."""
    p = np.asarray(p_values, dtype=float)
    if correction is None:
        return p.copy()
    if correction == "holm":
        return holm(p)
    raise ValueError(f"adjust: correction={correction!r} is invalid; allowed: one of None, 'holm'")
