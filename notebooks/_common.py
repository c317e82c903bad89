"""Shared helpers for the notebooks: smoke/full sizing, a recording aggregator proxy, and seed-band plots.

``SMOKE=1`` in the environment shrinks every notebook so ``tests/test_notebooks.py`` can execute it top to
bottom in well under a minute; without it the notebooks run their full (still modest) versions.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib
import pandas as pd
import torch

# tqdm.auto (used by sim.run/sim.sweep) warns when ipywidgets is absent; the notebooks never show its bars
warnings.filterwarnings("ignore", message="IProgress not found")

SMOKE = os.environ.get("SMOKE", "0") not in ("", "0", "false", "False")


def pick(full, smoke):
    """The full-mode value, or the smoke-mode one when SMOKE=1."""
    return smoke if SMOKE else full


def setup(threads: int = 1) -> None:
    """Inline PNG figures at a readable size; one intra-op thread (tensors here are small; idle OpenMP threads spin and steal the shared cores)."""
    torch.set_num_threads(threads)
    matplotlib.rcParams.update({"figure.figsize": (11, 3.6), "figure.dpi": 90, "axes.grid": True,
                                "grid.alpha": 0.3, "legend.fontsize": 8})


def compressor_label(spec: dict[str, Any]) -> str:
    """{"name": "powersgd", "rank": 2} -> "powersgd(rank=2)"."""
    options = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"{spec['name']}({options})" if options else spec["name"]


class Recorder:
    """Wraps an aggregator; calls ``observe(grads, state_in, update, state_out)`` after every aggregate.

    Install it on a ``sim.Simulation`` (``simulation.aggregator = Recorder(simulation.aggregator, observe)``)
    and pass the simulation to ``sim.run``: the training loop is unchanged, the notebook sees what the
    compressor saw. Everything else (init, bits_per_step, theory, ...) is delegated.
    """

    def __init__(self, inner, observe: Callable[..., None]):
        self.inner = inner
        self.observe = observe

    def aggregate(self, grads, state, comm):
        update, new_state = self.inner.aggregate(grads, state, comm)
        self.observe(grads, state, update, new_state)
        return update, new_state

    def __getattr__(self, name):  # only called for attributes not found on the proxy itself
        return getattr(self.inner, name)


def band_plot(ax, table: pd.DataFrame, x: str, y: str, by: str = "label", order: Sequence[str] | None = None,
              logx: bool = False, logy: bool = False, colors: dict[str, Any] | None = None) -> None:
    """One line per value of ``by``: the mean over seeds of ``y`` against ``x``, with a min-max band."""
    table = table.dropna(subset=[y])
    groups = order if order is not None else list(dict.fromkeys(table[by]))
    for label in groups:
        part = table[table[by] == label]
        if part.empty:
            continue
        stats = part.groupby("step").agg(x=(x, "mean"), mean=(y, "mean"), lo=(y, "min"), hi=(y, "max"))
        color = colors.get(label) if colors else None
        (line,) = ax.plot(stats["x"], stats["mean"], label=label, color=color, lw=1.4)
        if part["seed"].nunique() > 1 if "seed" in part else False:
            ax.fill_between(stats["x"], stats["lo"], stats["hi"], color=line.get_color(), alpha=0.18, lw=0)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)


def first_reaching(history: pd.DataFrame, column: str, target: float, above: bool = True) -> float:
    """The first logged step whose ``column`` reaches ``target`` (>= if above, else <=); inf if never."""
    values = history.dropna(subset=[column])
    hit = values[values[column] >= target] if above else values[values[column] <= target]
    return float(hit["step"].iloc[0]) if len(hit) else math.inf
