"""Collectives behind one protocol (``Comm``): the virtual one for the simulator and the torch.distributed one
for real processes. Both write the same ledger, which the cost model prices.

    comm = VirtualCollective(workers=8)  # (W, *s) -> mean over axis 0, recorded in comm.ledger
    comm = DistributedCollective(workers_per_process=k)  # (k, *s) on each process -> a real all-reduce
"""
from .protocol import Comm
from .ledger import COLLECTIVE_OPS, Ledger, LedgerRecord, payload_record
from .virtual import VirtualCollective
from .distributed import CollectiveError, DistributedCollective

__all__ = ["Comm", "COLLECTIVE_OPS", "Ledger", "LedgerRecord", "payload_record", "VirtualCollective",
           "CollectiveError", "DistributedCollective"]
