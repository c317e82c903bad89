"""Sign compressors, all all-gather (1-bit signs cannot be summed in 1 bit): sign, scaled_sign, signum.

Signs travel as packed bits, 8 to a byte, bit = 1 for a negative coordinate (a zero coordinate of a nonzero
tensor decodes to +1: one bit has no room for 0).

- ``sign`` (signSGD with majority vote, Bernstein et al. 2018/2019): the update is sign(sum_i sign(x_i)).
  Each worker also sends an 8-bit vote flag per tensor, 0 when its tensor is exactly zero, so a zero
  worker abstains and C(0) = 0. No delta or omega: the scale is arbitrary ("biased").
- ``scaled_sign`` (EF-signSGD, Karimireddy et al. 2019): C(x) = ||x||_1/d sign(x), the scale sent with the
  bits; the update is the mean of the workers' C(x_i). ||C(x) - x||^2 = ||x||^2 - ||x||_1^2/d exactly, so
  deterministically contractive with delta = 1/d.
- ``signum`` (Bernstein et al. 2018, majority vote as signSGD): each worker keeps a momentum
  m_i <- beta m_i + (1 - beta) x_i and votes with sign(m_i). Biased, like ``sign``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from theory import operators
from .base import TheoryClaim, numel
from .encoding import GatherKernel, compute_dtype, pack_bits, packed_numel, unpack_bits
from .serialization import register_record



def encode_signs(flat: torch.Tensor) -> torch.Tensor:
    """(W, d) -> (W, ceil(d/8)) uint8, bit 1 where the coordinate is negative."""
    return pack_bits((flat < 0).to(torch.uint8), 1)


def decode_signs(packed: torch.Tensor, d: int, dtype: torch.dtype) -> torch.Tensor:
    """(R, bytes) uint8 -> (R, d) in {-1, +1}."""
    return (1 - 2 * unpack_bits(packed, d, 1)).to(dtype)


class Sign(GatherKernel):
    name = "sign"

    def payload(self, shape, dtype):
        return [(packed_numel(numel(shape), 1), torch.uint8), (1, torch.uint8)]

    def encode(self, x, state, name):
        flat = x.reshape(x.shape[0], -1)  # (W, d)
        votes = (flat != 0).any(dim=1, keepdim=True).to(torch.uint8)  # (W, 1): 0 = abstain (zero tensor)
        return [encode_signs(flat), votes], state

    def decode(self, parts, shape, dtype):
        packed, votes = parts
        signs = decode_signs(packed, numel(shape), dtype) * votes.to(dtype)  # (R, d)
        return signs.reshape(packed.shape[0], *shape)

    def combine(self, decoded):
        """Majority vote: sign of the sum of the votes (0 on a tie)."""
        return decoded.to(compute_dtype(decoded.dtype)).sum(dim=0).sign().to(decoded.dtype)

    def theory(self, shapes):
        return TheoryClaim(kind="biased", deterministic=True)

    def __repr__(self):
        return "Sign()"


class ScaledSign(GatherKernel):
    name = "scaled_sign"

    def payload(self, shape, dtype):
        return [(packed_numel(numel(shape), 1), torch.uint8), (1, dtype)]

    def encode(self, x, state, name):
        flat = x.reshape(x.shape[0], -1)  # (W, d)
        scale = flat.to(compute_dtype(flat.dtype)).abs().mean(dim=1, keepdim=True)  # (W, 1): ||x||_1 / d
        return [encode_signs(flat), scale.to(flat.dtype)], state

    def decode(self, parts, shape, dtype):
        packed, scale = parts
        signs = decode_signs(packed, numel(shape), dtype) * scale.to(dtype)  # (R, d)
        return signs.reshape(packed.shape[0], *shape)

    def theory(self, shapes):
        delta = operators.combine_delta(operators.scaled_sign_delta(numel(tuple(s))) for s in shapes.values())
        return TheoryClaim(kind="contractive", delta=delta, deterministic=True)

    def __repr__(self):
        return "ScaledSign()"


@register_record
class SignumState(NamedTuple):
    momentum: dict[str, torch.Tensor]  # (W, *shape): each worker's own momentum m_i


class Signum(Sign):
    name = "signum"

    def __init__(self, momentum: float = 0.9):
        self.beta = momentum

    def init(self, shapes, workers, seed=0, dtype=torch.float32, device="cpu"):
        return SignumState({n: torch.zeros((workers, *s), dtype=dtype, device=device) for n, s in shapes.items()})

    def begin(self, state, comm, rows):
        return SignumState(dict(state.momentum))  # a fresh dict: the caller's state is never mutated

    def encode(self, x, state, name):
        m = self.beta * state.momentum[name].to(x.dtype) + (1 - self.beta) * x  # (W, *shape)
        state.momentum[name] = m.to(state.momentum[name].dtype)
        return super().encode(m, state, name)

    def __repr__(self):
        return f"Signum(momentum={self.beta})"
