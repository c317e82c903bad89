"""``sim.tune_lr``: the learning-rate protocol of the PowerSGD paper, on a grid, over seeds.

The protocol (Vogels, Karimireddy, Jaggi, "PowerSGD", NeurIPS 2019, experimental setup): tune the learning rate
once, on the baseline (exact all-reduce SGD), over a grid, and reuse that rate for every compressor, so a
compressor is judged by what it does to the same training recipe. A method that needs its own rate (sign methods
such as signSGD and signum, whose update has another scale) is tuned per method on the same grid and seeds, and
the table says so next to its number. Reporting both "at the baseline's rate" and "at its own best rate"
keeps the two questions apart: does the compressor hurt this recipe, and how good can it be.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from compressors.options import check_bool, check_int, invalid
from ..experiment import Experiment
from ..workflow.sweep import run_all, run_history_or_none
from .compare import final_value


def tune_lr(base: Experiment, lrs: Sequence[float], seeds: Sequence[int] = (0,), metric: str = "test_accuracy",
            higher_is_better: bool = True, processes: int = 1, progress: bool = False) -> tuple[float, pd.DataFrame]:
    """Runs ``base`` with every learning rate of ``lrs`` on every seed; returns (best lr, summary table).

    Protocol: run this on the baseline (e.g. ``compressor={"name": "identity"}``) and give every compressor
    the returned rate (``experiment.replace(lr=best)``), as the PowerSGD paper does; or call it once per method
    and report that those rates were tuned per method. Use the same seeds for tuning and for the final
    comparison only if the comparison is paired (``sim.compare``); a held-out set of seeds is stricter.

    A run's score is its final ``metric`` (the last logged step where the metric is present). A run that
    diverges (stops on a NaN/Inf gradient, or ends with a NaN/Inf score) makes its rate rank below every rate
    whose runs all finished. Among the rest the best mean over seeds wins (highest, or lowest when
    ``higher_is_better=False``); an exact tie goes to the smaller rate. ``processes``: parallel runs (as
    ``sim.sweep``). The table has one row per rate, ascending: ``lr``, ``mean`` and ``std`` (over the finished
    runs' scores; std NaN for one run), ``n`` (finished runs), ``diverged`` (runs that did not finish or score).
    """
    lrs = _check_lrs(lrs)
    seeds = list(seeds)
    if not seeds:
        raise invalid("tune_lr", "seeds", seeds, "a non-empty list of integers >= 0")
    check_bool("tune_lr", "higher_is_better", higher_is_better)
    check_int("tune_lr", "processes", processes, minimum=1)
    jobs = [(lr, base.replace(lr=lr, seed=seed)) for lr in lrs for seed in seeds]  # validated before any run
    histories = run_all([experiment for _, experiment in jobs], progress, processes, one_run=run_history_or_none)
    scores: dict[float, list[float]] = {lr: [] for lr in lrs}
    for (lr, _), history in zip(jobs, histories):
        if history is not None and metric not in history:
            raise invalid("tune_lr", "metric", metric, "a column of the run's history: " + ", ".join(history.columns))
        scores[lr].append(math.nan if history is None else final_value(history[metric]))
    table = pd.DataFrame([summarise(lr, values) for lr, values in sorted(scores.items())])
    table.attrs.update(metric=metric, higher_is_better=higher_is_better, seeds=seeds)
    return best_lr(table, higher_is_better), table


def best_lr(table: pd.DataFrame, higher_is_better: bool = True) -> float:
    """The rate of the best mean among rates with no diverged run; an exact tie goes to the smaller rate."""
    finished = table[table["diverged"] == 0]
    if finished.empty:
        raise ValueError(f"tune_lr: every learning rate in {table['lr'].tolist()} diverged on some seed; "
                         "allowed: a grid that includes smaller rates")
    key = finished["mean"] if higher_is_better else -finished["mean"]
    return float(finished[key == key.max()]["lr"].min())


def summarise(lr: float, scores: list[float]) -> dict:
    finite = pd.Series([s for s in scores if math.isfinite(s)], dtype=float)
    return {"lr": lr, "mean": finite.mean() if len(finite) else math.nan,
            "std": finite.std(ddof=1) if len(finite) > 1 else math.nan, "n": len(finite),
            "diverged": len(scores) - len(finite)}


def _check_lrs(lrs) -> list[float]:
    allowed = "a non-empty list of distinct learning rates > 0"
    if isinstance(lrs, (str, bytes)) or not isinstance(lrs, Sequence) or not lrs:
        raise invalid("tune_lr", "lrs", lrs, allowed)
    if any(isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr)
           for lr in lrs) or len(set(lrs)) != len(lrs):
        raise invalid("tune_lr", "lrs", lrs, allowed)
    return [float(lr) for lr in lrs]
