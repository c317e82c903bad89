"""The virtual collective: all-reduce and all-gather over the leading worker axis, with a ledger.

Every call appends a ``LedgerRecord`` (compressors/comm/ledger.py) saying what one worker sent.
"""
from __future__ import annotations

import torch

from .ledger import Ledger, payload_record


class VirtualCollective:
    """W workers in one process: every argument is (W, *s), row i being worker i's contribution."""

    def __init__(self, workers: int, keep_records: bool = True):
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"VirtualCollective: workers={workers!r} is invalid; allowed: an integer >= 1")
        self.workers = workers
        self.ledger = Ledger(keep_records=keep_records)

    def _check(self, op: str, x: torch.Tensor) -> None:
        if x.dim() == 0 or x.shape[0] != self.workers:
            raise ValueError(f"VirtualCollective.{op}: x must have a leading worker axis of size {self.workers}, "
                             f"got shape {tuple(x.shape)}")

    def all_reduce_mean(self, x: torch.Tensor, tag: str = "") -> torch.Tensor:
        """(W, *s) -> (*s): the mean over workers (sum, then divide: as a real SUM all-reduce then / W)."""
        self._check("all_reduce_mean", x)
        self.ledger.add(payload_record("all_reduce", x, self.workers, tag))
        return x.sum(dim=0) / self.workers

    def all_gather(self, x: torch.Tensor, tag: str = "") -> torch.Tensor:
        """(W, *s) -> (W, *s): every worker receives every row (here: the same tensor, copied)."""
        self._check("all_gather", x)
        self.ledger.add(payload_record("all_gather", x, self.workers, tag))
        return x.clone()
