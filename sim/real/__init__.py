"""Real processes: experiments on ``torch.distributed`` ranks (gloo or NCCL) that return the same ``Result`` as
``sim.run``, and the alpha-beta calibration of a real link.

Modules: ``distributed`` (spawn ranks, ``run_distributed``, ``run_on_rank`` for torchrun), ``link`` (a real
slow link: a network namespace whose loopback is shaped by tc), ``calibrate`` (timed collectives -> a fitted
``sim.cost.Network``), ``forecast`` (time to accuracy over a link, predicted and measured).
"""
from .calibrate import Calibration
from .distributed import DistributedRunError, run_distributed, run_on_rank, spawn
from .forecast import Forecast, forecast
from .link import LinkUnavailableError, ShapedLink, shaped_namespace

__all__ = ["Calibration", "DistributedRunError", "run_distributed", "run_on_rank", "spawn", "Forecast", "forecast",
           "LinkUnavailableError", "ShapedLink", "shaped_namespace"]
