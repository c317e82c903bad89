"""The exact mean: every tensor all-reduced uncompressed, all of them packed into one collective."""
from __future__ import annotations

import torch

from .base import Aggregator, Reduced, TheoryClaim, dtype_bits, numel
from .packing import pack, unpack


class Identity(Aggregator):
    name = "identity"
    all_reducible = True

    def __init__(self, tag: str = "identity"):
        self.tag = tag

    def init(self, shapes, workers, seed=0, dtype=torch.float32, device="cpu"):
        return ()

    def reduce(self, grads, state, comm, want_local=False):
        update: dict[str, torch.Tensor] = {}
        for buffer, layout in pack(grads):
            update.update(unpack(comm.all_reduce_mean(buffer, tag=self.tag), layout))
        update = {name: update[name] for name in grads}  # keep the caller's order
        return Reduced(update, dict(grads) if want_local else None), state

    def bits_per_step(self, shapes, dtype=torch.float32):
        return sum(numel(s) for s in shapes.values()) * dtype_bits(dtype)

    def theory(self, shapes):
        return TheoryClaim(kind="exact", omega=0.0, delta=1.0)

    def __repr__(self):
        return "Identity()"
