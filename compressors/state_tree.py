"""Walking nested aggregator states (NamedTuples of dicts of tensors) for diagnostics."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .error_feedback import ErrorFeedbackState


def iter_states(state) -> Iterator[object]:
    """Every NamedTuple in a nested state, outermost first."""
    if isinstance(state, tuple):
        if hasattr(state, "_fields"):
            yield state
        for item in state:
            yield from iter_states(item)
    elif isinstance(state, dict):
        for item in state.values():
            yield from iter_states(item)


def memory_norm(state) -> float:
    """sqrt(mean over workers of sum over tensors of ||e_i||^2) for local/averaged error feedback memory.

    0.0 when the aggregator keeps no residual (no error feedback, or ef21 whose memory is an estimate).
    """
    total = 0.0
    for s in iter_states(state):
        if isinstance(s, ErrorFeedbackState) and not s.estimate:
            for m in s.memory.values():
                workers = m.shape[0]
                squares = m.to(torch.float64, copy=True)  # a copy even for float64: squared in place below
                total += float(squares.mul_(squares).sum()) / max(workers, 1)  # == pow(2): one pass less
    return total ** 0.5
