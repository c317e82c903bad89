"""Least squares whose gradients have a controlled singular-value spectrum.

Model: one matrix Theta (d_out x d_in), loss 0.5 E||Theta x - y||^2 with x ~ N(0, I) and
y = Theta* x + noise, Theta* = U diag(sigma) V^T, sigma_k = decay^k (k = 0..min(d_out, d_in)-1).
Starting from Theta = 0 the expected gradient is (Theta - Theta*) E[x x^T] = -Theta*, so its spectrum is
sigma: decay near 0 is nearly rank 1, decay 1 is flat. Good for studying low-rank approximation error.
"""
from __future__ import annotations

import torch

from compressors.options import MAX_SEED, check_float, check_int
from ..models import linear
from .base import Task, half_squared_error


def synthetic_lowrank_task(*, dtype: torch.dtype, split_seed: int = 0, dim_in: int = 64, dim_out: int = 32,
                           spectrum_decay: float = 0.5, noise: float = 0.01, samples: int = 4096,
                           test_samples: int = 1024) -> Task:
    g = torch.Generator().manual_seed(split_seed)
    rank = min(dim_in, dim_out)
    u, _ = torch.linalg.qr(torch.randn(dim_out, rank, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(dim_in, rank, generator=g, dtype=torch.float64))
    sigma = spectrum_decay ** torch.arange(rank, dtype=torch.float64)
    target = u @ torch.diag(sigma) @ v.T  # (d_out, d_in)
    x = torch.randn(samples + test_samples, dim_in, generator=g, dtype=torch.float64)
    y = x @ target.T + noise * torch.randn(samples + test_samples, dim_out, generator=g, dtype=torch.float64)
    x, y = x.to(dtype), y.to(dtype)
    return Task("synthetic-lowrank", x[:samples], y[:samples], x[samples:], y[samples:],
                lambda: linear(dim_in, dim_out), half_squared_error, classification=False, zero_init=True)


def validate_synthetic_options(options: dict) -> None:
    owner = "Experiment.task_options"
    for key in ("dim_in", "dim_out", "samples", "test_samples"):
        if key in options:
            check_int(owner, key, options[key], minimum=1)
    if "split_seed" in options:
        check_int(owner, "split_seed", options["split_seed"], minimum=0, maximum=MAX_SEED)
    if "spectrum_decay" in options:
        check_float(owner, "spectrum_decay", options["spectrum_decay"], minimum=0.0, maximum=1.0, min_inclusive=False)
    if "noise" in options:
        check_float(owner, "noise", options["noise"], minimum=0.0, maximum=1e6)  # larger overflows the loss
