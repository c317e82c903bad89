"""Tasks by name: ``TASK_REGISTRY`` maps a name to a loader ``(dtype=..., **task_options) -> Task``.

A loader's keyword-only parameters (besides ``dtype``) are the task's allowed ``task_options``; its optional
``validate`` attribute checks values. Unknown names and keys raise ValueError with the closest suggestion.
Your own task: ``register_task(name, loader)``, with ``custom_task`` building the Task from your model factory
and data (docs/own_workload.md).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from compressors.options import check_choice, check_known_options, invalid
from .base import Task
from .custom import custom_task
from .split import SPLIT_SEED, split_validation
from .digits import digits_cnn_task, digits_mlp_task, validate_digits_options
from .synthetic import synthetic_lowrank_task, validate_synthetic_options
from .charlm import charlm_task, validate_charlm_options
from .cifar10 import cifar10_task, validate_cifar_options
from .wikitext2 import validate_wikitext2_options, wikitext2_task
from .fashion_mnist import fashion_mnist_cnn_task, fashion_mnist_mlp_task, validate_fashion_options

TaskLoader = Callable[..., Task]
TASK_REGISTRY: dict[str, TaskLoader] = {}
TASK_VALIDATORS: dict[str, Callable[[dict], None] | None] = {}  # name -> its option validator
BUILT_IN_TASKS: tuple[str, ...] = ()  # set below, after the bundled tasks are registered


def register_task(name: str, loader: TaskLoader, validate: Callable[[dict], None] | None = None) -> None:
    """Make ``Experiment(task=name, task_options={...})`` build ``loader(dtype=..., **task_options)``.

    ``loader`` takes ``dtype`` and the task's options as keyword-only parameters with defaults (the defaults are
    what ``task_options`` may change; ``python -m sim list tasks`` shows them) and returns a ``Task``
    (``custom_task`` builds one from a model factory and tensors or a Dataset). ``validate(options)``, if given,
    raises ValueError naming a bad option value before anything is loaded. Registering a name again replaces
    your earlier loader (a re-run notebook cell); the built-in tasks cannot be replaced.
    """
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise invalid("register_task", "name", name, "a non-empty string without surrounding spaces")
    if name in BUILT_IN_TASKS and TASK_REGISTRY.get(name) is not loader:
        raise invalid("register_task", "name", name,
                      f"a name other than the built-in tasks ({', '.join(BUILT_IN_TASKS)})")
    if not callable(loader):
        raise invalid("register_task", "loader", loader, "a function (*, dtype, **options) -> Task")
    parameters = inspect.signature(loader).parameters.values()
    kinds = {p.name: p.kind for p in parameters}
    if kinds.get("dtype") != inspect.Parameter.KEYWORD_ONLY:
        raise invalid("register_task", "loader", getattr(loader, "__name__", loader),
                      "a function with a keyword-only dtype parameter: def loader(*, dtype, **options) -> Task")
    for p in parameters:
        if p.name != "dtype" and (p.kind != inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty):
            raise invalid("register_task", "loader", getattr(loader, "__name__", loader),
                          f"keyword-only options with defaults after '*' (parameter {p.name!r} is not)")
    if validate is not None and not callable(validate):
        raise invalid("register_task", "validate", validate, "None or a function (options: dict) -> None")
    # kept by name, not as an attribute of the loader: one loader may serve several names (with other validators)
    TASK_VALIDATORS[name] = validate
    TASK_REGISTRY[name] = loader


def task_options(name: str) -> dict[str, object]:
    loader = TASK_REGISTRY[name]
    return {k: p.default for k, p in inspect.signature(loader).parameters.items()
            if p.kind == inspect.Parameter.KEYWORD_ONLY and k != "dtype"}


def validate_task(name: str, options: dict) -> None:
    check_choice("Experiment", "task", name, sorted(TASK_REGISTRY))
    check_known_options(f"Experiment.task_options for {name!r}", options, task_options(name))
    validate = TASK_VALIDATORS.get(name)
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
BUILT_IN_TASKS = tuple(TASK_REGISTRY)  # registered above; register_task refuses to replace them

__all__ = ["Task", "TASK_REGISTRY", "register_task", "custom_task", "task_options", "load_task", "validate_task",
           "split_validation", "SPLIT_SEED"]
