"""The N-worker simulator: virtual collectives, per-worker gradients with torch.func, experiments and sweeps.

    result = sim.run(sim.Experiment(task="digits-mlp", workers=8, steps=300,
                                    compressor={"name": "powersgd", "rank": 2}, seed=0))
    result.history   # pandas DataFrame, one row per logged step
"""
from .collective import Ledger, LedgerRecord, VirtualCollective
from .experiment import Experiment
from .result import Result
from .runner import NonFiniteGradientError, Simulation, TrainState, run
from .sweep import sweep
from .cost import time_to_accuracy, whatif
from .distributed import run_distributed
from .distributed_collective import DistributedCollective

__all__ = ["Ledger", "LedgerRecord", "VirtualCollective", "Experiment", "Result", "NonFiniteGradientError",
           "Simulation", "TrainState", "run", "sweep", "whatif", "time_to_accuracy"]
__all__ += ["run_distributed", "DistributedCollective"]
from . import checkpoint  # noqa: F401  (sim.checkpoint.latest/load/save; sim.run(checkpoint_dir=, resume_from=))
from . import plot  # noqa: F401  (sim.plot.plot_metric/plot_grid; matplotlib is imported only when drawing)
from .store import load_results; __all__ += ["load_results"]  # noqa: E702  (results dirs: sim.store, python -m sim sweep)
from .analysis import compare, tune_lr; __all__ += ["compare", "tune_lr"]  # noqa: E702  (paired CIs; lr protocol)
