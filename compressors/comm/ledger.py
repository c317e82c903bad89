"""The ledger every collective writes: one ``LedgerRecord`` per call, saying what one worker sent (``bits``:
payload bits, its own contribution). The cost model prices the ledger; the algorithm never knows the link speed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

COLLECTIVE_OPS = ("all_reduce", "all_gather")


@dataclass(frozen=True)
class LedgerRecord:
    op: str  # "all_reduce" | "all_gather"
    bits: int  # payload bits one worker sends
    numel: int  # elements one worker sends
    dtype: str
    workers: int
    tag: str = ""


@dataclass
class Ledger:
    """Records of collectives. ``keep_records=False`` keeps only totals (flat memory on long runs).

    ``step_records`` holds the records since the last ``begin_step()`` whatever ``keep_records`` says (the
    cost model prices a step from them); a loop that never calls ``begin_step()`` should keep records anyway.
    """

    keep_records: bool = True
    records: list[LedgerRecord] = field(default_factory=list)
    step_records: list[LedgerRecord] = field(default_factory=list)  # since the last begin_step(), always kept
    calls: int = 0
    total_bits: int = 0

    def begin_step(self) -> None:
        """Start a new step: ``step_records`` then holds only this step's collectives (for pricing)."""
        self.step_records = []

    def add(self, record: LedgerRecord) -> None:
        self.calls += 1
        self.total_bits += record.bits
        self.step_records.append(record)
        if self.keep_records:
            self.records.append(record)

    def __iter__(self):
        return iter(self.records)

    def __len__(self):
        return len(self.records) if self.keep_records else self.calls

    def __getitem__(self, index):
        return self.records[index]


def payload_record(op: str, x: torch.Tensor, workers: int, tag: str) -> LedgerRecord:
    per_worker = x[0].numel() if x.dim() > 0 else 1
    return LedgerRecord(op=op, bits=per_worker * x.element_size() * 8, numel=per_worker,
                        dtype=str(x.dtype).removeprefix("torch."), workers=workers, tag=tag)
