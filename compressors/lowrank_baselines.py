"""Low-rank baselines PowerSGD is compared with: exact SVD, a Gaussian sketch, spectral ATOMO.

Every tensor is compressed as its matrix view M = shape[0] x prod(shape[1:]) (n x m), in float32 at least.

- ``svd`` (the "best approximation" of the PowerSGD paper, Section 4): each worker's exact rank-r truncated
  SVD, factors U_r S_r (n x r) and V_r (m x r) all-gathered, update = mean_i of the workers' M_i,r. Not
  all-reducible: the sum of rank-r matrices is not rank r. ||M - M_r||^2 = sum_{i>r} sigma_i^2
  (Eckart-Young), so deterministically contractive with delta = r/min(n, m).
- ``lowrank_sketch``: C(M) = M Omega Omega^T / r with one Gaussian Omega (m x r) per tensor per step from the
  shared generator. Linear in M, so workers all-reduce M_i Omega (n x r) only. Unbiased, omega = (m + 1)/r
  (``theory.operators.sketch_omega``).
- ``atomo`` (Wang et al. 2018, spectral ATOMO): each worker samples singular triplets with the
  variance-optimal probabilities p_j under the budget sum p_j = s (``theory.operators.atomo_probabilities``)
  and rescales them by 1/p_j. Sampling is *systematic* (one private uniform u, triplet j taken iff an
  integer lies in [C_{j-1} - u, C_j - u), C the cumulative p): each j is taken with probability exactly p_j,
  and exactly s triplets are taken, so every worker sends the same fixed-size payload. Unbiased with
  omega = min(n, m)/s - 1; the variance sum_j sigma_j^2 (1/p_j - 1) is as with independent sampling
  because the rank-one terms are Frobenius-orthonormal.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from theory import operators
from .base import Aggregator, Reduced, TheoryClaim, check_grads, dtype_bits, matrix_view_shape
from .encoding import GatherKernel, compute_dtype, generator_from, shared_generator_state
from .packing import pack, unpack
from .quantize import StochasticQuantizer
from .serialization import register_record



def as_matrices(x: torch.Tensor) -> torch.Tensor:
    """(W, *shape) -> (W, n, m) in float32 at least."""
    n, m = matrix_view_shape(tuple(x.shape[1:]))
    return x.reshape(x.shape[0], n, m).to(compute_dtype(x.dtype))


def decode_factors(parts, shape, dtype, rank):
    """Parts [(R, n r), (R, m r)] -> (R, *shape) = P Q^T."""
    left, right = parts
    rows = left.shape[0]
    n, m = matrix_view_shape(tuple(shape))
    work = compute_dtype(dtype)
    p = left.to(work).reshape(rows, n, rank)  # (R, n, r)
    q = right.to(work).reshape(rows, m, rank)  # (R, m, r)
    return torch.matmul(p, q.transpose(-1, -2)).to(dtype).reshape(rows, *shape)


class SVD(GatherKernel):
    name = "svd"

    def __init__(self, rank: int):
        self.rank = rank

    def rank_of(self, shape) -> int:
        return min(self.rank, *matrix_view_shape(tuple(shape)))

    def payload(self, shape, dtype):
        n, m = matrix_view_shape(tuple(shape))
        r = self.rank_of(shape)
        return [(n * r, dtype), (m * r, dtype)]

    def encode(self, x, state, name):
        matrices = as_matrices(x)  # (W, n, m)
        r = self.rank_of(x.shape[1:])
        u, s, vh = torch.linalg.svd(matrices, full_matrices=False)  # (W, n, c), (W, c), (W, c, m)
        left = u[..., :r] * s[..., None, :r]  # (W, n, r)
        right = vh[..., :r, :].transpose(-1, -2)  # (W, m, r)
        rows = x.shape[0]
        return [left.reshape(rows, -1).to(x.dtype), right.reshape(rows, -1).to(x.dtype)], state

    def decode(self, parts, shape, dtype):
        return decode_factors(parts, shape, dtype, self.rank_of(shape))

    def theory(self, shapes):
        views = [matrix_view_shape(tuple(s)) for s in shapes.values()]
        delta = operators.combine_delta(operators.svd_delta(n, m, self.rank) for n, m in views)
        if delta == 1:
            return TheoryClaim(kind="exact", omega=0.0, delta=1.0)
        return TheoryClaim(kind="contractive", delta=delta, deterministic=True)

    def __repr__(self):
        return f"SVD(rank={self.rank})"


@register_record
class SketchState(NamedTuple):
    rng: torch.Tensor  # the shared generator's state (uint8), identical on every worker


class LowRankSketch(Aggregator):
    name = "lowrank_sketch"
    all_reducible = True

    def __init__(self, rank: int, seed: int | None = None):
        self.rank = rank
        self.seed = seed

    def init(self, shapes, workers, seed=0, dtype=torch.float32, device="cpu"):
        return SketchState(shared_generator_state(seed if self.seed is None else self.seed))

    def reduce(self, grads, state, comm, want_local=False):
        check_grads(self.name, grads)
        generator = generator_from(state.rng)
        omegas, sketches = {}, {}
        for name, g in grads.items():
            matrices = as_matrices(g)  # (W, n, m)
            # Drawn on the CPU in float32 from the shared generator: the same Omega on every worker and device.
            omegas[name] = torch.randn((matrices.shape[-1], self.rank), generator=generator).to(
                dtype=matrices.dtype, device=g.device)  # (m, r)
            sketches[name] = torch.matmul(matrices, omegas[name]).to(g.dtype)  # (W, n, r)
        means: dict[str, torch.Tensor] = {}
        for buffer, layout in pack(sketches):
            means.update(unpack(comm.all_reduce_mean(buffer, tag=self.name), layout))
        update, local = {}, {}
        for name, g in grads.items():
            omega_t = omegas[name].transpose(0, 1) / self.rank  # (r, m)
            update[name] = torch.matmul(means[name].to(omega_t.dtype), omega_t).to(g.dtype).reshape(g.shape[1:])
            if want_local:
                local[name] = torch.matmul(sketches[name].to(omega_t.dtype), omega_t).to(g.dtype).reshape(g.shape)
        return Reduced(update, local if want_local else None), SketchState(generator.get_state())

    def bits_per_step(self, shapes, dtype=torch.float32):
        return sum(matrix_view_shape(tuple(s))[0] * self.rank for s in shapes.values()) * dtype_bits(dtype)

    def theory(self, shapes):
        omega = operators.combine_omega(operators.sketch_omega(matrix_view_shape(tuple(s))[1], self.rank)
                                        for s in shapes.values())
        return TheoryClaim(kind="unbiased", omega=omega, deterministic=False)

    def __repr__(self):
        return f"LowRankSketch(rank={self.rank})"


def systematic_sample(p: torch.Tensor, u: torch.Tensor, count: int) -> torch.Tensor:
    """(R, c) probabilities summing to ``count``, (R,) uniforms -> (R, count) distinct indices: the j whose
    interval [C_{j-1}, C_j) of the cumulative sum C contains u + t for t = 0..count-1."""
    cumulative = p.double().cumsum(-1)  # (R, c)
    cumulative[..., -1] = count  # exact total, so every point u + t < count falls in some interval
    points = u.double().unsqueeze(-1) + torch.arange(count, dtype=torch.float64, device=p.device)  # (R, count)
    return torch.searchsorted(cumulative, points, right=True).clamp_max(p.shape[-1] - 1)


class Atomo(StochasticQuantizer):
    name = "atomo"

    def __init__(self, rank: int, seed: int | None = None):
        super().__init__(seed)
        self.rank = rank

    def budget_of(self, shape) -> int:
        return min(self.rank, *matrix_view_shape(tuple(shape)))

    def payload(self, shape, dtype):
        n, m = matrix_view_shape(tuple(shape))
        s = self.budget_of(shape)
        return [(n * s, dtype), (m * s, dtype)]

    def encode(self, x, work, name):
        matrices = as_matrices(x)  # (W, n, m)
        budget = self.budget_of(x.shape[1:])
        u, sigma, vh = torch.linalg.svd(matrices, full_matrices=False)  # (W, n, c), (W, c), (W, c, m)
        p = operators.atomo_probabilities(sigma, budget)  # (W, c) float64
        draws = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in work.generators])  # (W,)
        index = systematic_sample(p, draws.to(p.device), budget)  # (W, s)
        weight = (sigma.double() / p.clamp_min(torch.finfo(torch.float64).tiny)).gather(1, index)  # (W, s)
        left = u.gather(2, index.unsqueeze(1).expand(-1, u.shape[1], -1)) * weight.unsqueeze(1).to(u.dtype)
        right = vh.gather(1, index.unsqueeze(2).expand(-1, -1, vh.shape[2])).transpose(-1, -2)  # (W, m, s)
        rows = x.shape[0]
        return [left.reshape(rows, -1).to(x.dtype), right.reshape(rows, -1).to(x.dtype)], work

    def decode(self, parts, shape, dtype):
        return decode_factors(parts, shape, dtype, self.budget_of(shape))

    def theory(self, shapes):
        views = [matrix_view_shape(tuple(s)) for s in shapes.values()]
        omega = operators.combine_omega(operators.atomo_omega(n, m, self.rank) for n, m in views)
        if omega == 0:
            return TheoryClaim(kind="exact", omega=0.0, delta=1.0)
        return TheoryClaim(kind="unbiased", omega=omega, deterministic=False)

    def __repr__(self):
        return f"Atomo(rank={self.rank})"
