"""``sim.sweep(base, grid={...}, seeds=[...]) -> DataFrame``: every grid point x seed, one tidy table."""
from __future__ import annotations

import importlib
import itertools
import multiprocessing
import shutil
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from compressors.options import check_int
from compressors.spec import parse_spec, spec_label
from .. import checkpoint
from ..experiment import Experiment, registering_modules
from ..runner import run
from ..simulation import NonFiniteGradientError, Simulation
from .config import check_compressor_grid, check_distinct
from .store import (CHECKPOINTS, ResultsStore, exclusive, grid_column, label, load_results, run_id,
                    sends_dense)


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
          progress: bool = True, processes: int = 1, out=None, checkpoint_every: int | None = None,
          executor=None, shard: tuple[int, int] | str | None = None) -> pd.DataFrame:
    """Runs base.with_overrides(point) for every grid point and seed (all validated before any runs).

    ``out``: a results directory (``sim.workflow.store``): each run is stored as it finishes, a sweep started again skips
    the stored runs and, with ``checkpoint_every``, resumes the one in progress from its checkpoint; the table
    is then ``sim.load_results`` of this sweep's runs (``python -m sim sweep`` does the same).

    The table has each run's history plus one column per grid key, ``seed``, and ``run`` and ``label`` (the
    configuration's name, seeds pooled: what ``sim.compare(by="label")`` pairs).

    ``processes > 1`` runs that many experiments at a time in fresh ("spawn") worker processes, each with one
    torch thread; the table is the serial one, row for row, whatever order the runs finish in (the serial sweep
    gives bitwise the same numbers when its own process runs torch on one thread too, e.g. OMP_NUM_THREADS=1).

    ``executor``: any object whose ``submit(fn, *args)`` returns a future with ``.result()``
    (``concurrent.futures``, a Dask ``distributed.Client``, a submitit executor: docs/cluster.md); every run is
    one job, and a failed job does not stop the others (``SweepError`` names each failed run and its cause
    once all are done). With ``out``, each job stores its own run into the results directory (a filesystem
    the jobs share), so a sweep started again skips what any job stored. ``shard=(i, n)`` or ``"i/n"``: only
    the i-th (1 <= i <= n) of n slices of the grid x seeds (every n-th run, starting at the i-th), e.g. one
    slice per cluster job; ``sim.load_results`` of the slices' directories merges them.
    """
    points = grid_points(grid or {}, base)
    if not seeds:
        raise ValueError("sweep: seeds=[] is invalid; allowed: a non-empty list of integers >= 0")
    check_int("sweep", "processes", processes, minimum=1)
    check_executor(executor, processes)
    shard = check_shard(shard)

    check_distinct("sweep", "seeds", list(seeds))
    if "seed" in (grid or {}) and len(seeds) > 1:
        raise ValueError("sweep: seeds is invalid with a grid over 'seed'; allowed: one of them")
    if out is not None:
        return sweep_to_dir(base, out, grid, seeds, progress=progress, checkpoint_every=checkpoint_every,
                            processes=processes, executor=executor, shard=shard)
    experiments = [(point, seed, base.with_overrides({"seed": seed, **point})) for point in points for seed in seeds]
    experiments = [job for index, job in enumerate(experiments) if in_shard(index, shard)]
    jobs = [experiment for _, _, experiment in experiments]
    if executor is not None:
        names = [f"{run_label(point)}, seed {experiment.seed}" for point, _, experiment in experiments]
        imports = registering_modules()
        histories = run_on_executor(executor, [(history_on_worker, (e, imports)) for e in jobs], names, progress)
    else:
        histories = run_all(jobs, progress, processes)
    tables = []
    for (point, seed, experiment), history in zip(experiments, histories):
        for key, value in point.items():
            # a gridded compressor (a spec string or a table) is shown as the table it builds, as load_results does
            shown = dict(experiment.compressor) if key == "compressor" else value
            history[grid_column(key, history.columns)] = [shown] * len(history)
        history["seed"] = point.get("seed", seed)  # a grid over "seed" names the seed itself
        history["run"] = run_label(point) + (" (dense)" if history.attrs.get("dense") else "")  # >= the dense bits
        history["label"] = history["run"]
        tables.append(history)
    return pd.concat(tables, ignore_index=True)


def run_label(point: Mapping[str, Any]) -> str:
    """An in-memory sweep's name of a grid point: "compressor.rank=2", a whole compressor by its spec."""
    return ", ".join(spec_label(v) if k == "compressor" else f"{k}={v}" for k, v in point.items()) or "base"


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


# -- sweeping on an executor ---------------------------------------------------------------------------------
class SweepError(RuntimeError):
    """Some runs of a sweep failed; the others finished (and, with a results directory, are stored).

    ``failures``: (run name, exception) of each failed run, in sweep order; ``results``: every job's result,
    None for the failed ones."""

    def __init__(self, failures: list[tuple[str, BaseException]], total: int, results: list | None = None,
                 where: str = ""):
        self.failures, self.results = failures, results
        lines = [f"  {name}: {describe(error)}" for name, error in failures]
        super().__init__(f"sweep: {len(failures)} of {total} runs failed{where}:\n" + "\n".join(lines))


def describe(error: BaseException) -> str:
    if type(error).__name__ == "BrokenProcessPool":
        return SPAWN_HINT
    return f"{type(error).__name__}: {error}"


def check_executor(executor, processes: int) -> None:
    if executor is None:
        return
    if not callable(getattr(executor, "submit", None)):
        raise ValueError(f"sweep: executor={executor!r} is invalid; allowed: None or an object whose submit(fn, *args) "
                         "returns a future with .result() (concurrent.futures, distributed.Client, submitit)")
    if processes != 1:
        raise ValueError(f"sweep: processes={processes} is invalid with executor=; allowed: 1 (the executor "
                         "decides how many runs go at once)")


def check_shard(shard) -> tuple[int, int] | None:
    """None, (i, n) or "i/n" with 1 <= i <= n: the i-th of n slices of the runs."""
    if shard is None:
        return None
    value = shard
    if isinstance(shard, str):
        head, sep, tail = shard.partition("/")
        try:
            value = (int(head), int(tail)) if sep else shard
        except ValueError:
            value = shard
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in value) and 1 <= value[0] <= value[1])
    if not ok:
        raise ValueError(f"sweep: shard={shard!r} is invalid; allowed: None, 'i/n' or (i, n) with 1 <= i <= n, "
                         "e.g. '2/4' for the second of 4 slices")
    return int(value[0]), int(value[1])


def in_shard(index: int, shard: tuple[int, int] | None) -> bool:
    """Run ``index`` (its position in grid x seeds) belongs to slice i of n: index % n == i - 1."""
    return shard is None or index % shard[1] == shard[0] - 1


def run_on_executor(executor, calls: Sequence[tuple[Any, tuple]], names: Sequence[str], progress: bool | str = True,
                    log=None, where: str = "") -> list:
    """``fn(*args)`` of every call submitted to ``executor``, results in call order. A failed call does not stop
    the others; once all are done, ``SweepError`` names each failed one (``names``) and its cause. Ctrl-C
    cancels what has not started."""
    futures = [executor.submit(fn, *args) for fn, args in calls]
    results: list = [None] * len(futures)
    failures = []
    bar = tqdm(total=len(futures), disable=progress is not True, desc="sweep")
    try:
        for index, future in enumerate(futures):  # in order: not every executor's futures work with as_completed
            try:
                results[index] = future.result()
            except Exception as error:  # noqa: BLE001 - reported with its run below, after the others finish
                failures.append((names[index], error))
            bar.update(1)
            if progress == "lines" and log is not None:
                state = "failed" if failures and failures[-1][0] == names[index] else "done"
                log(f"run {index + 1}/{len(futures)} {state}: {names[index]}")
    except BaseException:
        for future in futures:
            cancel = getattr(future, "cancel", None)
            if callable(cancel):
                cancel()
        raise
    finally:
        bar.close()
    if failures:
        raise SweepError(failures, len(futures), results, where)
    return results


def import_registering(imports: Sequence[str]) -> None:
    """Import the modules that registered tasks or compressors in the process that built the sweep (a job on a
    fresh process knows only the built-in ones); one that is not importable here is skipped (an experiment
    naming what it registers then fails with its name)."""
    for module in imports:
        try:
            importlib.import_module(module)
        except ImportError:
            pass


def history_on_worker(experiment: Experiment, imports: Sequence[str] = ()) -> pd.DataFrame:
    """One job of an in-memory sweep on an executor: the run's history (``run_history``)."""
    import_registering(imports)
    return run_history(experiment)


def store_on_worker(root: str, experiment: Experiment, overrides: Mapping[str, Any], index: int,
                    checkpoint_every: int | None = None, imports: Sequence[str] = ()) -> str:
    """One job of a sweep into a results directory, on whatever process runs it: skipped when already stored,
    resumed from its checkpoint if one is there, stored when done. Returns the run id."""
    import_registering(imports)
    store = ResultsStore(root)
    if not store.is_complete(experiment):
        partial = store.folder(experiment) / CHECKPOINTS
        result = run(experiment, progress=False, **resume_options(experiment, partial, checkpoint_every))
        store.write(experiment, result, overrides, index)
        shutil.rmtree(partial, ignore_errors=True)  # the stored run supersedes its checkpoints
    return run_id(experiment)


def process_pool(processes: int):
    """Today's local processes as an executor: fresh ("spawn") interpreters with one torch thread each, which
    import the modules that registered tasks or compressors."""
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=processes, mp_context=context, initializer=_one_thread,
                               initargs=(registering_modules(),))


# -- sweeping into a directory -------------------------------------------------------------------------------
def sweep_to_dir(base: Experiment, root: str | Path, grid: Mapping[str, Sequence[Any]] | None = None,
                 seeds: Sequence[int] | None = None, progress: bool | str = True, log=None,
                 checkpoint_every: int | None = None, processes: int = 1, executor=None,
                 shard: tuple[int, int] | str | None = None) -> pd.DataFrame:
    """``fill_dir`` holding the results directory's lock: a second sweep on the same directory is refused with a
    ValueError naming the first one's pid, before it writes anything."""
    with exclusive(root):
        return fill_dir(base, root, grid, seeds, progress, log, checkpoint_every, processes, executor, shard)


def fill_dir(base: Experiment, root: str | Path, grid: Mapping[str, Sequence[Any]] | None = None,
             seeds: Sequence[int] | None = None, progress: bool | str = True, log=None,
             checkpoint_every: int | None = None, processes: int = 1, executor=None,
             shard: tuple[int, int] | str | None = None) -> pd.DataFrame:
    """Every grid point x seed of ``base``, each stored as it finishes; complete runs are skipped.

    ``progress``: True for bars, "lines" for one ``log`` line per finished run, False for neither.
    ``checkpoint_every``: the run in progress also writes a checkpoint every that many steps into its own
    folder (``runs/<run_id>/checkpoints/``, removed when the run is stored); started again, the sweep resumes
    that run from its newest checkpoint, bitwise as if never interrupted (``sim.checkpoint``).

    ``processes > 1`` or ``executor`` (see ``sweep``): the runs go to processes or an executor, each job stores
    its own run; a failed run does not stop the others (``SweepError`` names it once they are done).
    ``shard``: only the i-th of n slices of the runs (``sweep``).

    All experiments are built (and so validated) before the first run. Returns ``load_results`` of exactly
    this sweep's (or slice's) runs, in sweep order.
    """
    check_int("sweep", "processes", processes, minimum=1)
    check_executor(executor, processes)
    shard = check_shard(shard)
    seeds = list(seeds) if seeds else [base.seed]
    # a grid over "seed" itself keeps its values (then seeds is just the base's)
    jobs = [({"seed": seed, **point}, base.with_overrides({"seed": seed, **point}))
            for point in grid_points(grid or {}, base) for seed in seeds]
    positions = [index for index in range(len(jobs)) if in_shard(index, shard)]
    if shard is not None and log is not None:
        log(f"shard {shard[0]}/{shard[1]}: {len(positions)} of {len(jobs)} runs")
    store = ResultsStore(root)
    if executor is not None or processes > 1:
        return sweep_on_executor(base, store, jobs, positions, progress, log, checkpoint_every, processes, executor)
    jobs = [jobs[index] for index in positions] if shard is not None else jobs
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
        store.write(experiment, result, overrides, positions[index] if shard is not None else index)
        shutil.rmtree(partial, ignore_errors=True)  # the stored run supersedes its checkpoints
        bar.update(1)
        if progress == "lines" and log is not None:
            log(f"run {index + 1}/{len(jobs)} done: {label(overrides, experiment)}, seed {experiment.seed}, "
                f"{result.wall_seconds:.1f} s")
    bar.close()
    return load_results(root, run_ids=[run_id(e) for _, e in jobs])


def sweep_on_executor(base: Experiment, store: ResultsStore, jobs: list, positions: list[int], progress, log,
                      checkpoint_every, processes: int, executor) -> pd.DataFrame:
    """``sweep_to_dir``'s runs at ``positions`` of ``jobs``, each stored by its own job (``store_on_worker``)."""
    selected = [(index, *jobs[index]) for index in positions]
    done = sum(store.is_complete(experiment) for _, _, experiment in selected)
    if log is not None and done:
        log(f"{done} of {len(selected)} runs already complete in {store.runs}: skipping them")
    imports = registering_modules()
    calls = [(store_on_worker, (str(store.root), experiment, overrides, index, checkpoint_every, imports))
             for index, overrides, experiment in selected]
    names = [f"{label(overrides, experiment)}, seed {experiment.seed} (runs/{run_id(experiment)})"
             for _, overrides, experiment in selected]
    where = f" (the others are stored in {store.root}; the same sweep started again reruns only the failed ones)"
    if executor is None:
        with process_pool(min(processes, max(len(calls), 1))) as pool:
            run_on_executor(pool, calls, names, progress, log, where)
    else:
        run_on_executor(executor, calls, names, progress, log, where)
    return load_results(store.root, run_ids=[run_id(experiment) for _, _, experiment in selected])


def resume_options(experiment: Experiment, directory: Path, checkpoint_every: int | None, log=None) -> dict:
    """``sim.run``'s checkpoint arguments for a run of a results directory: write into ``directory`` every
    ``checkpoint_every`` steps (None or 0: never), and resume from its newest valid checkpoint (invalid newer
    ones are reported and skipped). Nothing is deleted: a directory without any checkpoint this run can resume
    from (another format version, another configuration) is moved aside (``checkpoints.unusable-<n>``) and
    the run starts over."""
    if not checkpoint_every:
        return {}
    options = {"checkpoint_dir": directory, "checkpoint_every": checkpoint_every}
    if checkpoint.latest(directory, workers=experiment.workers, steps=experiment.steps) is None and not (
            directory / checkpoint.MANIFEST).exists():
        return options
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = checkpoint.valid_checkpoints(directory, experiment,
                                                 reference=Simulation(experiment).initial_state())
    except ValueError as error:  # the directory belongs to another configuration
        found, caught = [], [error]
    if log is not None:
        for reason in caught:
            log(f"{directory}: {getattr(reason, 'message', reason)}")
    if not found:
        aside = next(directory.with_name(f"{directory.name}.unusable-{n}") for n in itertools.count(1)
                     if not directory.with_name(f"{directory.name}.unusable-{n}").exists())
        directory.rename(aside)
        if log is not None:
            log(f"{directory}: no resumable checkpoint; kept as {aside.name}, starting that run over")
        return options
    _, newest, _ = found[0]
    if log is not None:
        log(f"resuming {directory.parent.name} from {newest.name}")
    return {**options, "resume_from": newest}
