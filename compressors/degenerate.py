"""Degenerate configurations: a compressor configuration that sends at least the dense gradient's bits.

PowerSGD with a rank >= min(n, m) for every matrix sends (n + m) r >= n m numbers per matrix (or, with the
default ``min_compression_rate``, sends every tensor dense); ``min_compression_rate=0`` compresses tensors it
cannot shrink, which sends more than dense. Such a run is a (possibly worse) dense run: tables and plots label
it "(dense)" and it warns once per configuration, so a sweep over ranks does not present it as compression.
"""
from __future__ import annotations

import warnings

import torch

from .base import dtype_bits, numel

DENSE_SUFFIX = " (dense)"
_warned: set[tuple] = set()


class DenseConfigurationWarning(UserWarning):
    """A compressor configuration sends at least the dense gradient's bits."""


def dense_bits(shapes, dtype: torch.dtype = torch.float32) -> int:
    """Bits one worker sends for the exact all-reduce of every tensor in ``dtype``."""
    return sum(numel(tuple(s)) for s in shapes.values()) * dtype_bits(dtype)


def sends_dense(aggregator, shapes, dtype: torch.dtype = torch.float32) -> bool:
    """bits_per_step >= the dense bits, on a model with something to send."""
    dense = dense_bits(shapes, dtype)
    return dense > 0 and aggregator.bits_per_step(shapes, dtype=dtype) >= dense


def warn_if_dense(aggregator, shapes, label: str, dtype: torch.dtype = torch.float32) -> bool:
    """Warn (once per label, shapes and dtype) when the configuration sends at least the dense bits; returns
    whether it does."""
    if not sends_dense(aggregator, shapes, dtype):
        return False
    key = (label, tuple(sorted((n, tuple(s)) for n, s in shapes.items())), str(dtype))
    if key not in _warned:
        _warned.add(key)
        sent, dense = aggregator.bits_per_step(shapes, dtype=dtype), dense_bits(shapes, dtype)
        warnings.warn(f"{label} sends {sent / dense:.2f}x the dense gradient's bits ({int(sent)} >= {dense} per "
                      "worker per step): no compression (a rank >= min(n, m) for every matrix, or "
                      "min_compression_rate=0 compressing tensors it cannot shrink); labelled '(dense)'",
                      DenseConfigurationWarning, stacklevel=3)
    return True
