"""The researcher's workflow around runs: config files, sweeps (in memory or into a results directory that
survives a kill), the results store, atomic writes, plots and loggers.

Modules: ``config`` (.toml/.json -> Experiment + sweep), ``sweep`` (grids x seeds, serial, in processes or on
any executor, ``sweep_to_dir``, ``SweepError``), ``store`` (``ResultsStore``, ``load_results``), ``io`` (atomic writes), ``plot``
(curves, bands, paired differences), ``loggers`` (TensorBoard).
"""
from . import plot
from .config import Config, load_config
from .loggers import TensorBoardLogger
from .store import ResultsStore, load_results
from .sweep import SweepError, sweep_to_dir

__all__ = ["plot", "Config", "load_config", "TensorBoardLogger", "ResultsStore", "load_results", "sweep_to_dir",
           "SweepError"]
