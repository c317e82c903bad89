"""Tasks by name: ``TASK_REGISTRY`` maps a name to a loader ``(dtype=..., **task_options) -> Task``.

A loader's keyword-only parameters (besides ``dtype``) are the task's allowed ``task_options``; its optional
``validate`` attribute checks values. Unknown names and keys raise ValueError with the closest suggestion.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from compressors.options import check_choice, check_known_options
from .base import Task
from .digits import digits_cnn_task, digits_mlp_task, validate_digits_options
from .synthetic import synthetic_lowrank_task, validate_synthetic_options
from .charlm import charlm_task, validate_charlm_options
from .cifar10 import cifar10_task, validate_cifar_options
from .wikitext2 import validate_wikitext2_options, wikitext2_task
from .fashion_mnist import fashion_mnist_cnn_task, fashion_mnist_mlp_task, validate_fashion_options

TaskLoader = Callable[..., Task]
TASK_REGISTRY: dict[str, TaskLoader] = {}


def register_task(name: str, loader: TaskLoader, validate: Callable[[dict], None] | None = None) -> None:
    loader.validate = validate  # type: ignore[attr-defined]
    TASK_REGISTRY[name] = loader


def task_options(name: str) -> dict[str, object]:
    loader = TASK_REGISTRY[name]
    return {k: p.default for k, p in inspect.signature(loader).parameters.items()
            if p.kind == inspect.Parameter.KEYWORD_ONLY and k != "dtype"}


def validate_task(name: str, options: dict) -> None:
    check_choice("Experiment", "task", name, sorted(TASK_REGISTRY))
    check_known_options(f"Experiment.task_options for {name!r}", options, task_options(name))
    validate = getattr(TASK_REGISTRY[name], "validate", None)
    if validate is not None:
        validate(options)


def load_task(name: str, options: dict, dtype: torch.dtype) -> Task:
    validate_task(name, options)
    return TASK_REGISTRY[name](dtype=dtype, **options)


register_task("digits-mlp", digits_mlp_task, validate_digits_options)
register_task("digits-cnn", digits_cnn_task, validate_digits_options)
register_task("synthetic-lowrank", synthetic_lowrank_task, validate_synthetic_options)
register_task("charlm-lstm", charlm_task, validate_charlm_options)
register_task("cifar10-resnet18", cifar10_task, validate_cifar_options)
register_task("wikitext2-lstm", wikitext2_task, validate_wikitext2_options)
register_task("fashion-mnist-mlp", fashion_mnist_mlp_task, validate_fashion_options)
register_task("fashion-mnist-cnn", fashion_mnist_cnn_task, validate_fashion_options)

__all__ = ["Task", "TASK_REGISTRY", "register_task", "task_options", "load_task", "validate_task"]
