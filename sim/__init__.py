"""The N-worker simulator: virtual collectives, per-worker gradients with torch.func, experiments and sweeps.

    result = sim.run(sim.Experiment(task="digits-mlp", workers=8, steps=300,
                                    compressor={"name": "powersgd", "rank": 2}, seed=0))
    result.history   # pandas DataFrame, one row per logged step

Wings (docs/design.md): the core at this level (experiment, simulation, runner, engine, optim, sharding,
checkpoint, result); ``real`` (processes, the distributed run), ``workflow`` (configs, sweeps, the results
store, plots, loggers), ``cli`` (every command); ``cost``, ``tasks``, ``models``, ``analysis``.
"""
from compressors.comm import DistributedCollective, Ledger, LedgerRecord, VirtualCollective
from . import checkpoint
from .analysis import compare, tune_lr
from .cost import time_to_accuracy, whatif
from .experiment import Experiment
from .real.distributed import run_distributed
from .real.forecast import Forecast, forecast
from .result import Result
from .runner import run
from .simulation import NonFiniteGradientError, Simulation, TrainState
from .workflow import plot
from .workflow.store import load_results
from .workflow.sweep import sweep

__all__ = [
    "Experiment", "Result", "run", "sweep", "compare", "tune_lr", "whatif", "time_to_accuracy", "load_results",
    "run_distributed", "forecast", "Forecast", "Simulation", "TrainState", "NonFiniteGradientError",
    "Ledger", "LedgerRecord", "VirtualCollective", "DistributedCollective",
    "checkpoint", "plot",
]
