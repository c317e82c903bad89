"""Non-finite gradients and failures in a DDP hook, agreed on by every rank without a collective of its own.

Policy (per bucket, on every rank):

1. Every collective the compressor issues for the bucket carries one extra element: this rank's "bad so far"
   flag (its bucket holds NaN/Inf, or something failed here). ``FlagCollective`` appends it and keeps the sum
   over ranks; the flags are read once, at the end of the bucket (one host sync). The ledger records what the
   compressor sent, without the flag.
2. A compressor raising (e.g. ATOMO's ``torch.linalg.LinAlgError``) after it issued n collectives is replayed
   on zeros with its first n collectives skipped (``ReplayCollective``): the rank issues the remaining ones, in
   order (now flagged bad), so its peers never wait for a collective that does not come. Every registered
   compressor's collectives depend only on the shapes and the (old) state, never on the values, so a rank
   with non-finite gradients issues exactly what its peers issue and needs no substitution.
3. A failure after the bucket's last collective (the result's assembly, its size check) is flagged on the
   next bucket's collectives (this rank returns NaN at once); on the step's last bucket no collective follows
   and the hook raises it. The result's finiteness needs no agreement: a compressor's result is the same on
   every rank (it is what every rank applies).

If any rank is bad, every rank returns a NaN bucket and keeps its old compressor state. A failure of the
network itself (``CollectiveError``: a peer died or hung) is not replayed: it propagates.
"""
from __future__ import annotations

from typing import Any

import torch

from ..base import Aggregator
from ..comm import CollectiveError, payload_record


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


class FlagCollective:
    """A ``DistributedCollective`` whose every collective carries this rank's "bad" flag as one extra element.

    ``nonfinite``: a 0-d bool tensor (this rank's bucket holds NaN/Inf), read by no one on this rank: it
    travels as it is, so no host sync is needed before the collectives. ``fail(why)`` sets the flag for every
    later collective. ``read(extra)`` is the one host sync: whether any rank flagged any collective, and
    ``extra`` (a 0-d bool tensor of this rank's own) in the same transfer. The results equal the inner
    collective's bitwise (the flag is one more element of an elementwise sum or a gather).
    """

    def __init__(self, comm, nonfinite: torch.Tensor | None = None, failure: str | None = None):
        self.comm = comm
        self.nonfinite = nonfinite
        self.failure = failure  # why this rank is bad (a failure here, or one carried from an earlier bucket)
        self.issued = 0
        self.sent_failure = False  # a collective carried `failure` to the peers
        self.agreed: torch.Tensor | None = None  # 0-d bool: some rank flagged some collective

    def __getattr__(self, name: str) -> Any:  # workers, ledger, rank, local_workers, ...
        return getattr(self.comm, name)

    def fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
            self.sent_failure = False

    def _flag(self, x: torch.Tensor) -> torch.Tensor:
        """(k, 1): the flag in x's dtype and device, on every row."""
        flag = torch.zeros((), dtype=torch.bool, device=x.device)
        if self.failure is not None:
            flag = torch.ones((), dtype=torch.bool, device=x.device)
        elif self.nonfinite is not None:
            flag = self.nonfinite.to(x.device)
        return flag.to(x.dtype).expand(x.shape[0], 1)  # (k, 1)

    def _agree(self, flags: torch.Tensor) -> None:
        seen = (flags != 0).any()
        self.agreed = seen if self.agreed is None else self.agreed | seen
        self.issued += 1
        self.sent_failure = self.failure is not None

    def all_reduce_mean(self, x: torch.Tensor, tag: str = "") -> torch.Tensor:
        k = x.shape[0]
        self.comm.ledger.add(payload_record("all_reduce", x, self.comm.workers, tag))
        flat = torch.cat([x.reshape(k, -1), self._flag(x)], dim=1)  # (k, n + 1)
        mean = self.comm.average_untracked(flat)  # (n + 1,): the same SUM then / W as all_reduce_mean
        self._agree(mean[-1:])
        return mean[:-1].reshape(x.shape[1:])  # (*s)

    def all_gather(self, x: torch.Tensor, tag: str = "") -> torch.Tensor:
        k = x.shape[0]
        self.comm.ledger.add(payload_record("all_gather", x, self.comm.workers, tag))
        flat = torch.cat([x.reshape(k, -1), self._flag(x)], dim=1)  # (k, n + 1)
        rows = self.comm.gather_untracked(flat)  # (W, n + 1)
        self._agree(rows[:, -1])
        return rows[:, :-1].reshape(rows.shape[0], *x.shape[1:])  # (W, *s)

    def read(self, extra: torch.Tensor | None = None) -> tuple[bool, bool, bool]:
        """(any rank flagged a collective of this bucket, ``extra``, this rank's input was non-finite): one
        transfer to the host."""
        device = extra.device if extra is not None else torch.device("cpu")
        no = torch.zeros((), dtype=torch.bool, device=device)
        values = [self.agreed, extra, self.nonfinite]
        both = torch.stack([no if v is None else v.to(device) for v in values]).tolist()
        return bool(both[0]), bool(both[1]), bool(both[2])

    @property
    def unsent(self) -> str | None:
        """This rank's failure if no collective carried it to the peers yet (it must ride on a later one)."""
        return None if self.failure is None or self.sent_failure else self.failure


class Guarded:
    """What one guarded aggregation gave: the update (None if this rank failed) and the new state."""

    def __init__(self, update: dict[str, torch.Tensor] | None, state: Any, failure: str | None):
        self.update = update
        self.state = state
        self.failure = failure


def guarded_aggregate(aggregator: Aggregator, grads: dict[str, torch.Tensor], state: Any, comm,
                      zeros: bool = False) -> Guarded:
    """``aggregator.aggregate`` that issues the same collectives on every rank whatever happens here.

    zeros: aggregate zeros of the same shapes (this rank cannot use its input; its collectives are flagged).
    A compressor exception is replayed on zeros, skipping the collectives already issued; the update is then
    None and ``failure`` names the exception (``comm.fail`` is told first when ``comm`` is a
    ``FlagCollective``, so the rest of the collectives carry it). Network failures (``CollectiveError``)
    propagate.
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
    if isinstance(comm, FlagCollective):
        comm.fail(failure)
    replay = ReplayCollective(comm, skip=counting.issued)
    aggregator.aggregate({n: torch.zeros_like(g) for n, g in grads.items()}, state, replay)
    return Guarded(None, state, failure)


def nonfinite_flag(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on the tensor's device: it holds a NaN or Inf. No overflow (finite elements whose sum
    overflows are finite).

    On an accelerator: no host sync and no temporary of the tensor's size, its minimum and maximum in one pass
    (``aminmax`` propagates NaN, and an Inf is an extreme). On the CPU, where reading a value costs nothing,
    ``all_finite``'s float32 sum (about 4x faster than ``aminmax`` on this project's CPUs: 0.5 ms against 2.2 ms
    for 3.1 M floats, one thread), confirmed element by element only when the sum is not finite. The hook flags
    every bucket's input and result, so this is two passes of every step."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=tensor.device)
    if tensor.device.type == "cpu":
        return torch.tensor(not all_finite([tensor]))
    low, high = torch.aminmax(tensor)
    return ~(torch.isfinite(low) & torch.isfinite(high))


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
