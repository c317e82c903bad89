"""A collective backed by ``torch.distributed``, behind the same interface as ``VirtualCollective``.

Each process holds k >= 1 *emulated* workers on the leading axis; ``workers = k * world``. Global worker
``rank * k + i`` is row i of process ``rank``, so ``all_gather`` returns rows in global worker order and
4 processes x 16 emulated workers behave as a 64-worker simulation.

    all_reduce_mean(x):  (k, *s) -> (*s) = ( SUM_over_processes( sum_over_rows(x) ) ) / (k * world)

Order of operations, chosen so that W = 2 (k = 1, two processes) is bitwise identical to
``VirtualCollective``, which computes ``x.sum(0) / W``: the local row sum of one row is that row exactly,
a two-process SUM is x0 + x1 in either order (IEEE addition commutes), and the division comes last, once.
For k > 1 or more than two processes the summation order differs from ``x.sum(0)`` (rounding level only).

Every collective waits at most ``timeout`` seconds: a dead or hung peer raises ``CollectiveError`` naming
the operation, never a silent hang. On gloo the wait is a timed ``work.wait`` (a blocking wait, no polling),
so the timeout holds whatever the group's own timeout is. On NCCL ``work.wait()`` only makes the current
stream wait for the collective, without blocking the host: a timed wait there would poll the work (about
1 ms each) and abort the communicator when it expires, so the timeout is the process group's own (its
watchdog; give the group the timeout you want, as the DDP hook does for its group).

``average_metric`` averages a python float over processes (diagnostics; no ledger record, so the ledger holds
exactly what the algorithm sent, as in the simulator).
"""
from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist

from .ledger import Ledger, payload_record

DEFAULT_TIMEOUT_S = 60.0


class CollectiveError(RuntimeError):
    """A collective did not complete: a peer died, hung past the timeout, or issued a different collective."""


class DistributedCollective:
    """k emulated workers in this process, ``world`` processes in ``group``: every argument is (k, *s)."""

    def __init__(self, workers_per_process: int = 1, group=None, timeout: float = DEFAULT_TIMEOUT_S,
                 keep_records: bool = True):
        if not isinstance(workers_per_process, int) or isinstance(workers_per_process, bool) or workers_per_process < 1:
            raise ValueError(f"DistributedCollective: workers_per_process={workers_per_process!r} is invalid; "
                             "allowed: an integer >= 1")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise ValueError(f"DistributedCollective: timeout={timeout!r} is invalid; allowed: seconds > 0")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("DistributedCollective: group is invalid; allowed: an initialized torch.distributed "
                             "process group (call torch.distributed.init_process_group first)")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.workers_per_process = workers_per_process
        self.workers = workers_per_process * self.world
        self.timeout = float(timeout)
        self.ledger = Ledger(keep_records=keep_records)
        # NCCL moves only CUDA tensors: CPU inputs (the CPU simulator under NCCL) travel via the current GPU.
        nccl = dist.get_backend(group) == "nccl"
        self._nccl = nccl
        self._wire = torch.device("cuda", torch.cuda.current_device()) if nccl else None

    @property
    def local_workers(self) -> range:
        """The global indices of the workers this process emulates."""
        k = self.workers_per_process
        return range(self.rank * k, (self.rank + 1) * k)

    def _check(self, op: str, x: torch.Tensor) -> None:
        if x.dim() == 0 or x.shape[0] != self.workers_per_process:
            raise ValueError(f"DistributedCollective.{op}: x must have a leading worker axis of size "
                             f"{self.workers_per_process} (this process's workers), got shape {tuple(x.shape)}")

    def _wait(self, op: str, tag: str, launch) -> None:
        """Run one async collective and wait for it, turning any failure or timeout into a clear error."""
        start = time.monotonic()
        try:
            work = launch()
            if work is not None and self._nccl:
                work.wait()  # the stream waits; the group's watchdog enforces its timeout
            elif work is not None:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        except Exception as error:  # gloo raises RuntimeError, NCCL DistBackendError: both mean the same here
            raise CollectiveError(
                f"DistributedCollective.{op} (tag {tag!r}) failed on rank {self.rank} of {self.world} after "
                f"{time.monotonic() - start:.1f}s (timeout {self.timeout:g}s): a peer process died, hung, or "
                f"issued a different collective. Cause: {type(error).__name__}: {error}") from error

    def all_reduce_mean(self, x: torch.Tensor, tag: str = "") -> torch.Tensor:
        """(k, *s) -> (*s): local row sum, one real SUM all-reduce, then / (k * world)."""
        self._check("all_reduce_mean", x)
        self.ledger.add(payload_record("all_reduce", x, self.workers, tag))
        return self._sum(x, "all_reduce_mean", tag) / self.workers

    def _sum(self, x: torch.Tensor, op: str, tag: str) -> torch.Tensor:
        total = self._to_wire(x.sum(dim=0))  # (*s); for k = 1 exactly x[0]
        self._wait(op, tag, lambda: dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group, async_op=True))
        return total.to(x.device)

    def _to_wire(self, x: torch.Tensor) -> torch.Tensor:
        if self._wire is not None and x.device != self._wire:
            return x.to(self._wire).contiguous()
        return x.contiguous()

    def all_gather(self, x: torch.Tensor, tag: str = "") -> torch.Tensor:
        """(k, *s) -> (k * world, *s): every process receives every worker's rows, in global worker order."""
        self._check("all_gather", x)
        self.ledger.add(payload_record("all_gather", x, self.workers, tag))
        return self._gather(x, "all_gather", tag)

    def _gather(self, x: torch.Tensor, op: str, tag: str) -> torch.Tensor:
        local = self._to_wire(x)
        out = torch.empty((self.workers, *x.shape[1:]), dtype=x.dtype, device=local.device)  # (W, *s)
        self._wait(op, tag, lambda: dist.all_gather_single(out, local, group=self.group, async_op=True))
        return out.to(x.device)

    def gather_untracked(self, x: torch.Tensor) -> torch.Tensor:
        """(k, *s) -> (W, *s) like ``all_gather`` without a ledger record (results, diagnostics)."""
        self._check("gather_untracked", x)
        return self._gather(x, "gather_untracked", "result")

    def average_untracked(self, x: torch.Tensor) -> torch.Tensor:
        """(k, *s) -> (*s): the same mean as ``all_reduce_mean`` without a ledger record (a measurement)."""
        self._check("average_untracked", x)
        return self._sum(x, "average_untracked", "metric") / self.workers

    def average_metric(self, value: float) -> float:
        """The mean of a python float over processes (float64 on the wire); no ledger record."""
        return self.average_metrics([value])[0]

    def average_metrics(self, values: list[float]) -> list[float]:
        """``[average_metric(v) for v in values]`` in ONE all-reduce of len(values) float64s: every collective
        is a synchronisation point costing ~alpha plus the ranks' arrival skew, so a step's scalars travel
        together. Elementwise the same SUM then / world as ``average_metric``."""
        buffer = torch.tensor([[float(v) for v in values]], dtype=torch.float64)  # (1, n): one row, this process
        return [float(s) / self.world for s in self._sum(buffer, "average_metric", "metric").tolist()]

    def barrier(self) -> None:
        """Wait for every process (a tiny all-reduce, so it obeys the same timeout); no ledger record."""
        self.average_metric(0.0)

    def __repr__(self) -> str:
        return (f"DistributedCollective(rank={self.rank}, world={self.world}, "
                f"workers_per_process={self.workers_per_process}, workers={self.workers})")
