"""What an aggregator may ask of the network: the ``Comm`` protocol every collective implements."""
from __future__ import annotations

from typing import Protocol

import torch


class Comm(Protocol):
    """What an aggregator may ask of the network. The leading axis of every argument is the worker axis."""

    workers: int  # total number of (possibly emulated) workers

    def all_reduce_mean(self, x: torch.Tensor, tag: str = "") -> torch.Tensor:
        """(k, *s) local rows -> (*s), the mean over all workers; every worker receives the same result."""

    def all_gather(self, x: torch.Tensor, tag: str = "") -> torch.Tensor:
        """(k, *s) local rows -> (W, *s), every worker's rows in worker order."""
