"""``sim.compare``: every configuration against a baseline, paired on seeds, with a Student-t interval.

Runs of two configurations that share a seed share their data order and initialisation, so their difference
cancels most of the seed-to-seed noise; the paired interval is much tighter than comparing two independent
means. For n paired differences d_i = config_i - baseline_i (i over the shared seeds):

    mean_diff = mean(d),   se = sd(d) / sqrt(n)   (sd with n - 1 degrees of freedom)
    [ci_low, ci_high] = mean_diff -+ t_{(1 + confidence) / 2, n - 1} * se

the paired t interval (Student 1908; e.g. Wasserman, *All of Statistics*, 2004, section 10.7; it is what
``scipy.stats.ttest_rel(config, baseline).confidence_interval(confidence)`` returns). An interval that contains
0 is "not distinguishable": the data do not say which configuration is better, whatever the means' order.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from compressors.options import invalid

VERDICTS = ("better", "worse", "not distinguishable")
COLUMNS = ("mean", "baseline_mean", "mean_diff", "ci_low", "ci_high", "n", "never_reached", "verdict")


def compare(table: pd.DataFrame, baseline, metric: str = "test_accuracy", by: str = "label", *,
            seed: str = "seed", target: float | None = None, x: str = "step", higher_is_better: bool = True,
            confidence: float = 0.95) -> pd.DataFrame:
    """Paired differences to ``baseline`` over seeds, one row per other configuration (in order of appearance).

    ``table``: tidy results as ``sim.sweep`` / ``sim.load_results`` return them (one row per logged step per
    run, with columns ``by``, ``seed``, ``step`` and the metric). A run is one (``by`` value, ``seed``) pair; its
    value is the final ``metric``: the one at the largest ``step`` where it is not NaN. A run with no such value
    (e.g. it diverged at once) leaves its pair out. Tables from ``sim.load_results`` name the configuration
    ``run``; ``by="label"`` uses that column when the table has no ``label``.

    ``target``: each run's value is instead the first value of column ``x`` ("step", "bits", "sim_time", ...)
    at which ``metric`` reaches ``target`` (>= target when ``higher_is_better``, else <=), and inf for a run
    that never does. Fewer is then better whatever the metric's direction. A pair with inf on either side is
    counted in ``never_reached`` and left out of ``mean``, ``baseline_mean``, ``mean_diff`` and the interval,
    which use the finite pairs only (NaN interval with fewer than 2 of them). Read ``never_reached`` next to the
    interval: a configuration that often fails to reach the target is not shown "better" by its finite pairs.

    Returns columns ``by``, ``mean`` (the configuration's mean over the pairs used), ``baseline_mean``,
    ``mean_diff`` (mean of config - baseline), ``ci_low``, ``ci_high`` (the paired Student-t interval at
    ``confidence``, scipy.stats; [d, d] when every difference is d; NaN when n < 2), ``n`` (pairs used),
    ``never_reached`` (0 without ``target``) and ``verdict``: "better" / "worse" when the interval excludes 0,
    else "not distinguishable" (always so when n < 2). ``result.attrs`` records the arguments.
    """
    by = _resolve_by(table, by)
    _check_arguments(table, baseline, metric, by, seed, target, x, confidence)
    values = run_values(table, metric, by, seed, target, x, higher_is_better)
    lower_is_better = target is not None or not higher_is_better
    rows = []
    for name in pd.unique(table[by]):
        if name == baseline:
            continue
        seeds = values[name].index.intersection(values[baseline].index)
        if len(seeds) == 0:
            raise ValueError(f"compare: configuration {name!r} shares no seed with baseline {baseline!r} "
                             f"(its seeds: {sorted(map(_plain, values[name].index))}; the baseline's: "
                             f"{sorted(map(_plain, values[baseline].index))}); allowed: runs of both on the same seeds")
        config, reference = values[name][seeds], values[baseline][seeds]
        usable = config.notna() & reference.notna()  # NaN: a run with no value of the metric at all
        config, reference = config[usable], reference[usable]
        rows.append({by: name, **paired_summary(config.to_numpy(float), reference.to_numpy(float),
                                                confidence, lower_is_better)})
    result = pd.DataFrame(rows, columns=[by, *COLUMNS])
    result["n"] = result["n"].astype(int)
    result["never_reached"] = result["never_reached"].astype(int)
    result.attrs.update(baseline=baseline, metric=metric, by=by, target=target, x=x if target is not None else None,
                        higher_is_better=higher_is_better, confidence=confidence)
    return result


def paired_summary(config: np.ndarray, reference: np.ndarray, confidence: float = 0.95,
                   lower_is_better: bool = False) -> dict:
    """Mean difference, t interval and verdict of paired samples (inf entries: counted, then left out)."""
    finite = np.isfinite(config) & np.isfinite(reference)
    never_reached = int((~finite).sum())
    config, reference = config[finite], reference[finite]
    differences = config - reference
    n = len(differences)
    mean_diff = float(differences.mean()) if n else math.nan
    low, high = t_interval(differences, confidence)
    if math.isnan(low) or low <= 0 <= high:
        verdict = "not distinguishable"
    else:
        verdict = "better" if (high < 0) == lower_is_better else "worse"
    return {"mean": float(config.mean()) if n else math.nan,
            "baseline_mean": float(reference.mean()) if n else math.nan,
            "mean_diff": mean_diff, "ci_low": low, "ci_high": high, "n": n, "never_reached": never_reached,
            "verdict": verdict}


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
    """{configuration: Series indexed by seed} of each run's final metric, or the x at which it reached target."""
    columns = list(dict.fromkeys([by, seed, "step", metric] + ([x] if target is not None else [])))
    rows = table[columns]
    duplicated = rows.duplicated(subset=[by, seed, "step"])
    if duplicated.any():
        first = {k: _plain(v) for k, v in rows[duplicated].iloc[0].items()}
        raise ValueError(f"compare: configuration {first[by]!r} has two runs with seed {first[seed]!r} "
                         f"(step {first['step']!r} appears twice); allowed: one run per ({by}, {seed})")
    out = {}
    for name, part in rows.groupby(by, sort=False):
        per_seed = {}
        for run_seed, run in part.groupby(seed, sort=True):
            run = run.sort_values("step", kind="stable")
            per_seed[run_seed] = (final_value(run[metric]) if target is None
                                  else first_reaching(run[metric], run[x], target, higher_is_better))
        out[name] = pd.Series(per_seed, dtype=float)
    return out


def final_value(metric: pd.Series) -> float:
    present = metric.dropna()
    return float(present.iloc[-1]) if len(present) else math.nan


def first_reaching(metric: pd.Series, x: pd.Series, target: float, higher_is_better: bool) -> float:
    reached = (metric >= target) if higher_is_better else (metric <= target)  # NaN compares False
    return float(x[reached].iloc[0]) if reached.any() else math.inf


def _plain(value):
    """numpy scalars as Python ones, so messages read 0, not np.int64(0)."""
    return value.item() if isinstance(value, np.generic) else value


def _resolve_by(table: pd.DataFrame, by: str) -> str:
    if by == "label" and by not in table and "run" in table:
        return "run"  # sim.load_results names the configuration label "run"
    return by


def _check_arguments(table, baseline, metric, by, seed, target, x, confidence) -> None:
    owner = "compare"
    if not isinstance(table, pd.DataFrame) or table.empty:
        raise invalid(owner, "table", type(table).__name__, "a non-empty DataFrame (sim.sweep / sim.load_results)")
    columns = ", ".join(map(str, table.columns))
    for field, column in (("by", by), ("seed", seed), ("metric", metric)) + ((("x", x),) if target is not None else ()):
        if column not in table:
            raise invalid(owner, field, column, f"a column of the table ({columns})")
    if "step" not in table:
        raise invalid(owner, "table", "without a 'step' column", f"a results table with a step column ({columns})")
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
