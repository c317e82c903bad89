"""Shared helpers for the notebooks: smoke/full sizing, a recording aggregator proxy, seed-band plots, and the
reproducibility record of docs/protocol.md (the environment, the rounding spread, what an interval supports
beyond it) with a pool that runs labelled experiments of many configurations at once.

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


def lowrank_error_run(experiment, rank: int, measure_every: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``experiment``'s history, and every ``measure_every`` steps, for each compressed matrix, how far the
    compressor's update is from the matrix it was given, M = mean_i (g_i + e_i) (gradients plus error-feedback
    memory; the compressor must use error feedback), against the best rank-``rank`` approximation of M:
    ``error`` = ||M - update||_F^2 / ||M||_F^2 and ``optimum`` = sum_{i>rank} sigma_i(M)^2 / ||M||_F^2
    (Eckart-Young; theory.lowrank.relative_eckart_young_error). Module-level so a process pool can run it."""
    import compressors
    import sim
    import theory

    torch.set_num_threads(1)
    simulation = sim.Simulation(experiment)
    rows, step = [], [0]

    def observe(grads, state_in, update, state_out):
        step[0] += 1
        if step[0] % measure_every:
            return
        memory = next((s.memory for s in compressors.iter_states(state_in)
                       if isinstance(s, compressors.ErrorFeedbackState)), {})
        for name, e in memory.items():  # exactly the compressed tensors
            m = (grads[name] + e).mean(0).double().reshape(e.shape[1], -1)  # (n, m): what the compressor was given
            err = float((update[name].double().reshape(m.shape) - m).pow(2).sum()) / float(m.pow(2).sum())
            opt = theory.lowrank.relative_eckart_young_error(torch.linalg.svdvals(m), rank)
            rows.append({"step": step[0], "tensor": f"{name} {tuple(m.shape)}", "error": err, "optimum": opt})

    simulation.aggregator = Recorder(simulation.aggregator, observe)
    history = sim.run(experiment, simulation=simulation).history
    return history, pd.DataFrame(rows, columns=["step", "tensor", "error", "optimum"])


def map_in_processes(function: Callable, calls: Sequence[tuple], processes: int) -> list:
    """[function(*call) for call in calls], ``processes`` at a time in fresh ("spawn") processes (as sim.sweep)."""
    if processes == 1:
        return [function(*call) for call in calls]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(function, *zip(*calls)))


# -- reproducibility: the environment, and the spread that rounding alone causes (docs/protocol.md, section 5) --

def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def record_environment(processes: int | None = None) -> pd.Series:
    """Prints and returns what a rerun elsewhere needs to compare against: Python, NumPy, pandas and torch
    versions, the CPU model, the cores, this process's torch threads and (``processes``) how many runs run at a
    time (each of those on one torch thread, as ``sim.sweep`` does)."""
    import platform

    import numpy

    record = {"python": platform.python_version(), "numpy": numpy.__version__, "pandas": pd.__version__,
              "torch": torch.__version__, "cpu": cpu_model(), "cores": os.cpu_count(),
              "torch threads (this process)": torch.get_num_threads()}
    if processes is not None:
        record["runs at a time (1 torch thread each)"] = processes
    series = pd.Series(record, name="environment", dtype=object)
    print("\n".join(f"{key:>38}: {value}" for key, value in record.items()))
    return series


def other_summation_order(experiment):
    """``experiment`` with the other gradient engine: the same mathematics with other floating-point reductions
    (vmap computes every worker's gradient in one batched call, the loop one worker at a time). The torch thread
    count is no substitute: on these small matrices it leaves CPU results bitwise unchanged."""
    import sim

    engine = sim.engine.resolve_engine(experiment.engine, sim.Simulation(experiment).model)
    return experiment.replace(engine="loop" if engine == "vmap" else "vmap")


def final_values(table: pd.DataFrame, metric: str = "test_accuracy", by: str = "label") -> pd.Series:
    """The final (last logged, non-NaN) ``metric`` of every run of a tidy table, indexed by (``by``, seed)."""
    rows = table.dropna(subset=[metric]).sort_values("step")
    return rows.groupby([by, "seed"])[metric].last()


def rounding_spread(original: pd.DataFrame, rerun: pd.DataFrame, metric: str = "test_accuracy",
                    by: str = "label") -> pd.DataFrame:
    """One row per run present in both tables (same ``by`` and seed): its final ``metric`` in ``original``, in
    ``rerun`` (the same experiment under another summation order, ``other_summation_order``), their absolute
    difference, and whether the two trajectories differ at all (``train_loss`` at some step). ``attrs["spread"]``:
    the largest absolute difference, the run-to-run spread that rounding alone causes."""
    before, after = final_values(original, metric, by), final_values(rerun, metric, by)
    runs = after.index.intersection(before.index)
    if len(runs) == 0:
        raise ValueError("rounding_spread: the rerun table shares no (configuration, seed) run with the original")
    rows = []
    for key in runs:
        one = original[(original[by] == key[0]) & (original["seed"] == key[1])].set_index("step")["train_loss"]
        two = rerun[(rerun[by] == key[0]) & (rerun["seed"] == key[1])].set_index("step")["train_loss"]
        rows.append({by: key[0], "seed": key[1], "original": before[key], "rerun": after[key],
                     "abs_diff": abs(after[key] - before[key]),
                     "trajectory differs": not one.equals(two.reindex(one.index))})
    table = pd.DataFrame(rows)
    table.attrs.update(spread=float(table["abs_diff"].max()), metric=metric)
    return table


def margin_status(ci_low: float, ci_high: float, spread: float, margin: float | None = None) -> str:
    """What a paired interval supports once the rounding spread is taken off (docs/protocol.md, section 5):
    "above 0" / "below 0" when it is clear of 0 by more than ``spread``, "within the margin" when it lies inside
    [-(margin - spread), margin - spread] (only with ``margin``), else "too close to call"."""
    if not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return "too close to call"
    if ci_low > spread:
        return "above 0"
    if ci_high < -spread:
        return "below 0"
    if margin is not None and -(margin - spread) <= ci_low and ci_high <= margin - spread:
        return "within the margin"
    return "too close to call"


def run_labelled(runs: Sequence[tuple[str, int, Any]], processes: int = 1) -> pd.DataFrame:
    """Every ``(label, seed, experiment)`` run (the experiment carries its seed) in one pool of ``processes``
    worker processes (one torch thread each, as ``sim.sweep``), so that runs of different configurations and
    learning rates share the cores without idle slots between sweeps; the tidy table (every run's history with
    ``label``, ``seed``, ``base_lr`` and ``run``: the run's index in ``runs``), in the order given. Give the
    longest runs first."""
    from sim.workflow.sweep import run_all

    for label, seed, experiment in runs:
        if experiment.seed != seed:
            raise ValueError(f"run_labelled: run {label!r} has seed {seed} but its experiment seed={experiment.seed}")
    histories = run_all([experiment for _, _, experiment in runs], progress=False, processes=processes)
    tables = [history.assign(label=label, seed=seed, base_lr=experiment.lr, run=index)
              for index, ((label, seed, experiment), history) in enumerate(zip(runs, histories))]
    return pd.concat(tables, ignore_index=True)
