"""``sim.sweep(base, grid={...}, seeds=[...]) -> DataFrame``: every grid point x seed, one tidy table."""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from .experiment import Experiment


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    for key in keys:
        if isinstance(grid[key], (str, bytes)) or not isinstance(grid[key], Sequence) or len(grid[key]) == 0:
            raise ValueError(f"sweep: grid[{key!r}]={grid[key]!r} is invalid; allowed: a non-empty list of values")
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def sweep(base: Experiment, grid: Mapping[str, Sequence[Any]] | None = None, seeds: Sequence[int] = (0,),
          progress: bool = True) -> pd.DataFrame:
    """Runs base.with_overrides(point) for every grid point and seed (all validated before any runs).

    The table has each run's history plus one column per grid key, ``seed``, and ``run`` (a label).
    """
    from .runner import run

    points = grid_points(grid or {})
    if not seeds:
        raise ValueError("sweep: seeds=[] is invalid; allowed: a non-empty list of integers >= 0")
    experiments = [(point, seed, base.with_overrides({**point, "seed": seed})) for point in points for seed in seeds]
    tables = []
    for point, seed, experiment in tqdm(experiments, disable=not progress, desc="sweep"):
        history = run(experiment).history.copy()
        for key, value in point.items():
            history[key] = [value] * len(history)
        history["seed"] = seed
        history["run"] = ", ".join(f"{k}={v}" for k, v in point.items()) or "base"
        history["label"] = history["run"]  # the configuration's name, as sim.compare(by="label") expects
        tables.append(history)
    return pd.concat(tables, ignore_index=True)
