"""``sim.run(experiment) -> Result``: N data-parallel workers in one process.

The loop around ``Simulation.step`` (sim/simulation.py): evaluation and logging, checkpoints every
``checkpoint_every`` steps, and resuming from one bitwise.
"""
from __future__ import annotations

import time

from tqdm.auto import tqdm

import compressors
from . import checkpoint
from .experiment import Experiment
from .result import Result
from .simulation import Simulation, TrainState

def _should_eval(experiment: Experiment, step: int) -> bool:
    return step == experiment.steps or (experiment.eval_every > 0 and step % experiment.eval_every == 0)


def run(experiment: Experiment, *, comm=None, local_workers: range | None = None, progress: bool = False,
        simulation: Simulation | None = None, state: TrainState | None = None,
        on_step=None, checkpoint_dir=None, checkpoint_every: int | None = None, resume_from=None) -> Result:
    """Run an experiment; returns its Result. ``on_step(simulation, state)`` is called after every step, with
    that step's metrics in ``simulation.last_metrics`` (a dict: step, lr, train_loss, bits, ...; test_loss and
    test_accuracy on evaluated steps, and val_loss and val_accuracy with a validation split; e.g.
    ``sim.workflow.loggers.TensorBoardLogger``);
    ``state`` continues from a TrainState. ``checkpoint_dir``/``checkpoint_every``: write a checkpoint every
    that many steps and at the end; ``resume_from``: a checkpoint directory (its latest) or file to continue
    from, history included, bitwise as if never interrupted (``sim.checkpoint``)."""
    import pandas as pd

    checkpoint.check_options(checkpoint_dir, checkpoint_every, resume_from)
    if resume_from is not None and state is not None:
        raise ValueError("run: give state or resume_from, not both")
    if checkpoint_dir is not None:  # writable and this configuration's, before any work
        checkpoint.claim(checkpoint_dir, experiment)
    sim = simulation if simulation is not None else Simulation(experiment, comm, local_workers)
    rows: list[dict[str, float]] = []
    if resume_from is not None:
        fresh = sim.initial_state()
        restored = checkpoint.load(resume_from, experiment, sim.local_workers, reference=fresh)
        state, rows = checkpoint.placed_like(restored.state, fresh), list(restored.rows)
        checkpoint.restore_ledger(sim.comm.ledger, restored.ledger)
    state = state if state is not None else sim.initial_state()
    started = time.perf_counter()
    steps = range(state.step, experiment.steps)
    for _ in tqdm(steps, disable=not progress, desc=experiment.compressor.get("name", ""), leave=False):
        state, metrics = sim.step(state)
        logged = state.step % experiment.log_every == 0 or state.step == experiment.steps
        if _should_eval(experiment, state.step):
            metrics["test_loss"], metrics["test_accuracy"] = sim.evaluate(state)
            if sim.task.val_x is not None:  # Experiment.validation_fraction > 0
                metrics["val_loss"], metrics["val_accuracy"] = sim.evaluate(state, "validation")
            logged = True
        if logged:
            rows.append(metrics)
        if on_step is not None:
            sim.last_metrics = metrics  # what the callback may read: this step's metrics (test_* when evaluated)
            on_step(sim, state)
        if checkpoint_dir is not None and (state.step % checkpoint_every == 0 or state.step == experiment.steps):
            checkpoint.save(checkpoint_dir, experiment, state, rows, ledger=sim.comm.ledger,
                            local_workers=sim.local_workers)
    history = pd.DataFrame(rows, columns=_columns(rows))
    dense = compressors.Identity().bits_per_step(sim.shapes, dtype=experiment.torch_dtype)
    declared = sim.aggregator.bits_per_step(sim.shapes, dtype=experiment.torch_dtype)
    return Result(experiment, history, state.params, state.buffers, declared, dense,
                  time.perf_counter() - started, extras={"final_state": state})


#: The history's columns. bits: cumulative payload bits one worker sent. compression_error: the relative error
#: of the applied update against the exact mean of the step's gradients, error-feedback memory included
#: (||update - mean_i g_i|| / ||mean_i g_i||; NaN on steps not measured, see compression_error_every).
#: memory_norm: sqrt(mean_i ||e_i||^2) of the error-feedback residuals. Only when their option is on:
#: val_loss/val_accuracy (validation_fraction > 0, on evaluated steps), update_norm (clip_grad_norm: the
#: aggregated update's global norm before clipping), sim_time (network).
HISTORY_COLUMNS = ["step", "lr", "train_loss", "test_loss", "test_accuracy", "val_loss", "val_accuracy", "bits",
                   "compression_error", "memory_norm", "update_norm", "skipped_steps", "sim_time"]
OPTIONAL_COLUMNS = ("val_loss", "val_accuracy", "update_norm", "sim_time")


def _columns(rows: list[dict[str, float]]) -> list[str]:
    present = {key for row in rows for key in row}
    return [c for c in HISTORY_COLUMNS if c in present or c not in OPTIONAL_COLUMNS] + sorted(
        present - set(HISTORY_COLUMNS))

