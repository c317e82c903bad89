"""What a run returns: the history table, final parameters and a summary of what was sent."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from .experiment import Experiment


@dataclass
class Result:
    experiment: Experiment
    history: pd.DataFrame  # one row per logged step
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]  # per worker (k, *shape) of this process's workers
    bits_per_step: float  # the compressor's declared bits per worker per step (after any warm-up)
    dense_bits_per_step: float  # the same for the exact all-reduce of every parameter
    wall_seconds: float
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def compression_ratio(self) -> float:
        return self.dense_bits_per_step / self.bits_per_step if self.bits_per_step else math.inf

    def final(self, column: str) -> float:
        """The last logged non-NaN value of a history column."""
        values = self.history[column].dropna()
        return float(values.iloc[-1]) if len(values) else float("nan")
