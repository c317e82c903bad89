"""``sim.tune_lr``: the learning-rate protocol of the PowerSGD paper, on a grid, over seeds, on a validation split.

The protocol (Vogels, Karimireddy, Jaggi, "PowerSGD", NeurIPS 2019, experimental setup): tune the learning rate
once, on the baseline (exact all-reduce SGD), over a grid, and reuse that rate for every compressor, so a
compressor is judged by what it does to the same training recipe. A method that needs its own rate (sign methods
such as signSGD and signum, whose update has another scale) is tuned per method on the same grid and seeds, and
the table says so next to its number. Reporting both "at the baseline's rate" and "at its own best rate"
keeps the two questions apart: does the compressor hurt this recipe, and how good can it be.

Three guards keep the tuned rate honest: the score is measured on a validation split carved from the training
set (a rate picked on the test split makes every test number after it optimistic), over at least two seeds (one
seed picks the luckiest rate), and a best rate on the edge of the grid extends the grid (the optimum may lie
beyond it).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from numbers import Integral

import pandas as pd

from compressors.options import check_bool, check_int, invalid
from ..experiment import Experiment
from ..workflow.sweep import run_all, run_history_or_none
from .compare import final_value

VALIDATION_HINT = ("val_* columns are logged when the experiment carves a validation split from the training set: "
                   "Experiment(validation_fraction=...) > 0, e.g. base.replace(validation_fraction=0.1)")


def tune_lr(base: Experiment, lrs: Sequence[float], seeds: Sequence[int] = (0, 1), metric: str = "val_accuracy",
            higher_is_better: bool = True, processes: int = 1, progress: bool = False, *, max_extensions: int = 3,
            allow_test_metric: bool = False) -> tuple[float, pd.DataFrame]:
    """Runs ``base`` with every learning rate of ``lrs`` on every seed; returns (best lr, summary table).

    Protocol: run this on the baseline (e.g. ``compressor={"name": "identity"}``) and give every compressor
    the returned rate (``experiment.replace(lr=best)``), as the PowerSGD paper does; or call it once per method
    and report that those rates were tuned per method. Use the same seeds for tuning and for the final
    comparison only if the comparison is paired (``sim.compare``); a held-out set of seeds is stricter.

    ``metric`` (default ``val_accuracy``: needs ``base`` to log a validation split) is scored on the runs'
    history; a ``test_*`` metric is refused unless ``allow_test_metric=True``, since tuning on the test split is
    the mistake this function exists to prevent. ``seeds``: at least 2 distinct ones.

    A run's score is its final ``metric`` (the last logged step where the metric is present). A run that
    diverges (stops on a NaN/Inf gradient, or ends with a NaN/Inf score) makes its rate rank below every rate
    whose runs all finished. Among the rest the best mean over seeds wins (highest, or lowest when
    ``higher_is_better=False``); an exact tie goes to the smaller rate. When the best rate is the smallest or
    the largest one tried, the grid grows by one rate beyond that edge, at the grid's own ratio there (e.g.
    0.03, 0.1, 0.3 best at 0.3 adds 0.9), all seeds are run at it and the choice is made again, at most
    ``max_extensions`` times (0: never); a best rate still on the edge after that raises a warning and sets
    ``table.attrs["on_edge"]``. When every rate diverged on some seed the grid grows downward the same way, and
    a ValueError is raised if none has finished after the extensions. A grid of one rate is never extended (it
    has no ratio).

    ``processes``: parallel runs (as ``sim.sweep``). The table has one row per rate, ascending: ``lr``, ``mean``
    and ``std`` (over the finished runs' scores; std NaN for one run), ``n`` (finished runs), ``diverged`` (runs
    that did not finish or score) and ``added`` (True for rates the extension added); ``attrs``: ``metric``,
    ``higher_is_better``, ``seeds``, ``extensions`` (how many were made) and ``on_edge``.
    """
    lrs = _check_lrs(lrs)
    seeds = _check_seeds(seeds)
    check_bool("tune_lr", "higher_is_better", higher_is_better)
    check_int("tune_lr", "processes", processes, minimum=1)
    check_int("tune_lr", "max_extensions", max_extensions, minimum=0)
    check_bool("tune_lr", "allow_test_metric", allow_test_metric)
    _check_metric(base, metric, allow_test_metric)
    scores = score_rates(base, lrs, seeds, metric, processes, progress)
    added: list[float] = []
    while True:
        table = summary_table(scores, added)
        best = best_lr(table, higher_is_better) if (table["diverged"] == 0).any() else None
        beyond = next_rate(sorted(scores), best)
        if beyond is None or len(added) == max_extensions:
            break
        scores.update(score_rates(base, [beyond], seeds, metric, processes, progress))
        added.append(beyond)
    if best is None:
        best_lr(table, higher_is_better)  # raises: every rate diverged, even after the extensions
    on_edge = beyond is not None
    if on_edge:
        warnings.warn(f"tune_lr: the best learning rate {best} is still on the edge of the grid "
                      f"{sorted(scores)} after {len(added)} extension(s); the optimum may lie beyond it "
                      "(raise max_extensions or widen lrs)", stacklevel=2)
    table.attrs.update(metric=metric, higher_is_better=higher_is_better, seeds=seeds, extensions=len(added),
                       on_edge=on_edge)
    return best, table


def score_rates(base: Experiment, lrs: Sequence[float], seeds: list[int], metric: str, processes: int,
                progress: bool) -> dict[float, list[float]]:
    """{lr: the final ``metric`` of each seed's run (NaN for a run that diverged)}; all jobs are validated
    (``Experiment.replace``) before the first one runs."""
    jobs = [(lr, base.replace(lr=lr, seed=seed)) for lr in lrs for seed in seeds]
    histories = run_all([experiment for _, experiment in jobs], progress, processes, one_run=run_history_or_none)
    scores: dict[float, list[float]] = {lr: [] for lr in lrs}
    for (lr, _), history in zip(jobs, histories):
        if history is not None and metric not in history:
            hint = f" ({VALIDATION_HINT})" if metric.startswith("val_") else ""
            raise invalid("tune_lr", "metric", metric,
                          "a column of the run's history: " + ", ".join(map(str, history.columns)) + hint)
        scores[lr].append(math.nan if history is None else final_value(history[metric]))
    return scores


def next_rate(tried: list[float], best: float | None) -> float | None:
    """The rate one grid step beyond ``best`` when it is the smallest or largest tried, else None.

    ``best`` None (every rate diverged): one step below the smallest, where a rate may still train.
    """
    if len(tried) < 2 or (best is not None and tried[0] < best < tried[-1]):
        return None
    # 12 significant digits: 0.1 * 3 is 0.30000000000000004 in binary; a table should say 0.3
    if best is not None and best == tried[-1]:
        return float(f"{best * (tried[-1] / tried[-2]):.12g}")
    return float(f"{tried[0] / (tried[1] / tried[0]):.12g}")


def summary_table(scores: dict[float, list[float]], added: Sequence[float] = ()) -> pd.DataFrame:
    rows = [{**summarise(lr, values), "added": lr in added} for lr, values in sorted(scores.items())]
    return pd.DataFrame(rows, columns=["lr", "mean", "std", "n", "diverged", "added"])


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


def _check_metric(base: Experiment, metric: str, allow_test_metric: bool) -> None:
    if not isinstance(metric, str) or not metric:
        raise invalid("tune_lr", "metric", metric, "the name of a history column, e.g. 'val_accuracy'")
    if metric.startswith("test_") and not allow_test_metric:
        raise invalid("tune_lr", "metric", metric,
                      "a metric not measured on the test split, e.g. 'val_accuracy' or 'val_loss' "
                      f"({VALIDATION_HINT}) or 'train_loss'; a rate tuned on the test split makes every test "
                      "score after it optimistic (allow_test_metric=True does it anyway: then say so)")
    # Checked before any run where the experiment can say it has no validation split; otherwise after the runs.
    fraction = getattr(base, "validation_fraction", None)
    if metric.startswith("val_") and fraction is not None and not fraction:
        raise invalid("tune_lr", "metric", metric, f"a metric the runs log; {VALIDATION_HINT}")


def _check_seeds(seeds) -> list[int]:
    allowed = "at least 2 distinct integer seeds >= 0 (one seed picks the luckiest rate, not the best)"
    if isinstance(seeds, (str, bytes)):
        raise invalid("tune_lr", "seeds", seeds, allowed)
    try:
        seeds = list(seeds)
    except TypeError:
        raise invalid("tune_lr", "seeds", seeds, allowed) from None
    if len(set(seeds)) < 2 or len(set(seeds)) != len(seeds) or any(
            isinstance(s, bool) or not isinstance(s, Integral) or s < 0 for s in seeds):
        raise invalid("tune_lr", "seeds", seeds, allowed)
    return [int(s) for s in seeds]


def _check_lrs(lrs) -> list[float]:
    allowed = "a non-empty list of distinct learning rates > 0"
    if isinstance(lrs, (str, bytes)) or not isinstance(lrs, Sequence) or not lrs:
        raise invalid("tune_lr", "lrs", lrs, allowed)
    if any(isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr)
           for lr in lrs) or len(set(lrs)) != len(lrs):
        raise invalid("tune_lr", "lrs", lrs, allowed)
    return [float(lr) for lr in lrs]
