"""The compressors on real DDP runs: the communication hook (``ddp_comm_hook``), its guard against non-finite
gradients and failing compressors, its state I/O, and the original ``powersgd`` package's API
(``PowerSGD``, ``Config``, ``optimizer_step``)."""
from .hook import HookState, ddp_comm_hook
from .package_api import Config, PowerSGD, optimizer_step

__all__ = ["HookState", "ddp_comm_hook", "Config", "PowerSGD", "optimizer_step"]
