"""``sim.sweep(base, grid={...}, seeds=[...]) -> DataFrame``: every grid point x seed, one tidy table."""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from .experiment import Experiment


SPAWN_HINT = ("sweep: a worker process ended before returning its run. With processes > 1 every worker starts a "
              "fresh interpreter that imports the main module: call sweep from a notebook, from `python -m`, or "
              "from a script under `if __name__ == '__main__':` (not from stdin); a worker killed for lack of "
              "memory ends the same way. processes=1 has neither constraint.")


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    from .config import check_distinct

    keys = list(grid)
    for key in keys:
        if isinstance(grid[key], (str, bytes)) or not isinstance(grid[key], Sequence) or len(grid[key]) == 0:
            raise ValueError(f"sweep: grid[{key!r}]={grid[key]!r} is invalid; allowed: a non-empty list of values")
        check_distinct("sweep: grid", key, grid[key])  # a repeated value would run one experiment twice
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def sweep(base: Experiment, grid: Mapping[str, Sequence[Any]] | None = None, seeds: Sequence[int] = (0,),
          progress: bool = True, processes: int = 1, out=None, checkpoint_every: int | None = None) -> pd.DataFrame:
    """Runs base.with_overrides(point) for every grid point and seed (all validated before any runs).

    ``out``: a results directory (``sim.store``): each run is stored as it finishes, a sweep started again skips
    the stored runs and, with ``checkpoint_every``, resumes the one in progress from its checkpoint; the table
    is then ``sim.load_results`` of this sweep's runs (``python -m sim sweep`` does the same).

    The table has each run's history plus one column per grid key, ``seed``, and ``run`` and ``label`` (the
    configuration's name, seeds pooled: what ``sim.compare(by="label")`` pairs).

    ``processes > 1`` runs that many experiments at a time in fresh ("spawn") worker processes, each with one
    torch thread; the table is the serial one, row for row, whatever order the runs finish in (the serial sweep
    gives bitwise the same numbers when its own process runs torch on one thread too, e.g. OMP_NUM_THREADS=1).
    """
    from compressors.options import check_int

    points = grid_points(grid or {})
    if not seeds:
        raise ValueError("sweep: seeds=[] is invalid; allowed: a non-empty list of integers >= 0")
    check_int("sweep", "processes", processes, minimum=1)
    from .config import check_distinct

    check_distinct("sweep", "seeds", list(seeds))
    if "seed" in (grid or {}) and len(seeds) > 1:
        raise ValueError("sweep: seeds is invalid with a grid over 'seed'; allowed: one of them")
    if out is not None:
        if processes != 1:
            raise ValueError(f"sweep: processes={processes} is invalid with out=; allowed: 1 (a results directory "
                             "is filled one run at a time)")
        from .store import sweep_to_dir

        return sweep_to_dir(base, out, grid, seeds, progress=progress, checkpoint_every=checkpoint_every)
    experiments = [(point, seed, base.with_overrides({"seed": seed, **point})) for point in points for seed in seeds]
    jobs = [experiment for _, _, experiment in experiments]
    histories = run_all(jobs, progress, processes)
    tables = []
    for (point, seed, _), history in zip(experiments, histories):
        for key, value in point.items():
            history[key] = [value] * len(history)
        history["seed"] = point.get("seed", seed)  # a grid over "seed" names the seed itself
        history["run"] = (", ".join(f"{k}={v}" for k, v in point.items()) or "base") + (
            " (dense)" if history.attrs.get("dense") else "")  # sends at least the dense bits
        history["label"] = history["run"]
        tables.append(history)
    return pd.concat(tables, ignore_index=True)


def run_history(experiment: Experiment) -> pd.DataFrame:
    """The run's history; ``attrs["dense"]``: the configuration sends at least the dense bits."""
    from .runner import run
    from .store import sends_dense

    result = run(experiment)
    history = result.history.copy()
    history.attrs["dense"] = sends_dense(result)
    return history


def run_history_or_none(experiment: Experiment) -> pd.DataFrame | None:
    """The history, or None when the run stopped on a NaN/Inf gradient (it diverged)."""
    from .runner import NonFiniteGradientError

    try:
        return run_history(experiment)
    except NonFiniteGradientError:
        return None


def run_all(jobs: Sequence[Experiment], progress: bool = True, processes: int = 1, one_run=run_history) -> list:
    """``one_run`` (a module-level function, so worker processes can import it) of every job, in job order."""
    runner = run_serially if processes == 1 or len(jobs) == 1 else run_in_processes
    return runner(jobs, progress, processes, one_run)


def run_serially(jobs: Sequence[Experiment], progress: bool, processes: int = 1, one_run=run_history) -> list:
    return [one_run(experiment) for experiment in tqdm(jobs, disable=not progress, desc="sweep")]


def run_in_processes(jobs: Sequence[Experiment], progress: bool, processes: int, one_run=run_history) -> list:
    """``one_run`` of each job in job order, ``processes`` at a time; the bar moves as runs finish."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    histories: list = [None] * len(jobs)
    # "spawn": a fresh interpreter per worker (forking a process that has run torch threads can deadlock).
    context = multiprocessing.get_context("spawn")
    from .config import registering_modules

    with ProcessPoolExecutor(max_workers=min(processes, len(jobs)), mp_context=context, initializer=_one_thread,
                             initargs=(registering_modules(),)) as pool, tqdm(total=len(jobs), disable=not progress,
                                                                    desc="sweep") as bar:
        futures = {pool.submit(one_run, experiment): index for index, experiment in enumerate(jobs)}
        try:
            for future in as_completed(futures):
                histories[futures[future]] = future.result()  # a failed run raises its error here
                bar.update(1)
        except BaseException as error:
            for future in futures:  # stop at the first failure (or Ctrl-C) instead of running the rest
                future.cancel()
            if isinstance(error, BrokenProcessPool):
                raise RuntimeError(SPAWN_HINT) from error
            raise
    return histories


def _one_thread(imports: Sequence[str] = ()) -> None:
    """Worker initializer: one torch thread each, so N processes use N cores and results do not depend on it;
    ``imports``: the modules that registered tasks or compressors (a fresh process knows only the built-in ones)."""
    import importlib

    import torch

    torch.set_num_threads(1)
    for module in imports:
        try:
            importlib.import_module(module)
        except ImportError:  # not importable here: an experiment naming what it registers fails with its name
            pass
