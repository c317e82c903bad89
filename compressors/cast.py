"""fp16 / bf16: every tensor cast to 16 bits and all-reduced in that dtype (one packed collective).

C(x) = fl16(x), round to nearest. Deterministically contractive with delta = 1 - u^2 (u = 2^-11 for fp16,
2^-8 for bf16; ``theory.operators.cast_delta``) while every coordinate is in the dtype's normal range.
The all-reduce sums in 16 bits, as NCCL does for half-precision buffers, so the update carries that
rounding too; the mean of the workers' C(x_i) equals the update only up to it.
"""
from __future__ import annotations

import torch

from theory import operators
from .base import Aggregator, Reduced, TheoryClaim, check_grads, numel
from .packing import pack, unpack


CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Cast(Aggregator):
    all_reducible = True

    def __init__(self, name: str):
        self.name = name
        self.dtype = CAST_DTYPES[name]

    def init(self, shapes, workers, seed=0, dtype=torch.float32, device="cpu"):
        return ()

    def reduce(self, grads, state, comm, want_local=False):
        check_grads(self.name, grads)
        cast = {n: g.to(self.dtype) for n, g in grads.items()}  # (W, *shape) in 16 bits
        update: dict[str, torch.Tensor] = {}
        for buffer, layout in pack(cast):
            update.update(unpack(comm.all_reduce_mean(buffer, tag=self.name), layout))
        update = {n: update[n].to(g.dtype) for n, g in grads.items()}
        local = {n: cast[n].to(g.dtype) for n, g in grads.items()} if want_local else None
        return Reduced(update, local), state

    def bits_per_step(self, shapes, dtype=torch.float32):
        return sum(numel(tuple(s)) for s in shapes.values()) * torch.finfo(self.dtype).bits

    def theory(self, shapes):
        # Only inside the 16-bit dtype's normal range: below it a coordinate loses relative accuracy (fp16
        # flushes |x| < 3e-8 to 0: delta(x) = 0), above it the cast gives inf.
        info = torch.finfo(self.dtype)
        return TheoryClaim(kind="contractive", delta=operators.cast_delta(self.dtype), deterministic=True,
                           magnitudes=(info.tiny, info.max),
                           premise=f"every nonzero |x_j| in {self.name}'s normal range")

    def __repr__(self):
        return f"Cast({self.name!r})"
