"""Deterministic parameter initialisation from an explicit generator (never the global RNG).

Modules are built on the meta device (no RNG consumed), materialised with ``to_empty`` and initialised here
with PyTorch's default schemes, driven by the caller's ``torch.Generator``.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .lstm import UnrolledLSTM


def build(factory: Callable[[], nn.Module], generator: torch.Generator, device="cpu",
          dtype: torch.dtype = torch.float32) -> nn.Module:
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device=device).to(dtype)
    init_parameters(module, generator)
    return module


def _uniform_(tensor: torch.Tensor, bound: float, generator: torch.Generator) -> None:
    with torch.no_grad():
        tensor.copy_((torch.rand(tensor.shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound)


def init_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's defaults: kaiming-uniform(a=sqrt 5) weights and fan-in uniform biases for Linear/Conv,
    ones/zeros for norms, N(0, 1) embeddings, U(-1/sqrt h, 1/sqrt h) for recurrent layers."""
    with torch.no_grad():  # to_empty leaves garbage: a parameter no rule below covers (a tied decoder's bias) is 0
        for p in module.parameters():
            p.zero_()
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            fan_in = sub.weight[0].numel()
            # kaiming_uniform_(a=sqrt(5)) gives bound = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + 5)).
            _uniform_(sub.weight, math.sqrt(1.0 / 3.0) * math.sqrt(3.0 / fan_in), generator)
            if sub.bias is not None:
                _uniform_(sub.bias, 1.0 / math.sqrt(fan_in), generator)
        elif isinstance(sub, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            if getattr(sub, "weight", None) is not None:
                nn.init.ones_(sub.weight)
                nn.init.zeros_(sub.bias)
            if getattr(sub, "running_mean", None) is not None:
                sub.reset_running_stats()
        elif isinstance(sub, nn.Embedding):
            with torch.no_grad():
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator, dtype=torch.float64))
        elif isinstance(sub, (nn.LSTM, nn.GRU, nn.RNN, UnrolledLSTM)):  # UnrolledLSTM: nn.LSTM's names/order
            bound = 1.0 / math.sqrt(sub.hidden_size)
            for p in sub.parameters(recurse=False):
                _uniform_(p, bound, generator)
