"""Unbiased stochastic quantizers, all-gather, private randomness: qsgd, terngrad, natural.

Each rounds a magnitude code at random between two neighbours, ``low`` and ``low + 1``, taking the upper
one with probability ``p`` chosen so that E[value] = x exactly. ``outcomes`` exposes (low, p, aux) and
``magnitude`` the value of a code, so tests can enumerate both outcomes of every coordinate and check the
expectation exactly; ``encode`` draws one uniform per coordinate from the worker's own generator (never the
global RNG, never another worker's) and takes the upper code iff u < p.

- ``qsgd`` (Alistarh et al. 2017): aux = ||x||_2, code l in 0..s of s|x_j|/||x||, value ||x|| sign(x_j) l / s.
  Sent: the levels -s..s as s + level in packed 2-bit (s = 1) or 4-bit (s <= 7) fields, else in the
  smallest signed int dtype, + the norm. omega = min(d/s^2, sqrt(d)/s).
- ``terngrad`` (Wen et al. 2017, without the optional gradient clipping): aux = max|x|, code b_j in {0, 1}
  with p = |x_j|/max|x|, value max|x| sign(x_j) b_j. Sent: 2-bit codes packed + the scale.
  omega = (sqrt(d) - 1)/2 (``theory.operators.terngrad_omega``).
- ``natural`` (Horvath et al. 2019): code = biased exponent (value 2^(code-127), 0 codes zero), |x_j| in
  [2^a, 2^(a+1)) rounds up with p = |x_j|/2^a - 1. Sent: 8-bit exponents + packed sign bits. omega = 1/8.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from theory import bits as tbits, operators
from .base import TheoryClaim, numel
from .encoding import (GatherKernel, compute_dtype, generators_on, pack_bits, packed_numel, private_generators,
    unpack_bits)
from .serialization import register_record
from .signs import decode_signs, encode_signs



@register_record
class PrivateRngState(NamedTuple):
    seed: int  # worker w's generator at step t is seeded with a hash of (seed, w, t): ``private_seed``
    step: int


class PrivateWork(NamedTuple):
    generators: list  # this step's generator of each local worker row
    next_state: PrivateRngState


def level_dtype(levels: int) -> torch.dtype:
    """The smallest signed integer dtype holding -levels..levels (``theory.bits.level_int_bits``)."""
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        if levels <= torch.iinfo(dtype).max:
            return dtype
    raise ValueError(f"qsgd: levels={levels!r} is invalid; allowed: at most {torch.iinfo(torch.int64).max}")


class StochasticQuantizer(GatherKernel):
    """Private per-worker generators, seeded per (seed, global worker, step); ``sample`` rounds up iff u < p."""

    def __init__(self, seed: int | None = None):
        self.seed = seed

    def init(self, shapes, workers, seed=0, dtype=torch.float32, device="cpu"):
        return PrivateRngState(seed if self.seed is None else self.seed, 0)

    def begin(self, state, comm, rows):
        return PrivateWork(private_generators(state.seed, state.step, comm, rows),
                           PrivateRngState(state.seed, state.step + 1))

    def finish(self, work):
        return work.next_state

    @staticmethod
    def sample(low: torch.Tensor, p: torch.Tensor, generators) -> torch.Tensor:
        """(W, d) codes low + [u < p], u ~ U[0, 1) in float64 from worker i's generator for row i, drawn on the
        gradient's device (``generators_on``: seeded per (seed, worker, step) there too, so a CUDA run draws the
        same distribution without copying W x d numbers from the host each step)."""
        generators = generators_on(generators, p.device)
        u = torch.stack([torch.rand(low.shape[1:], generator=g, dtype=torch.float64, device=p.device)
                         for g in generators])
        return low + (u < p.double()).to(low.dtype)

    def outcomes(self, flat: torch.Tensor):
        """(W, d) -> (low codes (W, d) int64, p (W, d) of taking low + 1, aux (W, 1) or None)."""
        raise NotImplementedError

    def magnitude(self, code: torch.Tensor, aux) -> torch.Tensor:
        """|value| of integer codes (R, d) given aux (R, 1)."""
        raise NotImplementedError

    def expectation(self, flat: torch.Tensor) -> torch.Tensor:
        """E C(x) computed from the two outcomes of every coordinate and their probabilities (test oracle)."""
        real = flat.to(torch.float64)
        low, p, aux = self.outcomes(real)
        return real.sign() * ((1 - p) * self.magnitude(low, aux) + p * self.magnitude(low + 1, aux))


class QSGD(StochasticQuantizer):
    name = "qsgd"

    def __init__(self, levels: int, seed: int | None = None):
        super().__init__(seed)
        self.levels = levels
        self.code_dtype = level_dtype(levels)
        # s <= 7: the 2s+1 levels fit in a 2- or 4-bit field, packed into bytes (``theory.bits.qsgd_code_bits``)
        self.packed_bits = tbits.qsgd_code_bits(levels) if levels <= 7 else None

    def payload(self, shape, dtype):
        if self.packed_bits is not None:
            return [(packed_numel(numel(shape), self.packed_bits), torch.uint8), (1, dtype)]
        return [(numel(shape), self.code_dtype), (1, dtype)]

    def outcomes(self, flat):
        norm = flat.norm(dim=1, keepdim=True)  # (W, 1)
        scaled = self.levels * flat.abs() / norm.clamp_min(torch.finfo(flat.dtype).tiny)  # (W, d) in [0, s]
        low = scaled.floor().clamp(0, self.levels)
        return low.long(), (scaled - low).clamp(0, 1), norm

    def magnitude(self, code, aux):
        return aux * code.to(aux.dtype) / self.levels

    def encode(self, x, work, name):
        flat = x.reshape(x.shape[0], -1)
        real = flat.to(compute_dtype(flat.dtype))
        low, p, norm = self.outcomes(real)
        code = self.sample(low, p, work.generators).clamp_max(self.levels)  # (W, d)
        signed = code * real.sign().long()  # (W, d) in -s..s
        if self.packed_bits is not None:
            return [pack_bits(signed + self.levels, self.packed_bits), norm.to(flat.dtype)], work
        return [signed.to(self.code_dtype), norm.to(flat.dtype)], work

    def decode(self, parts, shape, dtype):
        signed, norm = parts
        if self.packed_bits is not None:
            signed = unpack_bits(signed, numel(shape), self.packed_bits) - self.levels  # (R, d) in -s..s
        real = compute_dtype(dtype)
        values = norm.to(real) * signed.to(real) / self.levels  # (R, d)
        return values.to(dtype).reshape(signed.shape[0], *shape)

    def theory(self, shapes):
        omega = operators.combine_omega(operators.qsgd_omega(numel(tuple(s)), self.levels) for s in shapes.values())
        return TheoryClaim(kind="unbiased", omega=omega, deterministic=False)

    def __repr__(self):
        return f"QSGD(levels={self.levels})"


class TernGrad(StochasticQuantizer):
    name = "terngrad"

    def payload(self, shape, dtype):
        return [(packed_numel(numel(shape), 2), torch.uint8), (1, dtype)]

    def outcomes(self, flat):
        scale = flat.abs().amax(dim=1, keepdim=True)  # (W, 1)
        p = flat.abs() / scale.clamp_min(torch.finfo(flat.dtype).tiny)
        return torch.zeros(flat.shape, dtype=torch.long, device=flat.device), p.clamp(0, 1), scale

    def magnitude(self, code, aux):
        return aux * code.to(aux.dtype)

    def encode(self, x, work, name):
        flat = x.reshape(x.shape[0], -1)
        real = flat.to(compute_dtype(flat.dtype))
        low, p, scale = self.outcomes(real)
        ternary = self.sample(low, p, work.generators) * real.sign().long()  # (W, d) in {-1, 0, 1}
        return [pack_bits(ternary + 1, 2), scale.to(flat.dtype)], work

    def decode(self, parts, shape, dtype):
        packed, scale = parts
        real = compute_dtype(dtype)
        ternary = unpack_bits(packed, numel(shape), 2) - 1  # (R, d)
        return (scale.to(real) * ternary.to(real)).to(dtype).reshape(packed.shape[0], *shape)

    def theory(self, shapes):
        omega = operators.combine_omega(operators.terngrad_omega(numel(tuple(s))) for s in shapes.values())
        return TheoryClaim(kind="unbiased", omega=omega, deterministic=False)

    def __repr__(self):
        return "TernGrad()"


EXPONENT_BIAS = 127  # code c > 0 means 2^(c - 127), as float32's biased exponent; 0 means zero


class Natural(StochasticQuantizer):
    name = "natural"

    def payload(self, shape, dtype):
        return [(numel(shape), torch.uint8), (packed_numel(numel(shape), 1), torch.uint8)]

    def outcomes(self, flat):
        a = flat.abs()
        mantissa, exponent = torch.frexp(a)  # a = mantissa 2^exponent, mantissa in [0.5, 1)
        low = (exponent.long() - 1 + EXPONENT_BIAS)  # the code of 2^floor(log2 a)
        p = 2 * mantissa - 1  # (a - 2^e) / 2^e
        # Below 2^-126 the neighbours are 0 (code 0) and 2^-126 (code 1): p = a / 2^-126.
        tiny = low < 1
        p = torch.where(tiny, a / 2.0 ** (1 - EXPONENT_BIAS), p)
        low = torch.where(tiny | (a == 0), torch.zeros_like(low), low)
        return low, torch.where(a == 0, torch.zeros_like(p), p), None

    def magnitude(self, code, aux):
        value = torch.exp2(code.double() - EXPONENT_BIAS)
        return torch.where(code == 0, torch.zeros_like(value), value)

    def encode(self, x, work, name):
        flat = x.reshape(x.shape[0], -1)
        low, p, _ = self.outcomes(flat.to(compute_dtype(flat.dtype)))
        code = self.sample(low, p, work.generators).clamp(0, 255).to(torch.uint8)  # (W, d)
        return [code, encode_signs(flat)], work

    def decode(self, parts, shape, dtype):
        code, signs = parts
        d = numel(shape)
        values = self.magnitude(code.long(), None) * decode_signs(signs, d, torch.float64)  # (R, d)
        return values.to(dtype).reshape(code.shape[0], *shape)

    def theory(self, shapes):
        # The 8-bit exponent code spans float32's normal range only: below 2^-126 the neighbours are 0 and
        # 2^-126 (variance ~ |x| 2^-126 >> x^2), above 2^127 the code saturates.
        return TheoryClaim(kind="unbiased", omega=operators.natural_omega(), deterministic=False,
                           magnitudes=(2.0 ** -126, 2.0 ** 127),
                           premise="every nonzero |x_j| in float32's normal range")

    def __repr__(self):
        return "Natural()"
