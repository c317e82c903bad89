"""Building a model with its own initialisation, deterministically, without touching the global RNG.

A module initialises itself in ``__init__`` / ``reset_parameters`` from torch's global generator: free
``nn.Parameter(torch.randn(...))``, ``nn.MultiheadAttention.in_proj_weight`` and any custom scheme included.
``build`` runs the factory inside ``torch.random.fork_rng`` after seeding the forked generator, so the
parameters are exactly what the module's own code gives for that seed, the same seed gives the same
parameters, and the caller's global RNG state is restored afterwards (no trace left). Only the CPU generator is
forked and seeded: the module is built on the CPU and then moved, so accelerator generators are never touched.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def build(factory: Callable[[], nn.Module], seed: int | torch.Generator = 0, device="cpu",
          dtype: torch.dtype = torch.float32) -> nn.Module:
    """``factory()`` under torch's global generator seeded with ``seed``, then cast to ``dtype``/``device``.

    ``seed`` may be a ``torch.Generator``: its ``initial_seed()`` is used (it is not advanced). Casting
    after construction keeps the values a float32 build draws (a float64 model is the float32 one, widened).
    """
    if isinstance(seed, torch.Generator):
        seed = seed.initial_seed()
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"build: seed={seed!r} is invalid; allowed: an integer >= 0 or a torch.Generator")
    with torch.random.fork_rng(devices=[]):  # CPU generator only; restored on exit
        torch.default_generator.manual_seed(seed)  # torch.manual_seed would also reseed every CUDA generator
        module = factory()
    if not isinstance(module, nn.Module):
        raise ValueError(f"build: the model factory returned {type(module).__name__}; allowed: an nn.Module")
    return module.to(device=device, dtype=dtype)
