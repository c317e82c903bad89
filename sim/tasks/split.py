"""A validation split carved from a task's training set (``Experiment.validation_fraction``).

The split is fixed: one permutation from ``SPLIT_SEED``, independent of the run's seed, so every seed, method
and learning rate of a study is tuned on the same held-out samples and trains on the same remaining ones.
Held out: the first floor(fraction * N) indices of ``torch.randperm(N)`` drawn from a generator seeded with
``SPLIT_SEED`` (N: the training samples). The rest keep their original order (sharding sees the same data
layout, only smaller). Every task works this way, built-in or registered: samples are rows of ``train_x``
(language-model tasks: non-overlapping windows of the training text). The test split is never touched.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from compressors.options import invalid
from .base import Task

SPLIT_SEED = 0  # the split's generator seed; not the run's seed (see the module docstring)


def validation_indices(samples: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices in increasing order, validation indices in drawn order) of a ``samples``-row set."""
    held_out = math.floor(fraction * samples)
    order = torch.randperm(samples, generator=torch.Generator().manual_seed(SPLIT_SEED))  # (N,)
    return order[held_out:].sort().values, order[:held_out]


def split_validation(task: Task, fraction: float) -> Task:
    """``task`` with ``val_x``/``val_y`` held out of its training set (``fraction`` in (0, 1)); ValueError naming
    ``validation_fraction`` when either part would be empty."""
    samples = len(task.train_x)
    train, held_out = validation_indices(samples, fraction)
    if len(held_out) == 0 or len(train) == 0:
        raise invalid("Experiment", "validation_fraction", fraction,
                      f"a fraction that leaves at least one validation and one training sample of task "
                      f"{task.name!r}'s {samples} training samples (at least {1 / samples:.3g}, below 1)")
    return dataclasses.replace(
        task, train_x=task.train_x[train], train_y=task.train_y[train],
        val_x=task.train_x[held_out], val_y=task.train_y[held_out],
        labels=task.labels[train] if task.labels is not None else None)
