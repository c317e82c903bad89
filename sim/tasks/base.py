"""What a task is: data with a held-out test split (and optionally a validation split), a model factory and a loss."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Task:
    name: str
    train_x: torch.Tensor  # (N, *features)
    train_y: torch.Tensor  # (N,) class labels or (N, outputs) targets
    test_x: torch.Tensor
    test_y: torch.Tensor
    model: Callable[[], nn.Module]  # builds the model with its own initialisation; sim.models.build calls it under a seeded RNG
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, targets) -> scalar mean loss
    classification: bool = True
    zero_init: bool = False  # start from all-zero parameters (synthetic-lowrank: controlled gradient spectrum)
    labels: torch.Tensor | None = None  # (N,) class of each training sample, for label-skewed sharding
    val_x: torch.Tensor | None = None  # a validation split held out of the training set (sim.tasks.split)
    val_y: torch.Tensor | None = None


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets)


def half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0.5 * mean over samples of ||output - target||^2 (least squares)."""
    return 0.5 * (outputs - targets).pow(2).sum(-1).mean()
