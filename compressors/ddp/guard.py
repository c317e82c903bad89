"""Non-finite gradients and compressor failures in a DDP hook, agreed on by every rank.

Policy (per bucket, on every rank):

1. Detect locally: this rank's bucket holds NaN/Inf. Its aggregation then runs on zeros of the same shapes:
   every registered compressor's collectives depend only on the shapes and the (old) state, never on the
   values, so this rank issues exactly the collectives the other ranks issue.
2. A compressor raising (e.g. ATOMO's ``torch.linalg.LinAlgError``) after it issued n collectives is replayed
   on zeros with its first n collectives skipped (``ReplayCollective``): the rank issues the remaining ones,
   in order, so its peers never wait for a collective that does not come.
3. Agree after: one float64 all-reduce of a "bad" flag (bad input, a failure, or a non-finite result). It is
   control traffic, not part of the algorithm: sent untracked (``average_metric``), like the simulator's
   metrics, so the ledger holds what the compressor sent (including the bad bucket's messages, which did go
   out). If any rank is bad, every rank returns a NaN bucket and keeps its old compressor state.

A failure of the network itself (``CollectiveError``: a peer died or hung) is not replayed: it propagates.
"""
from __future__ import annotations

from typing import Any

import torch

from ..base import Aggregator
from ..comm import CollectiveError


class ReplayCollective:
    """Passes collectives to ``inner``, counting them; the first ``skip`` ones are not sent again (zeros of the
    result's shape come back instead: the replay's values are thrown away). Everything else is ``inner``'s."""

    def __init__(self, inner, skip: int = 0):
        self.inner = inner
        self.skip = skip
        self.issued = 0

    def __getattr__(self, name: str) -> Any:  # workers, ledger, local_workers, ...
        return getattr(self.inner, name)

    def _skipped(self) -> bool:
        self.issued += 1
        return self.issued <= self.skip

    def all_reduce_mean(self, x: torch.Tensor, tag: str = "") -> torch.Tensor:
        if self._skipped():
            return x.new_zeros(x.shape[1:])  # (*s)
        return self.inner.all_reduce_mean(x, tag)

    def all_gather(self, x: torch.Tensor, tag: str = "") -> torch.Tensor:
        if self._skipped():
            return x.new_zeros((self.inner.workers, *x.shape[1:]))  # (W, *s)
        return self.inner.all_gather(x, tag)


class Guarded:
    """What one guarded aggregation gave: the update (None if this rank failed) and the new state."""

    def __init__(self, update: dict[str, torch.Tensor] | None, state: Any, failure: str | None):
        self.update = update
        self.state = state
        self.failure = failure


def guarded_aggregate(aggregator: Aggregator, grads: dict[str, torch.Tensor], state: Any, comm,
                      zeros: bool) -> Guarded:
    """``aggregator.aggregate`` that issues the same collectives on every rank whatever happens here.

    zeros: this rank's input is non-finite (or an earlier part failed): aggregate zeros of the same shapes.
    A compressor exception is replayed on zeros, skipping the collectives already issued; the update is then
    None and ``failure`` names the exception. Network failures (``CollectiveError``) propagate.
    """
    if zeros:
        grads = {n: torch.zeros_like(g) for n, g in grads.items()}
    counting = ReplayCollective(comm)
    try:
        update, new_state = aggregator.aggregate(grads, state, counting)
        return Guarded(update, new_state, None)
    except CollectiveError:
        raise
    except Exception as error:  # e.g. torch.linalg.LinAlgError: its peers may be inside a collective by now
        failure = f"{type(error).__name__}: {error}"
    replay = ReplayCollective(comm, skip=counting.issued)
    aggregator.aggregate({n: torch.zeros_like(g) for n, g in grads.items()}, state, replay)
    return Guarded(None, state, failure)


def all_finite(tensors) -> bool:
    """No NaN or Inf in any tensor. Fast path: one sum per tensor (no temporary of the tensor's size; a
    NaN or Inf element makes it non-finite), accumulated in float32 at least (a float16 sum overflows on
    ordinary gradients). Only a non-finite sum, which a finite tensor gives only by overflowing, is
    confirmed element by element."""
    for t in tensors:
        wide = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
        if not bool(torch.isfinite(t.sum(dtype=wide))) and not bool(torch.isfinite(t).all()):
            return False
    return True


def agree_bad(comm, bad: bool) -> bool:
    """True on every rank if any rank is bad: one untracked float64 all-reduce (control traffic)."""
    return comm.average_metric(1.0 if bad else 0.0) > 0.0
