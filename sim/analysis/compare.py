"""``sim.compare``: every configuration against a baseline, paired on seeds, with a Student-t interval and tests.

Runs of two configurations that share a seed share their data order and initialisation, so their difference
cancels most of the seed-to-seed noise; the paired interval is much tighter than comparing two independent
means. For n paired differences d_i = config_i - baseline_i (i over the shared seeds):

    mean_diff = mean(d),   se = sd(d) / sqrt(n)   (sd with n - 1 degrees of freedom)
    [ci_low, ci_high] = mean_diff -+ t_{(1 + confidence) / 2, n - 1} * se

the paired t interval (Student 1908; e.g. Wasserman, *All of Statistics*, 2004, section 10.7; it is what
``scipy.stats.ttest_rel(config, baseline).confidence_interval(confidence)`` returns). Its test (``p_value``, the
two-sided paired t test) rejects "no difference" at alpha = 1 - confidence exactly when the interval excludes 0.
Not rejecting is "not distinguishable": the data do not say which configuration is better. "Equivalent" needs
its own test against a margin (``equivalence_margin``, the two one-sided tests, ``significance.py``).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from compressors.options import invalid
from .significance import CORRECTIONS, adjust, difference_p, equivalence_p

VERDICTS = ("better", "worse", "equivalent", "not distinguishable")  # + " (censored)" in target mode, see compare
COLUMNS = ("mean", "baseline_mean", "mean_diff", "ci_low", "ci_high", "n", "p_value", "p_adjusted",
           "p_equivalence", "p_equivalence_adjusted", "never_reached", "censored", "baseline_censored", "verdict")


def compare(table: pd.DataFrame, baseline, metric: str = "test_accuracy", by: str = "label", *,
            seed: str = "seed", target: float | None = None, x: str = "step", higher_is_better: bool = True,
            confidence: float = 0.95, equivalence_margin: float | None = None,
            correction: str | None = None) -> pd.DataFrame:
    """Paired differences to ``baseline`` over seeds, one row per other configuration (in order of appearance).

    ``table``: tidy results as ``sim.sweep`` / ``sim.load_results`` return them (one row per logged step per
    run, with columns ``by``, ``seed``, ``step`` and the metric), or one row per run (no ``step`` column). A run
    is one (``by`` value, ``seed``) pair; its value is the final ``metric``: the one at the largest ``step`` where
    it is not NaN (a one-row run: that row's). A run with no such value (e.g. it diverged at once) leaves its pair
    out. Tables from ``sim.load_results`` name the configuration ``run``; ``by="label"`` uses that column when
    the table has no ``label``.

    ``target``: each run's value is instead the first value of column ``x`` ("step", "bits", "sim_time", ...)
    at which ``metric`` reaches ``target`` (>= target when ``higher_is_better``, else <=); fewer is then better
    whatever the metric's direction. A run that never reaches it is censored: its value is its last ``x`` (the
    true one is larger). Censored runs stay in their pairs, and a test that censoring could have tipped in the
    censored side's favour is not run (its one-sided p-value counts as 1): a configuration with censored runs
    is never shown "better" or "equivalent", a baseline with censored runs never makes another one "worse" or
    "equivalent". The verdict then ends in " (censored)", and ``mean_diff`` is a bound, not an estimate.

    ``equivalence_margin`` (> 0, in the units of the value: accuracy is a fraction, so 0.005 is half a point):
    adds the paired TOST at level alpha = 1 - ``confidence`` (equivalent when the (1 - 2 alpha) interval lies
    inside (-margin, margin)). ``correction="holm"``: Holm-Bonferroni over this call's comparisons, separately
    for the difference tests and for the equivalence tests; verdicts use the adjusted p-values.

    Returns columns ``by``, ``mean`` (the configuration's mean over the pairs used), ``baseline_mean``,
    ``mean_diff`` (mean of config - baseline), ``ci_low``, ``ci_high`` (the paired Student-t interval at
    ``confidence``, not adjusted; [d, d] when every difference is d; NaN when n < 2), ``n`` (pairs used),
    ``p_value`` (two-sided paired t test of no difference), ``p_adjusted`` (after ``correction``; equal to
    ``p_value`` without one), ``p_equivalence`` and ``p_equivalence_adjusted`` (the TOST's; NaN without a
    margin), ``never_reached`` (pairs with a censored run), ``censored`` and ``baseline_censored`` (censored
    runs of the configuration and of the baseline among the pairs) and ``verdict``: "better" / "worse" when
    ``p_adjusted`` < alpha, else "equivalent" when ``p_equivalence_adjusted`` < alpha, else "not
    distinguishable" (always so when n < 2). ``result.attrs`` records the arguments.
    """
    by = _resolve_by(table, by)
    _check_arguments(table, baseline, metric, by, seed, target, x, confidence, equivalence_margin, correction)
    values = run_values(table, metric, by, seed, target, x, higher_is_better)
    lower_is_better = target is not None or not higher_is_better
    rows = [{by: name, **paired_summary(**pair_arrays(values, name, baseline), confidence=confidence,
                                        lower_is_better=lower_is_better, equivalence_margin=equivalence_margin)}
            for name in pd.unique(table[by]) if name != baseline]
    result = pd.DataFrame(rows, columns=[by, *COLUMNS])
    for column in ("n", "never_reached", "censored", "baseline_censored"):
        result[column] = result[column].astype(int)
    result["p_adjusted"] = adjust(result["p_value"].to_numpy(float), correction)
    result["p_equivalence_adjusted"] = adjust(result["p_equivalence"].to_numpy(float), correction)
    result["verdict"] = [verdict(row.p_adjusted, row.p_equivalence_adjusted, row.mean_diff, 1.0 - confidence,
                                 lower_is_better, row.never_reached > 0) for row in result.itertuples()]
    result.attrs.update(baseline=baseline, metric=metric, by=by, target=target, x=x if target is not None else None,
                        higher_is_better=higher_is_better, confidence=confidence,
                        equivalence_margin=equivalence_margin, correction=correction)
    return result


def pair_arrays(values: dict, name, baseline) -> dict:
    """config, reference and their censored flags over the seeds where both runs have a value."""
    seeds = values[name].index.intersection(values[baseline].index)
    if len(seeds) == 0:
        raise ValueError(f"compare: configuration {name!r} shares no seed with baseline {baseline!r} "
                         f"(its seeds: {sorted(map(_plain, values[name].index))}; the baseline's: "
                         f"{sorted(map(_plain, values[baseline].index))}); allowed: runs of both on the same seeds")
    config, reference = values[name].loc[seeds], values[baseline].loc[seeds]
    usable = config["value"].notna() & reference["value"].notna()  # NaN: a run with no value of the metric at all
    config, reference = config[usable], reference[usable]
    return {"config": config["value"].to_numpy(float), "reference": reference["value"].to_numpy(float),
            "config_censored": config["censored"].to_numpy(bool),
            "reference_censored": reference["censored"].to_numpy(bool)}


def paired_summary(config: np.ndarray, reference: np.ndarray, confidence: float = 0.95,
                   lower_is_better: bool = False, *, equivalence_margin: float | None = None,
                   config_censored: np.ndarray | None = None, reference_censored: np.ndarray | None = None) -> dict:
    """Means, difference, t interval, p-values and verdict of paired samples (one comparison, no correction).

    ``config_censored`` / ``reference_censored``: which values are lower bounds (runs that never reached a
    target, valued at their length). A censored configuration run makes its difference look smaller than it
    is, a censored baseline run larger, so the one-sided tests those biases favour are not run (see compare).
    """
    config, reference = np.asarray(config, dtype=float), np.asarray(reference, dtype=float)
    if not (np.isfinite(config).all() and np.isfinite(reference).all()):
        raise ValueError("paired_summary: config and reference are invalid with NaN/inf entries; allowed: finite "
                         "values (a run that never reached a target: its last x, flagged as censored)")
    config_censored = np.zeros(len(config), bool) if config_censored is None else np.asarray(config_censored, bool)
    reference_censored = (np.zeros(len(reference), bool) if reference_censored is None
                          else np.asarray(reference_censored, bool))
    differences = config - reference
    n = len(differences)
    trusted = {"trust_greater": not reference_censored.any(), "trust_less": not config_censored.any()}
    low, high = t_interval(differences, confidence)
    p_value = difference_p(differences, **trusted)
    p_equivalence = (math.nan if equivalence_margin is None
                     else equivalence_p(differences, equivalence_margin, **trusted))
    never_reached = int((config_censored | reference_censored).sum())
    mean_diff = float(differences.mean()) if n else math.nan
    return {"mean": float(config.mean()) if n else math.nan,
            "baseline_mean": float(reference.mean()) if n else math.nan,
            "mean_diff": mean_diff, "ci_low": low, "ci_high": high, "n": n,
            "p_value": p_value, "p_adjusted": p_value, "p_equivalence": p_equivalence,
            "p_equivalence_adjusted": p_equivalence, "never_reached": never_reached,
            "censored": int(config_censored.sum()), "baseline_censored": int(reference_censored.sum()),
            "verdict": verdict(p_value, p_equivalence, mean_diff, 1.0 - confidence, lower_is_better,
                               never_reached > 0)}


def verdict(p_difference: float, p_equivalence: float, mean_diff: float, alpha: float, lower_is_better: bool,
            censored: bool = False) -> str:
    """The word for one comparison; NaN p-values reject nothing.

    A rejected difference wins over equivalence: a difference shown inside the margin is still a difference,
    and calling it "equivalent" would flatter the worse side.
    """
    if p_difference < alpha:
        word = "better" if (mean_diff < 0) == lower_is_better else "worse"
    elif p_equivalence < alpha:
        word = "equivalent"
    else:
        word = "not distinguishable"
    return f"{word} (censored)" if censored else word


def t_interval(differences: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of ``differences``: mean -+ t_{(1+c)/2, n-1} sd / sqrt(n) (NaN if n < 2)."""
    from scipy import stats  # here, not at import: `import sim` stays light (scipy.stats loads ~1,000 modules)

    n = len(differences)
    if n < 2:
        return math.nan, math.nan
    mean = float(np.mean(differences))
    se = float(stats.sem(differences))  # sd (ddof=1) / sqrt(n)
    if se == 0.0 or np.all(differences == differences[0]):
        return mean, mean  # no spread: scipy's interval would be NaN (scale 0), the data say exactly d
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=se)
    return float(low), float(high)


def run_values(table: pd.DataFrame, metric: str, by: str, seed: str, target: float | None = None,
               x: str = "step", higher_is_better: bool = True) -> dict:
    """{configuration: DataFrame indexed by seed, columns ``value`` and ``censored``} of every run.

    ``value`` is the run's final metric, or with a target the first x at which it reached it (``censored``
    False) or else its last x (``censored`` True). A table without a ``step`` column has one row per run.
    """
    per_run = "step" not in table
    columns = list(dict.fromkeys([by, seed, metric] + ([x] if target is not None else [])))
    rows = table[columns].assign(step=0) if per_run else table[list(dict.fromkeys(columns + ["step"]))]
    duplicated = rows.duplicated(subset=[by, seed, "step"])
    if duplicated.any():
        first = {k: _plain(v) for k, v in rows[duplicated].iloc[0].items()}
        if per_run:
            raise ValueError(f"compare: configuration {first[by]!r} has two rows with seed {first[seed]!r}; "
                             f"allowed: one row per ({by}, {seed}) in a table without a step column")
        raise ValueError(f"compare: configuration {first[by]!r} has two runs with seed {first[seed]!r} "
                         f"(step {first['step']!r} appears twice); allowed: one run per ({by}, {seed})")
    out = {}
    for name, part in rows.groupby(by, sort=False):
        per_seed = {}
        for run_seed, run in part.groupby(seed, sort=True):
            run = run.sort_values("step", kind="stable")
            per_seed[run_seed] = ((final_value(run[metric]), False) if target is None
                                  else time_to_target(run[metric], run[x], target, higher_is_better))
        out[name] = pd.DataFrame.from_dict(per_seed, orient="index", columns=["value", "censored"])
    return out


def final_value(metric: pd.Series) -> float:
    present = metric.dropna()
    return float(present.iloc[-1]) if len(present) else math.nan


def time_to_target(metric: pd.Series, x: pd.Series, target: float, higher_is_better: bool) -> tuple[float, bool]:
    """(first x where metric reaches target, False), or (the run's last x, True): censored at its length."""
    reached = (metric >= target) if higher_is_better else (metric <= target)  # NaN compares False
    if reached.any():
        return float(x[reached].iloc[0]), False
    return final_value(x), True


def _plain(value):
    """numpy scalars as Python ones, so messages read 0, not np.int64(0)."""
    return value.item() if isinstance(value, np.generic) else value


def _resolve_by(table: pd.DataFrame, by: str) -> str:
    if by == "label" and by not in table and "run" in table:
        return "run"  # sim.load_results names the configuration label "run"
    return by


def _check_arguments(table, baseline, metric, by, seed, target, x, confidence, equivalence_margin,
                     correction) -> None:
    owner = "compare"
    if not isinstance(table, pd.DataFrame) or table.empty:
        raise invalid(owner, "table", type(table).__name__, "a non-empty DataFrame (sim.sweep / sim.load_results)")
    columns = ", ".join(map(str, table.columns))
    for field, column in (("by", by), ("seed", seed), ("metric", metric)) + ((("x", x),) if target is not None else ()):
        if column not in table:
            raise invalid(owner, field, column, f"a column of the table ({columns})")
    try:
        names = list(pd.unique(table[by]))
    except TypeError:  # e.g. sim.sweep's "compressor" column holds dicts
        raise invalid(owner, "by", by, "a column of hashable values (e.g. 'label' or 'run')") from None
    if table[by].isna().any():
        raise invalid(owner, "by", by, "a column without missing values (e.g. 'label' or 'run')")
    if baseline not in names:
        values = ", ".join(repr(_plain(v)) for v in names)
        raise invalid(owner, "baseline", baseline, f"a value of column {by!r}: {values}")
    if target is not None and (not isinstance(target, (int, float)) or isinstance(target, bool)
                               or not math.isfinite(target)):
        raise invalid(owner, "target", target, "None or a finite number")
    if not isinstance(confidence, float) or not 0.0 < confidence < 1.0:
        raise invalid(owner, "confidence", confidence, "a float in (0, 1)")
    if equivalence_margin is not None and (not isinstance(equivalence_margin, (int, float))
                                           or isinstance(equivalence_margin, bool)
                                           or not 0 < equivalence_margin < math.inf):
        raise invalid(owner, "equivalence_margin", equivalence_margin,
                      "None or a finite number > 0, in the units of the compared value")
    if correction not in CORRECTIONS:
        raise invalid(owner, "correction", correction, "one of None, 'holm'")
