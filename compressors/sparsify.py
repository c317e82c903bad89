"""Sparsifiers: top-k (all-gather of values + indices), random-k and random-block (all-reduce, shared seed).

How many coordinates: ``k`` if given, else max(1, round(ratio d)) per tensor (``theory.bits.sparsity_k``).

- top-k (Stich, Cordonnier, Jaggi 2018; Lin et al. 2018): each worker keeps its own k largest magnitudes and
  sends k values + k int32 indices; the update is the mean of the workers' sparse vectors. Deterministically
  contractive, delta = k/d.
- random-k: a uniform k-subset drawn from the generator all workers share, so only the k values are sent and
  they can be all-reduced. ``scaled=True`` multiplies by d/k: unbiased, omega = d/k - 1; unscaled it is
  contractive in expectation, delta = k/d.
- random-block: the same with a cyclic block of k consecutive coordinates at a uniform start (cheaper
  memory access; each coordinate is still kept with probability k/d).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from theory import bits as tbits, operators
from .base import Aggregator, Reduced, TheoryClaim, check_grads, dtype_bits, numel
from .encoding import GatherKernel, device_generator, generator_from, shared_generator_state
from .packing import pack, unpack
from .serialization import register_record



class Sparsity:
    """The k rule shared by the sparsifiers (k given, or a ratio of each tensor's size)."""

    def __init__(self, owner: str, ratio: float | None, k: int | None):
        self.owner, self.ratio, self.k = owner, ratio, k

    def k_of(self, shape) -> int:
        return tbits.sparsity_k(numel(tuple(shape)), self.ratio, self.k, owner=self.owner)

    def describe(self) -> str:
        return f"k={self.k}" if self.k is not None else f"ratio={self.ratio}"


class TopK(GatherKernel):
    name = "topk"

    def __init__(self, ratio: float | None, k: int | None):
        self.sparsity = Sparsity("topk", ratio, k)

    def init(self, shapes, workers, seed=0, dtype=torch.float32, device="cpu"):
        for shape in shapes.values():
            self.sparsity.k_of(shape)  # k > numel fails here, naming k
        return ()

    def payload(self, shape, dtype):
        k = self.sparsity.k_of(shape)
        return [(k, dtype), (k, torch.int32)]

    def encode(self, x, state, name):
        workers = x.shape[0]
        flat = x.reshape(workers, -1)  # (W, d)
        k = self.sparsity.k_of(x.shape[1:])
        indices = flat.abs().to(torch.float32 if flat.dtype in (torch.float16, torch.bfloat16) else flat.dtype
                                ).topk(k, dim=1, sorted=False).indices  # (W, k)
        return [flat.gather(1, indices), indices.to(torch.int32)], state

    def decode(self, parts, shape, dtype):
        values, indices = parts  # (R, k), (R, k)
        out = torch.zeros((values.shape[0], numel(shape)), dtype=dtype, device=values.device)
        return out.scatter_(1, indices.long(), values.to(dtype)).reshape(values.shape[0], *shape)

    def theory(self, shapes):
        delta = operators.combine_delta(operators.topk_delta(numel(tuple(s)), self.sparsity.k_of(s))
                                        for s in shapes.values())
        return TheoryClaim(kind="exact" if delta == 1 else "contractive", omega=0.0 if delta == 1 else None,
                           delta=delta, deterministic=True)

    def __repr__(self):
        return f"TopK({self.sparsity.describe()})"


@register_record
class SharedRngState(NamedTuple):
    rng: torch.Tensor  # state of the generator every worker holds identically (uint8)


class RandomSparsifier(Aggregator):
    """Shared-seed coordinates, so the k selected values of all workers can be all-reduced."""

    all_reducible = True
    block = False

    def __init__(self, ratio: float | None, k: int | None, scaled: bool, seed: int | None = None):
        self.sparsity = Sparsity(self.name, ratio, k)
        self.scaled = scaled
        self.seed = seed

    def init(self, shapes, workers, seed=0, dtype=torch.float32, device="cpu"):
        for shape in shapes.values():
            self.sparsity.k_of(shape)  # k > numel fails here, naming k
        return SharedRngState(shared_generator_state(seed if self.seed is None else self.seed))

    def indices(self, d: int, k: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        """(k,) coordinates on ``device``: a uniform k-subset, or a cyclic block at a uniform start.

        On the CPU drawn from the shared generator itself. Elsewhere the shared generator draws one seed per
        tensor and step, and a generator on the device seeded with it draws the coordinates there (no d-sized
        host work or copy each step): every worker draws the same, and the distribution is the CPU's."""
        device = torch.device(device)
        if device.type != "cpu":
            local = device_generator(device, int(torch.randint(0, 2 ** 62, (1,), generator=generator)))
            if self.block:
                start = torch.randint(0, d, (1,), generator=local, device=device)
                return (start + torch.arange(k, device=device)) % d
            return torch.randperm(d, generator=local, device=device)[:k]
        if self.block:
            start = torch.randint(0, d, (1,), generator=generator)
            return (start + torch.arange(k)) % d
        return torch.randperm(d, generator=generator)[:k]

    def reduce(self, grads, state, comm, want_local=False):
        workers = check_grads(self.name, grads)
        generator = generator_from(state.rng)
        chosen, values = {}, {}
        for name, g in grads.items():
            d = numel(tuple(g.shape[1:]))
            chosen[name] = self.indices(d, self.sparsity.k_of(g.shape[1:]), generator, g.device)  # (k,)
            values[name] = g.reshape(workers, d)[:, chosen[name]]  # (W, k)
        means: dict[str, torch.Tensor] = {}
        for buffer, layout in pack(values):
            means.update(unpack(comm.all_reduce_mean(buffer, tag=self.name), layout))
        update, local = {}, {}
        for name, g in grads.items():
            d, k = numel(tuple(g.shape[1:])), chosen[name].numel()
            scale = d / k if self.scaled else 1.0
            update[name] = (torch.zeros(d, dtype=g.dtype, device=g.device)
                            .index_copy_(0, chosen[name], means[name] * scale).reshape(g.shape[1:]))
            if want_local:
                local[name] = (torch.zeros((workers, d), dtype=g.dtype, device=g.device)
                               .index_copy_(1, chosen[name], values[name] * scale).reshape(g.shape))
        return Reduced(update, local if want_local else None), SharedRngState(generator.get_state())

    def bits_per_step(self, shapes, dtype=torch.float32):
        return sum(self.sparsity.k_of(s) for s in shapes.values()) * dtype_bits(dtype)

    def theory(self, shapes):
        sizes = [(numel(tuple(s)), self.sparsity.k_of(s)) for s in shapes.values()]
        if all(k == d for d, k in sizes):
            return TheoryClaim(kind="exact", omega=0.0, delta=1.0)
        if self.scaled:
            omega = operators.combine_omega(operators.randomk_omega(d, k) for d, k in sizes)
            return TheoryClaim(kind="unbiased", omega=omega, deterministic=False)
        delta = operators.combine_delta(operators.randomk_delta(d, k) for d, k in sizes)
        return TheoryClaim(kind="contractive", delta=delta, deterministic=False)

    def __repr__(self):
        return f"{type(self).__name__}({self.sparsity.describe()}, scaled={self.scaled})"


class RandomK(RandomSparsifier):
    name = "randomk"


class RandomBlock(RandomSparsifier):
    name = "random_block"
    block = True
