"""The cheap check ``compressors.register`` runs on a user's compressor when it is registered: ``init`` and one
``reduce`` on tiny shapes (the full contract battery is ``compressors.testing.check_compressor``)."""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .comm import VirtualCollective

#: Tiny shapes for the check at registration (a matrix and a vector).
TINY_SHAPES = {"w": (3, 2), "b": (3,)}


def random_grads(seed: int, shapes, workers: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """{name: (workers, *shape)} standard normal, drawn in float64 from a seeded generator, then cast."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn((workers, *s), generator=gen, dtype=torch.float64).to(dtype) for n, s in shapes.items()}


def one_step_check(agg, owner: str = "compressor", shapes=TINY_SHAPES, workers: int = 2) -> None:
    """What registration checks on a user's compressor (ValueError naming the method): ``init`` then one
    ``reduce`` (with and without ``want_local``) on tiny shapes keep names, shapes and dtype, stay finite, and
    ``bits_per_step(shapes, dtype=...)`` is a finite number >= 0, and something went through ``comm``."""
    grads = random_grads(0, shapes, workers)
    try:
        state = agg.init(shapes, workers=workers, seed=0, dtype=torch.float32, device="cpu")
    except Exception as error:
        raise ValueError(f"{owner}: init(shapes, workers=2, seed=0, dtype=torch.float32, device='cpu') failed on "
                         f"shapes {shapes}: {type(error).__name__}: {error}") from error
    for want_local in (False, True):
        comm = VirtualCollective(workers)
        try:
            reduced, _ = agg.reduce(grads, state, comm, want_local=want_local)
        except Exception as error:
            raise ValueError(f"{owner}: reduce(grads, state, comm, want_local={want_local}) failed on shapes "
                             f"{shapes}: {type(error).__name__}: {error}") from error
        update = getattr(reduced, "update", None)
        if not isinstance(update, Mapping) or list(update) != list(shapes):
            raise ValueError(f"{owner}: reduce must return (compressors.Reduced(update, local), state) with update "
                             f"{{name: (*shape)}} for {list(shapes)}; got {type(reduced).__name__}")
        for n, s in shapes.items():
            u = update[n]
            if tuple(u.shape) != tuple(s) or u.dtype != torch.float32 or not bool(torch.isfinite(u).all()):
                raise ValueError(f"{owner}: reduce's update[{n!r}] must be finite, shape {tuple(s)}, float32; got "
                                 f"shape {tuple(u.shape)}, {u.dtype}")
        if want_local and getattr(reduced, "local", None) is None:
            raise ValueError(f"{owner}: reduce(..., want_local=True) must return each worker's message in "
                             "Reduced.local ({name: (k, *shape)}); error feedback needs it")
    try:
        bits = agg.bits_per_step(shapes, dtype=torch.float32)
    except Exception as error:
        raise ValueError(f"{owner}: bits_per_step(shapes, dtype=torch.float32) failed: "
                         f"{type(error).__name__}: {error}") from error
    if not (isinstance(bits, (int, float)) and not isinstance(bits, bool) and math.isfinite(bits) and bits >= 0):
        raise ValueError(f"{owner}: bits_per_step returned {bits!r}; expected a finite number of bits >= 0")
    if not comm.ledger.records:
        raise ValueError(f"{owner}: reduce sent nothing through comm (every collective must go through "
                         "comm.all_reduce_mean / comm.all_gather, which record what is sent)")
