"""Real processes: experiments on ``torch.distributed`` ranks (gloo or NCCL) that return the same ``Result`` as
``sim.run``, and the alpha-beta calibration of a real link.

Modules: ``distributed`` (spawn ranks, ``run_distributed``, ``run_on_rank`` for torchrun), ``calibrate``
(timed collectives -> a fitted ``sim.cost.Network``).
"""
from .calibrate import Calibration
from .distributed import DistributedRunError, run_distributed, run_on_rank, spawn

__all__ = ["Calibration", "DistributedRunError", "run_distributed", "run_on_rank", "spawn"]
