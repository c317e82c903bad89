"""The N-worker simulator: virtual collectives, per-worker gradients with torch.func, experiments and sweeps.

    result = sim.run(sim.Experiment(task="digits-mlp", workers=8, steps=300,
                                    compressor={"name": "powersgd", "rank": 2}, seed=0))
    result.history   # pandas DataFrame, one row per logged step
"""
from .collective import Ledger, LedgerRecord, VirtualCollective
from .experiment import Experiment
from .result import Result
from .run import NonFiniteGradientError, Simulation, TrainState, run
from .sweep import sweep
from .cost import time_to_accuracy, whatif

__all__ = ["Ledger", "LedgerRecord", "VirtualCollective", "Experiment", "Result", "NonFiniteGradientError",
           "Simulation", "TrainState", "run", "sweep", "whatif", "time_to_accuracy"]
