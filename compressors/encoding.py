"""Shared machinery of the zoo: bit packing, seeded generators in the state, and the all-gather kernel base.

An all-gather compressor encodes each worker's tensor into a few flat payload parts (values, indices, packed
bits, levels, factors), gathers all parts of all tensors in one collective per dtype, and decodes every
worker's rows. The ledger then counts exactly the tensors sent, and ``bits_per_step`` sums the same
``payload`` specification the encoder follows.
"""
from __future__ import annotations

import math
from abc import abstractmethod

import torch

from .base import Aggregator, Reduced, check_grads
from .packing import pack, unpack

# -- bit packing ---------------------------------------------------------------------------------------------


def pack_bits(codes: torch.Tensor, bits_each: int) -> torch.Tensor:
    """(R, d) integer codes in [0, 2^b) -> (R, ceil(d b / 8)) uint8, b in {1, 2, 4, 8}, little-endian in a byte."""
    if bits_each not in (1, 2, 4, 8):
        raise ValueError(f"pack_bits: bits_each={bits_each!r} is invalid; allowed: 1, 2, 4, 8")
    rows, d = codes.shape
    per_byte = 8 // bits_each
    padded = torch.zeros((rows, math.ceil(d / per_byte) * per_byte), dtype=torch.int32, device=codes.device)
    padded[:, :d] = codes.to(torch.int32)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits_each  # (per_byte,)
    return (padded.view(rows, -1, per_byte) << shifts).sum(-1).to(torch.uint8)  # (R, bytes)


def unpack_bits(packed: torch.Tensor, d: int, bits_each: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: (R, bytes) uint8 -> (R, d) int64 codes."""
    per_byte = 8 // bits_each
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int64) * bits_each
    codes = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & (2 ** bits_each - 1)  # (R, bytes, per_byte)
    return codes.reshape(packed.shape[0], -1)[:, :d]


def packed_numel(d: int, bits_each: int) -> int:
    return math.ceil(d * bits_each / 8)


# -- generators kept in the state ----------------------------------------------------------------------------


def generator_from(state: torch.Tensor) -> torch.Generator:
    generator = torch.Generator()
    generator.set_state(state.clone())  # a row of a stacked state is a view: set_state needs its own storage
    return generator


def shared_generator_state(seed: int) -> torch.Tensor:
    """One CPU generator every worker holds identically (shared randomness: random-k indices, sketches)."""
    return torch.Generator().manual_seed(seed).get_state()


MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele, Lea, Flood 2014): a bijective 64-bit mixer for deriving seeds."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def private_seed(seed: int, worker: int, step: int) -> int:
    """The seed of worker ``worker``'s private generator at ``step``: a hash of (seed, worker, step), so private
    randomness depends only on the global worker index, never on how workers are laid out on processes."""
    return splitmix64(splitmix64(splitmix64(seed) ^ worker) ^ step) >> 1  # manual_seed takes < 2^63


def private_generators(seed: int, step: int, comm, rows: int) -> list[torch.Generator]:
    """One generator per local row, for the global workers ``comm.local_workers`` (0..rows-1 when virtual)."""
    workers = getattr(comm, "local_workers", None)
    workers = list(workers) if workers is not None and len(workers) == rows else list(range(rows))
    return [torch.Generator().manual_seed(private_seed(seed, w, step)) for w in workers]


def device_generator(device: torch.device, seed: int) -> torch.Generator | None:
    """A generator on ``device`` seeded with ``seed``, for draws the size of a gradient made where the gradient
    lives (CUDA's Philox: the same distribution as the CPU's Mersenne Twister, other numbers). None on ``meta``
    (no values to draw: torch draws there without a generator)."""
    if device.type == "meta":
        return None
    return torch.Generator(device=device).manual_seed(seed)


def generators_on(generators: list[torch.Generator], device: torch.device) -> list[torch.Generator | None]:
    """This step's private generators moved to ``device``, in place (the list is the step's work, shared by
    its tensors, so each generator moves once per step and then advances on the device). A CPU run keeps its
    CPU generators: its draws are those of earlier versions, bitwise."""
    if device.type == "cpu":
        return generators
    for i, g in enumerate(generators):
        if g is None or g.device != device:
            generators[i] = device_generator(device, g.initial_seed()) if g is not None else None
    return generators


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision gradients are compressed in float32 (norms, SVD and sorting are unsafe in fp16)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# -- the all-gather kernel -----------------------------------------------------------------------------------


class GatherKernel(Aggregator):
    """Encode per tensor -> one all-gather per payload dtype -> decode every worker's rows -> combine.

    Subclasses define ``payload`` (the parts' sizes and dtypes, which ``bits_per_step`` sums), ``encode``
    and ``decode``; ``combine`` is the mean of the decoded rows (signSGD overrides it with a majority vote).
    """

    all_reducible = False

    @abstractmethod
    def payload(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[tuple[int, torch.dtype]]:
        """[(numel, dtype)] of the parts one worker sends for one tensor of this shape and value dtype."""

    @abstractmethod
    def encode(self, x: torch.Tensor, state, name: str) -> tuple[list[torch.Tensor], object]:
        """(W, *shape) -> parts [(W, numel_c)] following ``payload``, and the state after any sampling."""

    @abstractmethod
    def decode(self, parts: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Parts [(R, numel_c)] -> (R, *shape) decompressed rows C_i(x_i) in ``dtype``."""

    def combine(self, decoded: torch.Tensor) -> torch.Tensor:
        """(W, *shape) every worker's decoded rows -> the update; the mean (in float32 at least)."""
        return decoded.to(compute_dtype(decoded.dtype)).mean(dim=0).to(decoded.dtype)

    def init(self, shapes, workers, seed=0, dtype=torch.float32, device="cpu"):
        return ()

    def begin(self, state, comm, rows: int):
        """Hook: state -> working state for one step (e.g. generators); ``finish`` turns it back."""
        return state

    def finish(self, state):
        return state

    def reduce(self, grads, state, comm, want_local=False):
        workers = check_grads(self.name, grads)
        work = self.begin(state, comm, workers)
        encoded: dict[str, list[torch.Tensor]] = {}
        for name, g in grads.items():
            encoded[name], work = self.encode(g, work, name)
        flat = {(name, i): part for name, parts in encoded.items() for i, part in enumerate(parts)}
        gathered: dict = {}
        for buffer, layout in pack(flat):
            gathered.update(unpack(comm.all_gather(buffer, tag=self.name), layout))
        update, local = {}, {}
        for name, g in grads.items():
            shape = tuple(g.shape[1:])
            rows = self.decode([gathered[(name, i)] for i in range(len(encoded[name]))], shape, g.dtype)  # (W, *s)
            update[name] = self.combine(rows)
            if want_local:
                # All rows are this process's own when the gather returned as many rows as it sent.
                local[name] = rows if rows.shape[0] == workers else self.decode(encoded[name], shape, g.dtype)
        return Reduced(update, local if want_local else None), self.finish(work)

    def bits_per_step(self, shapes, dtype=torch.float32):
        return sum(n * torch.empty((), dtype=d).element_size() * 8
                   for shape in shapes.values() for n, d in self.payload(tuple(shape), dtype))
