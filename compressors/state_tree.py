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


def memory_tensors(state) -> list[torch.Tensor]:
    """The (k, *shape) residuals e_i of local/averaged error feedback in a nested state (not ef21's estimates)."""
    return [m for s in iter_states(state) if isinstance(s, ErrorFeedbackState) and not s.estimate
            for m in s.memory.values()]


#: Elements per float32 partial sum in ``squared_norm``: short enough for float32 accumulation to stay
#: accurate (~1e-8 relative; one float32 sum over 16 M elements is off by ~1e-3), long enough to be one pass.
NORM_CHUNK = 4096


def squared_norm(t: torch.Tensor) -> torch.Tensor:
    """||t||^2 as a 0-d float64 tensor, in one read of ``t`` and no (W, ...) copy.

    Partial norms of NORM_CHUNK-element rows are accumulated in float32 (float64 for float64 input) and
    their squares summed in float64: ~1e-8 relative to an exact float64 sum, against a float64 copy of t
    (a 2x-sized allocation and three passes). A metric and a finiteness probe, not part of training:
    non-finite iff an element is non-finite or a row's float32 sum of squares overflows (|x| > ~1e17).
    """
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    flat = t.reshape(-1)  # a view when t is contiguous
    main = flat.numel() - flat.numel() % NORM_CHUNK
    rows = torch.linalg.vector_norm(flat[:main].view(-1, NORM_CHUNK), dim=1, dtype=dtype)  # (numel // chunk,)
    rest = torch.linalg.vector_norm(flat[main:], dtype=torch.float64)
    return rows.double().square().sum() + rest.square()


def memory_norm(state) -> float:
    """sqrt(mean over workers of sum over tensors of ||e_i||^2) for local/averaged error feedback memory.

    0.0 when the aggregator keeps no residual (no error feedback, or ef21 whose memory is an estimate).
    """
    total = 0.0
    for m in memory_tensors(state):
        total += float(squared_norm(m)) / max(m.shape[0], 1)
    return total ** 0.5


def float_leaves(tree, path: str = ""):
    """(path, tensor) of every floating-point tensor in a nested state (NamedTuples, dicts, tuples, lists)."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point():
            yield path or ".", tree
        return
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        items = zip(tree._fields, tree)
    elif isinstance(tree, (tuple, list)):
        items = enumerate(tree)
    elif isinstance(tree, dict):
        items = tree.items()
    else:
        return
    for key, value in items:
        yield from float_leaves(value, f"{path}.{key}" if path else str(key))


def tensor_leaves(tree) -> Iterator[torch.Tensor]:
    """Every tensor of a nested state, in order (records, dicts, lists, tuples; any dtype, any device)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from tensor_leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from tensor_leaves(value)
