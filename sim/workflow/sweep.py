"""``sim.sweep(base, grid={...}, seeds=[...]) -> DataFrame``: every grid point x seed, one tidy table."""
from __future__ import annotations

import itertools
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from compressors.options import check_int
from compressors.spec import parse_spec, spec_label
from .. import checkpoint
from ..experiment import Experiment, registering_modules
from ..runner import run
from ..simulation import NonFiniteGradientError
from .config import check_compressor_grid, check_distinct
from .store import CHECKPOINTS, ResultsStore, label, load_results, run_id, sends_dense


SPAWN_HINT = ("sweep: a worker process ended before returning its run. With processes > 1 every worker starts a "
              "fresh interpreter that imports the main module: call sweep from a notebook, from `python -m`, or "
              "from a script under `if __name__ == '__main__':` (not from stdin); a worker killed for lack of "
              "memory ends the same way. processes=1 has neither constraint.")


def grid_points(grid: Mapping[str, Sequence[Any]], base: Experiment | None = None) -> list[dict[str, Any]]:
    """Every combination of the grid's values; with ``base``, compressor options are checked against every
    compressor of the grid (``check_compressor_grid``)."""
    keys = list(grid)
    for key in keys:
        if isinstance(grid[key], (str, bytes)) or not isinstance(grid[key], Sequence) or len(grid[key]) == 0:
            raise ValueError(f"sweep: grid[{key!r}]={grid[key]!r} is invalid; allowed: a non-empty list of values")
        # a repeated value would run one experiment twice ("powersgd:rank=2" and its dict are the same)
        check_distinct("sweep: grid", key, [parse_spec(v, "sweep: grid", key) for v in grid[key]]
                       if key == "compressor" else grid[key])
    if base is not None:
        check_compressor_grid("sweep: grid", base, grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def sweep(base: Experiment, grid: Mapping[str, Sequence[Any]] | None = None, seeds: Sequence[int] = (0,),
          progress: bool = True, processes: int = 1, out=None, checkpoint_every: int | None = None) -> pd.DataFrame:
    """Runs base.with_overrides(point) for every grid point and seed (all validated before any runs).

    ``out``: a results directory (``sim.workflow.store``): each run is stored as it finishes, a sweep started again skips
    the stored runs and, with ``checkpoint_every``, resumes the one in progress from its checkpoint; the table
    is then ``sim.load_results`` of this sweep's runs (``python -m sim sweep`` does the same).

    The table has each run's history plus one column per grid key, ``seed``, and ``run`` and ``label`` (the
    configuration's name, seeds pooled: what ``sim.compare(by="label")`` pairs).

    ``processes > 1`` runs that many experiments at a time in fresh ("spawn") worker processes, each with one
    torch thread; the table is the serial one, row for row, whatever order the runs finish in (the serial sweep
    gives bitwise the same numbers when its own process runs torch on one thread too, e.g. OMP_NUM_THREADS=1).
    """
    points = grid_points(grid or {}, base)
    if not seeds:
        raise ValueError("sweep: seeds=[] is invalid; allowed: a non-empty list of integers >= 0")
    check_int("sweep", "processes", processes, minimum=1)

    check_distinct("sweep", "seeds", list(seeds))
    if "seed" in (grid or {}) and len(seeds) > 1:
        raise ValueError("sweep: seeds is invalid with a grid over 'seed'; allowed: one of them")
    if out is not None:
        if processes != 1:
            raise ValueError(f"sweep: processes={processes} is invalid with out=; allowed: 1 (a results directory "
                             "is filled one run at a time)")

        return sweep_to_dir(base, out, grid, seeds, progress=progress, checkpoint_every=checkpoint_every)
    experiments = [(point, seed, base.with_overrides({"seed": seed, **point})) for point in points for seed in seeds]
    jobs = [experiment for _, _, experiment in experiments]
    histories = run_all(jobs, progress, processes)
    tables = []
    for (point, seed, _), history in zip(experiments, histories):
        for key, value in point.items():
            history[key] = [spec_label(value) if key == "compressor" else value] * len(history)
        history["seed"] = point.get("seed", seed)  # a grid over "seed" names the seed itself
        history["run"] = (", ".join(spec_label(v) if k == "compressor" else f"{k}={v}" for k, v in point.items())
                          or "base") + (" (dense)" if history.attrs.get("dense") else "")  # sends >= the dense bits
        history["label"] = history["run"]
        tables.append(history)
    return pd.concat(tables, ignore_index=True)


def run_history(experiment: Experiment) -> pd.DataFrame:
    """The run's history; ``attrs["dense"]``: the configuration sends at least the dense bits."""

    result = run(experiment)
    history = result.history.copy()
    history.attrs["dense"] = sends_dense(result)
    return history


def run_history_or_none(experiment: Experiment) -> pd.DataFrame | None:
    """The history, or None when the run stopped on a NaN/Inf gradient (it diverged)."""
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


# -- sweeping into a directory -------------------------------------------------------------------------------
def sweep_to_dir(base: Experiment, root: str | Path, grid: Mapping[str, Sequence[Any]] | None = None,
                 seeds: Sequence[int] | None = None, progress: bool | str = True, log=None,
                 checkpoint_every: int | None = None) -> pd.DataFrame:
    """Every grid point x seed of ``base``, each stored as it finishes; complete runs are skipped.

    ``progress``: True for bars, "lines" for one ``log`` line per finished run, False for neither.
    ``checkpoint_every``: the run in progress also writes a checkpoint every that many steps into its own
    folder (``runs/<run_id>/checkpoints/``, removed when the run is stored); started again, the sweep resumes
    that run from its newest checkpoint, bitwise as if never interrupted (``sim.checkpoint``).

    All experiments are built (and so validated) before the first run. Returns ``load_results`` of exactly
    this sweep's runs, in sweep order.
    """
    seeds = list(seeds) if seeds else [base.seed]
    # a grid over "seed" itself keeps its values (then seeds is just the base's)
    jobs = [({"seed": seed, **point}, base.with_overrides({"seed": seed, **point}))
            for point in grid_points(grid or {}, base) for seed in seeds]
    store = ResultsStore(root)
    done = [store.is_complete(experiment) for _, experiment in jobs]
    if log is not None and any(done):
        log(f"{sum(done)} of {len(jobs)} runs already complete in {store.runs}: skipping them")
    bars = progress is True  # "lines": one line per finished run (a log file or a pipe), no bars
    bar = tqdm(total=len(jobs), initial=sum(done), disable=not bars, desc="runs", position=0)
    for index, ((overrides, experiment), complete) in enumerate(zip(jobs, done)):
        if complete:
            continue
        bar.set_postfix_str(label(overrides, experiment), refresh=True)
        partial = store.folder(experiment) / CHECKPOINTS
        result = run(experiment, progress=bars, **resume_options(experiment, partial, checkpoint_every, log))
        store.write(experiment, result, overrides, index)
        shutil.rmtree(partial, ignore_errors=True)  # the stored run supersedes its checkpoints
        bar.update(1)
        if progress == "lines" and log is not None:
            log(f"run {index + 1}/{len(jobs)} done: {label(overrides, experiment)}, seed {experiment.seed}, "
                f"{result.wall_seconds:.1f} s")
    bar.close()
    return load_results(root, run_ids=[run_id(e) for _, e in jobs])


def resume_options(experiment: Experiment, directory: Path, checkpoint_every: int | None, log=None) -> dict:
    """``sim.run``'s checkpoint arguments for a run of a results directory: write into ``directory`` every
    ``checkpoint_every`` steps (None or 0: never), and resume from its newest checkpoint if one is there and
    loads (one that does not, e.g. written by another format version, is reported and the run starts over)."""
    if not checkpoint_every:
        return {}
    options = {"checkpoint_dir": directory, "checkpoint_every": checkpoint_every}
    newest = checkpoint.latest(directory, workers=experiment.workers)
    if newest is None:
        return options
    try:
        checkpoint.load(newest, experiment)
    except ValueError as error:
        if log is not None:
            log(f"{newest}: not resumable ({error}); starting that run over")
        shutil.rmtree(directory, ignore_errors=True)
        return options
    if log is not None:
        log(f"resuming {directory.parent.name} from {newest.name}")
    return {**options, "resume_from": newest}
