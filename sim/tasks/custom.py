"""Your own workload as a task: a model factory, data as tensors or a map-style Dataset, a loss.

    def my_task(*, dtype, hidden: int = 32):          # keyword-only options with defaults = task_options
        return sim.tasks.custom_task("my-task", model=lambda: MyModel(hidden), train=(x, y), test=(x_test, y_test),
                                     loss="cross_entropy", dtype=dtype)

    sim.tasks.register_task("my-task", my_task)
    sim.run(sim.Experiment(task="my-task", task_options={"hidden": 64}, workers=8, steps=100))

The simulator draws every worker's batch by indexing tensors, so a Dataset is read once, item by item, and
stacked in memory (``torch.utils.data.default_collate``). See docs/own_workload.md.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from compressors.options import invalid
from .base import Task, cross_entropy

#: loss names ``custom_task`` knows; any callable ``(outputs, targets) -> scalar mean loss`` works too.
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": cross_entropy,
    "mse": nn.functional.mse_loss,
}


def as_tensors(data: Any, split: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a pair of tensors (or arrays) or a map-style Dataset whose items are (input, target)."""
    owner = f"custom_task {name!r}"
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = (torch.as_tensor(part) for part in data)
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        if len(data) == 0:
            raise invalid(owner, split, data, "a Dataset with at least one item")
        items = [data[i] for i in range(len(data))]
        if not all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items[:1]):
            raise invalid(owner, split, type(data).__name__, "a Dataset whose items are (input, target) pairs")
        x, y = default_collate(items)  # (N, *features), (N, ...)
    else:
        raise invalid(owner, split, type(data).__name__,
                      "a pair (inputs, targets) of tensors, or a map-style torch.utils.data.Dataset of such pairs")
    if x.dim() == 0 or y.dim() == 0 or len(x) != len(y) or len(x) == 0:
        raise invalid(owner, split, f"inputs {tuple(x.shape)}, targets {tuple(y.shape)}",
                      "inputs and targets with the same number (>= 1) of samples along the first axis")
    return x, y


def custom_task(name: str, *, model: Callable[[], nn.Module], train: Any, test: Any,
                loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "cross_entropy",
                classification: bool | None = None, dtype: torch.dtype = torch.float32) -> Task:
    """A ``Task`` from your model and data, for a loader passed to ``register_task``.

    model: a zero-argument factory returning a fresh ``nn.Module`` (the simulator builds it under a seeded
        fork of torch's RNG, so it keeps exactly its own initialisation for each seed).
    train, test: ``(inputs, targets)`` tensors, or map-style ``Dataset`` s of ``(input, target)`` items.
        Floating-point inputs and targets are cast to ``dtype`` (the Experiment's); integer ones (class labels,
        token ids) keep their type.
    loss: "cross_entropy", "mse", or a callable ``(outputs, targets) -> scalar mean over the batch``.
    classification: report test accuracy (argmax of the outputs against integer targets); default: True when
        the targets are integers. Regression tasks report the test loss only.
    """
    if not isinstance(name, str) or not name:
        raise invalid("custom_task", "name", name, "a non-empty string")
    if not callable(model) or isinstance(model, nn.Module):
        raise invalid(f"custom_task {name!r}", "model", type(model).__name__,
                      "a zero-argument factory returning an nn.Module, e.g. lambda: MyModel() (not the module "
                      "itself: each run builds its own from its seed)")
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise invalid(f"custom_task {name!r}", "loss", loss,
                          f"one of {', '.join(map(repr, LOSSES))}, or a callable")
        loss = LOSSES[loss]
    elif not callable(loss):
        raise invalid(f"custom_task {name!r}", "loss", loss, "a loss name or a callable (outputs, targets) -> loss")
    splits = [as_tensors(data, split, name) for split, data in (("train", train), ("test", test))]
    (train_x, train_y), (test_x, test_y) = [(_cast(x, dtype), _cast(y, dtype)) for x, y in splits]
    if train_x.shape[1:] != test_x.shape[1:] or train_y.shape[1:] != test_y.shape[1:]:
        raise invalid(f"custom_task {name!r}", "test", f"inputs {tuple(test_x.shape)}, targets {tuple(test_y.shape)}",
                      f"the train split's sample shapes: inputs (N, {', '.join(map(str, train_x.shape[1:]))}), "
                      f"targets (N, {', '.join(map(str, train_y.shape[1:]))})")
    integer_targets = not train_y.is_floating_point()
    if classification is None:
        classification = integer_targets
    if not isinstance(classification, bool):
        raise invalid(f"custom_task {name!r}", "classification", classification, "True, False or None")
    labels = train_y if classification and integer_targets and train_y.dim() == 1 else None  # label-skew sharding
    return Task(name, train_x, train_y, test_x, test_y, model, loss, classification=classification, labels=labels)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t
