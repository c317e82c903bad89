"""scikit-learn's bundled digits (1,797 8x8 images, 10 classes): no download needed."""
from __future__ import annotations

import numpy as np
import torch

from compressors.options import MAX_SEED, check_int
from ..models import digits_cnn, mlp
from .base import Task, cross_entropy

TEST_FRACTION = 0.2


def load_digits_split(split_seed: int, dtype: torch.dtype):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.data / 16.0, dtype=dtype)  # (1797, 64) in [0, 1]
    y = torch.as_tensor(data.target, dtype=torch.long)
    order = torch.as_tensor(np.random.default_rng(split_seed).permutation(len(y)))
    n_test = int(round(TEST_FRACTION * len(y)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def validate_digits_options(options: dict) -> None:
    if "split_seed" in options:
        check_int("Experiment.task_options", "split_seed", options["split_seed"], minimum=0, maximum=MAX_SEED)
    hidden = options.get("hidden", (1,))
    if not isinstance(hidden, (list, tuple)) or not hidden or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
        raise ValueError(f"Experiment.task_options: hidden={hidden!r} is invalid; allowed: a non-empty list of integers >= 1")


def digits_mlp_task(*, dtype: torch.dtype, split_seed: int = 0, hidden: tuple[int, ...] = (128, 128)) -> Task:
    train_x, train_y, test_x, test_y = load_digits_split(split_seed, dtype)
    widths = tuple(hidden)
    return Task("digits-mlp", train_x, train_y, test_x, test_y, lambda: mlp(64, widths, 10), cross_entropy,
                labels=train_y)


def digits_cnn_task(*, dtype: torch.dtype, split_seed: int = 0) -> Task:
    train_x, train_y, test_x, test_y = load_digits_split(split_seed, dtype)
    return Task("digits-cnn", train_x, train_y, test_x, test_y, digits_cnn, cross_entropy, labels=train_y)
