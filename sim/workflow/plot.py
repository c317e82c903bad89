"""Plots of a results table (``sim.load_results`` or ``sim.sweep``): a metric against steps, bits or time.

One line per configuration (the ``run`` column), the mean over seeds, and a shaded band over seeds (min to
max, or mean +- one standard deviation). Seeds are aligned on ``step``; the x value at a step is the mean over
seeds (bits and simulated time are the same for every seed of a deterministic compressor). Rows where the
metric is missing (e.g. test accuracy between evaluations) are dropped. A configuration that sends at least the
dense bits carries " (dense)" in its ``run`` label (``sim.workflow.store.label``), so its legend entry says so.
``compression_error`` is ||update - mean_i g_i|| / ||mean_i g_i||: the applied update (error-feedback memory
included) against the exact mean of this step's gradients. matplotlib runs headless (Agg) unless the caller
already chose a backend.

``plot_differences`` draws ``sim.compare``'s table: mean differences to the baseline with their paired intervals.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .io import write_atomically

#: x-axis column -> (scale applied, axis label).
X_AXES = {
    "step": (1.0, "step"),
    "bits": (1.0 / 8e6, "MB sent per worker"),
    "sim_time": (1.0, "simulated wall-clock (s)"),
}
BANDS = ("minmax", "std", "none")
LABELS = {"test_accuracy": "test accuracy", "test_perplexity": "test perplexity", "train_loss": "training loss",
          "test_loss": "test loss", "compression_error": "relative error of the update vs the exact mean", "memory_norm": "memory norm"}


def _pyplot():
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # headless by default; never switch a backend the caller chose
        matplotlib.use("Agg")                     # (a notebook's inline backend would stop showing figures)
    import matplotlib.pyplot as plt

    return plt


def curves(table: pd.DataFrame, metric: str, x: str = "step", by: str = "run", band: str = "minmax"
           ) -> dict[str, pd.DataFrame]:
    """Per configuration: columns x, mean, low, high (over seeds) at every step where the metric exists."""
    for column, allowed in ((metric, "a column of the table"), (by, "a column of the table")):
        if column not in table:
            raise ValueError(f"plot: {column!r} is invalid; allowed: {allowed} ({', '.join(map(str, table.columns))})")
    if x not in X_AXES or x not in table:
        present = [c for c in X_AXES if c in table]
        raise ValueError(f"plot: x={x!r} is invalid; allowed: one of {present}"
                         + (" (sim_time needs Experiment.network)" if x == "sim_time" else ""))
    if band not in BANDS:
        raise ValueError(f"plot: band={band!r} is invalid; allowed: one of {BANDS}")
    out = {}
    rows = table.dropna(subset=[metric, x])
    for name, part in rows.groupby(by, sort=False):
        stats = part.groupby("step")[[x, metric]].agg(["mean", "min", "max", "std"])
        mean = stats[(metric, "mean")]
        if band == "std":
            spread = stats[(metric, "std")].fillna(0.0)
            low, high = mean - spread, mean + spread
        else:
            low, high = stats[(metric, "min")], stats[(metric, "max")]
        out[str(name)] = pd.DataFrame({"x": stats[(x, "mean")] * X_AXES[x][0], "mean": mean, "low": low,
                                       "high": high}).reset_index(drop=True)
    return out


def plot_metric(table: pd.DataFrame, metric: str = "test_accuracy", x: str = "step", by: str = "run",
                band: str = "minmax", ax=None, logx: bool | None = None, logy: bool = False, title: str | None = None):
    """Draw one metric on ``ax`` (a new figure when None); returns the axes."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, curve in curves(table, metric, x, by, band).items():
        (line,) = ax.plot(curve["x"], curve["mean"], label=name, marker="o" if len(curve) < 3 else None)
        if band != "none":
            ax.fill_between(curve["x"], curve["low"], curve["high"], color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel(X_AXES[x][1])
    ax.set_ylabel(LABELS.get(metric, metric))
    if logx if logx is not None else x == "bits":
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title if title is not None else f"{LABELS.get(metric, metric)} vs {X_AXES[x][1]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_grid(table: pd.DataFrame, metrics: Sequence[str] = ("test_accuracy",),
              xs: Sequence[str] = ("step", "bits"), path: str | Path | None = None, **options):
    """A row per metric, a column per x axis; saved as PNG (atomically) when ``path`` is given. Returns the figure."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(metrics), len(xs), figsize=(5.5 * len(xs), 3.8 * len(metrics)), squeeze=False)
    for row, metric in zip(axes, metrics):
        for ax, x in zip(row, xs):
            plot_metric(table, metric, x, ax=ax, **options)
    fig.tight_layout()
    if path is not None:
        save_png(fig, path)
    return fig


def save_png(fig, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    return path


def plot_differences(comparison: pd.DataFrame, ax=None, by: str = "label", title: str | None = None):
    """``sim.compare``'s table as a forest plot: each configuration's mean difference to the baseline with its
    [ci_low, ci_high] interval as a horizontal error bar, and a vertical line at 0 (an interval that crosses
    it is "not distinguishable"). Rows with a NaN interval (n < 2) show their mean only. Returns the axes."""
    if by == "label" and by not in comparison and "run" in comparison:
        by = "run"  # sim.compare names the column after the table's configuration column
    for column in (by, "mean_diff", "ci_low", "ci_high"):
        if column not in comparison:
            raise ValueError(f"plot_differences: column {column!r} is missing; allowed: a table from sim.compare "
                             f"(columns {', '.join(map(str, comparison.columns))})")
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 1.2 + 0.45 * max(len(comparison), 1)))
    rows = range(len(comparison))[::-1]  # first configuration on top
    mean = comparison["mean_diff"].to_numpy(float)
    errors = [mean - comparison["ci_low"].to_numpy(float), comparison["ci_high"].to_numpy(float) - mean]
    ax.errorbar(mean, list(rows), xerr=errors, fmt="o", capsize=3)
    ax.axvline(0.0, color="grey", lw=1, ls="--")
    ax.set_yticks(list(rows), [str(v) for v in comparison[by]])
    attrs = comparison.attrs
    what = LABELS.get(attrs.get("metric"), attrs.get("metric") or "metric")
    if attrs.get("target") is not None:
        what = f"{attrs.get('x')} to reach {what} {attrs['target']}"
    confidence = attrs.get("confidence", 0.95)
    ax.set_xlabel(f"difference to {attrs.get('baseline', 'baseline')!s} ({what}; {confidence:.0%} paired CI)")
    ax.set_title(title if title is not None else "paired differences over seeds")
    ax.grid(alpha=0.3, axis="x")
    return ax
