"""Policies that wrap any aggregator: warm-up with exact all-reduce, and per-tensor partitions.

Both are wrappers, not flags threaded through kernels (DESIGN principle 5).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .base import Aggregator, Reduced, TheoryClaim, dtype_bits, numel
from .error_feedback import with_error_feedback
from .identity import Identity
from .serialization import register_record


@register_record
class WarmupState(NamedTuple):
    step: int
    inner: object


class Warmup(Aggregator):
    """Exact all-reduce for the first ``steps`` steps, then the inner aggregator (its state untouched until then)."""

    def __init__(self, inner: Aggregator, steps: int):
        self.inner = inner
        self.steps = steps
        self.dense = Identity(tag="warmup")
        self.all_reducible = inner.all_reducible
        self.name = inner.name

    def init(self, shapes, workers, seed=0, dtype=torch.float32, device="cpu"):
        return WarmupState(0, self.inner.init(shapes, workers, seed, dtype=dtype, device=device))

    def reduce(self, grads, state, comm, want_local=False):
        if state.step < self.steps:
            reduced, _ = self.dense.reduce(grads, (), comm, want_local)
            return reduced, WarmupState(state.step + 1, state.inner)
        reduced, inner = self.inner.reduce(grads, state.inner, comm, want_local)
        return reduced, WarmupState(state.step + 1, inner)

    def bits_per_step(self, shapes, **kwargs):
        return self.inner.bits_per_step(shapes, **kwargs)

    def theory(self, shapes):
        return self.inner.theory(shapes)

    def __repr__(self):
        return f"Warmup({self.inner!r}, steps={self.steps})"


def compression_rule(kernel: Aggregator, min_compression_rate: float, compress_vectors: bool = False
                     ) -> Callable[[tuple[int, ...]], bool]:
    """Compress a tensor iff it is a matrix (or ``compress_vectors``) and dense/compressed bits > the minimum rate.

    The rate is computed by the kernel itself on the tensor's shape, so it uses the matrix view
    shape[0] x prod(shape[1:]) for low-rank kernels.
    """

    def should_compress(shape: tuple[int, ...]) -> bool:
        if len(shape) <= 1 and not compress_vectors:
            return False
        if numel(shape) == 0:
            return False
        dense = numel(shape) * dtype_bits(torch.float32)
        sent = kernel.bits_per_step({"x": shape})
        return sent == 0 or dense / sent > min_compression_rate

    return should_compress


@register_record
class PartitionState(NamedTuple):
    compressed: object
    uncompressed: object
    compressed_names: tuple[str, ...]


class Partition(Aggregator):
    """Tensors the rule accepts go to ``compressed``; the rest are all-reduced exactly in one packed collective."""

    def __init__(self, compressed: Aggregator, rule: Callable[[tuple[int, ...]], bool]):
        self.compressed = compressed
        self.uncompressed = Identity(tag="uncompressed")
        self.rule = rule
        self.all_reducible = compressed.all_reducible
        self.name = compressed.name

    def split(self, shapes):
        chosen = {n: tuple(s) for n, s in shapes.items() if self.rule(tuple(s))}
        rest = {n: tuple(s) for n, s in shapes.items() if n not in chosen}
        return chosen, rest

    def init(self, shapes, workers, seed=0, dtype=torch.float32, device="cpu"):
        chosen, rest = self.split(shapes)
        return PartitionState(self.compressed.init(chosen, workers, seed, dtype=dtype, device=device),
                              self.uncompressed.init(rest, workers, seed, dtype=dtype, device=device),
                              tuple(chosen))

    def reduce(self, grads, state, comm, want_local=False):
        chosen = {n: g for n, g in grads.items() if n in state.compressed_names}
        rest = {n: g for n, g in grads.items() if n not in state.compressed_names}
        update: dict[str, torch.Tensor] = {}
        local: dict[str, torch.Tensor] = {}
        compressed_state = state.compressed
        if chosen:
            reduced, compressed_state = self.compressed.reduce(chosen, state.compressed, comm, want_local)
            update.update(reduced.update)
            local.update(reduced.local or {})
        if rest:
            reduced, _ = self.uncompressed.reduce(rest, state.uncompressed, comm, want_local)
            update.update(reduced.update)
            local.update(reduced.local or {})
        update = {n: update[n] for n in grads}
        local_out = {n: local[n] for n in grads} if want_local else None
        return Reduced(update, local_out), PartitionState(compressed_state, state.uncompressed, state.compressed_names)

    def bits_per_step(self, shapes, **kwargs):
        chosen, rest = self.split(shapes)
        bits = self.uncompressed.bits_per_step(rest, **kwargs) if rest else 0
        return bits + (self.compressed.bits_per_step(chosen, **kwargs) if chosen else 0)

    def theory(self, shapes):
        chosen, _ = self.split(shapes)
        if not chosen:
            return TheoryClaim(kind="exact", omega=0.0, delta=1.0)
        return self.compressed.theory(chosen)

    def __repr__(self):
        return f"Partition({self.compressed!r})"


def compose(kernel: Aggregator, *, error_feedback: str = "none", min_compression_rate: float = 0.0,
            compress_vectors: bool = False, start_compressing_after_num_steps: int = 0) -> Aggregator:
    """The standard stack: Warmup(Partition(ErrorFeedback(kernel))).

    Error feedback wraps only the compressed partition: tensors all-reduced exactly have no error to remember
    (with "averaged" EF they would otherwise accumulate x_i - mean(x), a pure per-worker drift).
    """
    aggregator: Aggregator = with_error_feedback(kernel, error_feedback)
    aggregator = Partition(aggregator, compression_rule(kernel, min_compression_rate, compress_vectors))
    if start_compressing_after_num_steps > 0:
        aggregator = Warmup(aggregator, start_compressing_after_num_steps)
    return aggregator
