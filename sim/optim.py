"""SGD applied after aggregation (PowerSGD paper, Alg. 2): weight decay, momentum and Nesterov act on the
aggregated update, identically on every worker. Functional: the momentum buffers are explicit state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from compressors.serialization import register_record

Tensors = dict[str, torch.Tensor]


@register_record
class SGDState(NamedTuple):
    momentum: Tensors  # (*shape) per parameter


@dataclass(frozen=True)
class SGD:
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def init(self, params: Tensors) -> SGDState:
        return SGDState({name: torch.zeros_like(p) for name, p in params.items()})

    def step(self, params: Tensors, update: Tensors, state: SGDState, lr: float) -> tuple[Tensors, SGDState]:
        """d = u + wd * theta; m <- mu m + d; step = d + mu m (Nesterov) or m; theta <- theta - lr * step.

        The same operations, in the same order, as ``torch.optim.SGD`` (fused ``add(alpha=)``: one pass each),
        so the big-batch oracle matches it to rounding and big models pay few passes over their parameters.
        """
        new_params, new_momentum = {}, {}
        for name, p in params.items():
            d = update[name].to(p.dtype)
            if self.weight_decay:
                d = d.add(p, alpha=self.weight_decay)
            if self.momentum:
                m = state.momentum[name].mul(self.momentum).add_(d)
                new_momentum[name] = m
                d = d.add(m, alpha=self.momentum) if self.nesterov else m
            else:
                new_momentum[name] = state.momentum[name]
            new_params[name] = p.add(d, alpha=-lr)
        return new_params, SGDState(new_momentum)


def learning_rate(step: int, base: float, warmup_steps: int, milestones: tuple[int, ...], decay: float) -> float:
    """Linear warm-up over ``warmup_steps`` (Goyal et al. 2017), then x ``decay`` at each milestone passed."""
    lr = base * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base
    return lr * decay ** sum(1 for m in milestones if step >= m)
