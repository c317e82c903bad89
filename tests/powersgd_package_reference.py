"""A plain, slow model of the authors' ``powersgd`` package (epfml/powersgd, ``powersgd/powersgd.py`` as of its
July 2022 change) for W workers in one process: the reference ``compressors.PowerSGD`` is tested against.

Written from the package's README and code, one matrix and one worker at a time, with no code of this
project's. What the package does, per ``aggregate`` call (``PowerSGD`` around ``BasicPowerSGD``):

1. The first ``start_compressing_after_num_steps`` calls all-reduce every gradient exactly and zero it (the
   package's residual lives in ``p.grad``, so nothing is remembered).
2. Otherwise the tensors chosen at construction are compressed: each worker's matrix R_i = x_i viewed as
   shape[0] x rest (x_i = gradient + residual left in ``p.grad``); the others are averaged exactly and zeroed.
3. Each of the ``num_iters_per_step`` iterations, counted t = compressed_step * T + it, orthogonalizes the
   shared factor in place (P when t is even, else Q), computes this worker's other factor (Q_i = R_i^T P^, or
   P_i = R_i Q^), subtracts this worker's own message P^ Q_i^T (or P_i Q^^T) from R_i, SUM-all-reduces the
   factor and adds P^ Q^T / W (or P Q^^T / W) to the approximation. R_i is what stays in ``p.grad``.
4. Initial factors: ``torch.Generator(device).manual_seed(0)`` draws a (G, n, r) P batch for every group of G
   same-shape matrices (in order of first appearance), then a (G, m, r) Q batch for every group.

The package's bugs are modelled too, each behind a switch that is on by default (the package as it is), so
tests can show that the project's deviations matter only where a bug bites:

- ``whole_batch_rank1_norm``: a rank-1 factor batch is divided by the norm of the whole batch.
- ``raw_shape_selection``: compression is decided on the raw N-d shape, not on the matrix actually compressed.
- ``factors_in_default_dtype``: factors are drawn in torch's default dtype (a mismatch fails in the matmul).
- ``zero_factor_kept``: an all-zero factor is stored as it is (rank 1: it stays zero for good).
- nothing compressible: ``IndexError`` (the package takes the first compressed parameter's device).

``residual="averaged"`` models the package before July 2022 instead: after the all-reduce each worker
subtracted the *averaged* reconstruction P^ Q^T / W (or P Q^^T / W) from R_i, not its own message.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PACKAGE_BUGS = ("whole_batch_rank1_norm", "raw_shape_selection", "factors_in_default_dtype", "zero_factor_kept")


@dataclass(frozen=True)
class PackageConfig:
    rank: int
    min_compression_rate: float = 2
    num_iters_per_step: int = 1
    start_compressing_after_num_steps: int = 100


def should_compress(shape: tuple[int, ...], config: PackageConfig, raw_shape: bool) -> bool:
    """numel / (0.5 T min(rank, *dims) sum(dims)) > min_compression_rate, on the raw dims or the matrix view."""
    numel = math.prod(shape)
    dims = tuple(shape) if raw_shape else (shape[0] if shape else 1, numel // (shape[0] if shape else 1))
    rank = min(config.rank, min(dims))  # raw 0-d shape: min(()) raises, as in the package
    return numel / (0.5 * config.num_iters_per_step * rank * sum(dims)) > config.min_compression_rate


class PackageReference:
    """``aggregate(per-worker gradient lists) -> averaged list``; per-worker residuals kept in ``self.residual``."""

    def __init__(self, params: list[torch.Tensor], config: PackageConfig, workers: int, seed: int = 0,
                 bugs: tuple[str, ...] = PACKAGE_BUGS, residual: str = "local"):
        self.config, self.workers, self.bugs, self.residual_mode = config, workers, set(bugs), residual
        self.shapes = [tuple(p.shape) for p in params]
        self.compressed = [i for i, s in enumerate(self.shapes)
                           if should_compress(s, config, "raw_shape_selection" in self.bugs)]
        first = params[self.compressed[0]]  # IndexError when nothing is compressible, as in the package
        self.dtype = first.dtype
        self.matrix = {i: (self.shapes[i][0] if self.shapes[i] else 1, params[i].numel() // (self.shapes[i][0]
                                                                                             if self.shapes[i] else 1))
                       for i in self.compressed}
        self.groups: dict[tuple[int, int], list[int]] = {}
        for i in self.compressed:
            self.groups.setdefault(self.matrix[i], []).append(i)
        factor_dtype = torch.get_default_dtype() if "factors_in_default_dtype" in self.bugs else first.dtype
        generator = torch.Generator(device=first.device).manual_seed(seed)
        self.p: dict[int, torch.Tensor] = {}
        self.q: dict[int, torch.Tensor] = {}
        for store, side in ((self.p, 0), (self.q, 1)):  # every P batch, then every Q batch
            for shape, members in self.groups.items():
                rank = min(config.rank, min(shape))
                batch = torch.randn((len(members), shape[side], rank), generator=generator, device=first.device,
                                    dtype=factor_dtype)
                for j, i in enumerate(members):
                    store[i] = batch[j].clone()
        self.residual = [[torch.zeros_like(p) for p in params] for _ in range(workers)]
        self.calls = 0
        self.compressed_steps = 0

    def aggregate(self, grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """grads[w][i]: worker w's gradient of parameter i. Returns the averaged update per parameter."""
        self.calls += 1
        x = [[self.residual[w][i] + g for i, g in enumerate(grads[w])] for w in range(self.workers)]
        self.residual = [[torch.zeros_like(t) for t in row] for row in x]  # exact tensors are zeroed
        out = [sum(x[w][i] / self.workers for w in range(self.workers)) for i in range(len(self.shapes))]
        if self.calls <= self.config.start_compressing_after_num_steps:
            return out
        residual = {(w, i): x[w][i].reshape(self.matrix[i]).clone() for w in range(self.workers)
                    for i in self.compressed}
        approximation = {i: torch.zeros(self.matrix[i], dtype=self.dtype) for i in self.compressed}
        steps = self.config.num_iters_per_step
        at_start = (dict(self.p), dict(self.q))
        for it in range(steps):
            sends_q = (self.compressed_steps * steps + it) % 2 == 0
            shared, other = (self.p, self.q) if sends_q else (self.q, self.p)
            self._orthogonalize(shared)
            for i in self.compressed:
                total = None
                for w in range(self.workers):
                    r = residual[w, i]
                    mine = (r.T if sends_q else r) @ shared[i]  # Q_i = R_i^T P^ or P_i = R_i Q^
                    own = shared[i] @ mine.T if sends_q else mine @ shared[i].T
                    if self.residual_mode == "local":
                        residual[w, i] = r - own
                    total = mine if total is None else total + mine
                averaged = (shared[i] @ total.T if sends_q else total @ shared[i].T) / self.workers
                approximation[i] = approximation[i] + averaged
                if self.residual_mode == "averaged":
                    for w in range(self.workers):
                        residual[w, i] = residual[w, i] - averaged
                other[i] = total  # the package keeps the SUM in its buffer
        if "zero_factor_kept" not in self.bugs:  # the project: an all-zero factor gets its start-of-step value
            for factors, start in zip((self.p, self.q), at_start):
                for i in self.compressed:
                    if not bool(factors[i].abs().max() > 0):
                        factors[i] = start[i]
        self.compressed_steps += 1
        for i in self.compressed:
            out[i] = approximation[i].reshape(self.shapes[i])
            for w in range(self.workers):
                self.residual[w][i] = residual[w, i].reshape(self.shapes[i])
        return out

    def _orthogonalize(self, factors: dict[int, torch.Tensor]) -> None:
        for members in self.groups.values():
            if factors[members[0]].shape[-1] > 1:
                for i in members:
                    factors[i] = torch.linalg.qr(factors[i]).Q
            elif "whole_batch_rank1_norm" in self.bugs:
                norm = torch.linalg.vector_norm(torch.stack([factors[i] for i in members]))  # matrix.norm()
                for i in members:
                    factors[i] = factors[i] / torch.clamp(norm, min=1e-16)
            else:
                for i in members:
                    factors[i] = factors[i] / torch.clamp(torch.linalg.vector_norm(factors[i]), min=1e-16)
