"""What the DDP hook settles once, before its first bucket: its own process group, and that every rank runs
the same compressor with the same seed.

Own group: the hook's collectives run on a process group of their own (``dist.new_group`` over the ranks of
DDP's group, with the same backend and the hook's ``timeout``), never on DDP's. DDP issues collectives of its
own on its group (the unused-parameter map with ``find_unused_parameters=True``, Join's shadow all-reduces)
from the training thread while the hook's thread issues the compressor's; on one group their relative order
could differ per rank, which on NCCL hangs or silently mismatches a reduction. ``new_group`` must be called by
every rank of the job, in the same order: the hook calls it when it is built (or, if the default group does
not exist yet then, at its first bucket), which every rank reaches in program order.

Same setup: ranks given different seeds, compressor options, or different saved hook states would diverge
silently (every collective still matches in shape). The first bucket gathers one row of fingerprints from
every rank and raises the same ``ValueError`` on every rank if any differs.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import types
from typing import Any

import torch
import torch.distributed as dist

SETUP_FIELDS = ("seed", "compressor configuration", "hook state (steps and saved buckets)")


def own_group(process_group, timeout: float):
    """A new process group over ``process_group``'s ranks (all ranks when None), same backend, ``timeout``."""
    ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
    return dist.new_group(ranks=ranks, timeout=datetime.timedelta(seconds=timeout),
                          backend=dist.get_backend(process_group))


def describe(value: Any, depth: int = 0) -> str:
    """A canonical description of a compressor's configuration: its classes, their options (nested, closures
    of its rules included), never object addresses nor GPU indices. Equal options give equal text on every
    process."""
    if depth > 8:
        return "..."
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return repr(value)
    if isinstance(value, torch.device):  # the type only: each rank has its own GPU index
        return f"device({value.type!r})"
    if isinstance(value, torch.Tensor):
        return f"tensor({list(value.shape)}, {value.dtype}, {value.double().sum().item() if value.numel() else 0})"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(describe(v, depth + 1) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{describe(k, depth + 1)}: {describe(v, depth + 1)}"
                               for k, v in sorted(value.items(), key=lambda kv: repr(kv[0]))) + "}"
    if isinstance(value, functools.partial):
        return f"partial({describe(value.func, depth + 1)}, {describe(value.args, depth + 1)}, " \
               f"{describe(value.keywords, depth + 1)})"
    if isinstance(value, types.FunctionType):
        cells = [c.cell_contents for c in (value.__closure__ or ()) if _filled(c)]
        return f"{value.__module__}.{value.__qualname__}({describe(cells, depth + 1)}, " \
               f"{describe(value.__defaults__, depth + 1)})"
    if isinstance(value, (types.BuiltinFunctionType, type)):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"
    kind = type(value)
    fields = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else getattr(value, "__dict__", None)
    if fields is None:
        return f"{kind.__module__}.{kind.__qualname__}"
    return f"{kind.__module__}.{kind.__qualname__}{describe(dict(fields), depth + 1)}"


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def fingerprint(text: str) -> int:
    """63 bits of the SHA-256 of ``text``, as a non-negative int64."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def check_same_setup(comm, seed: int, configuration: str, saved: str) -> None:
    """Gather (seed, fingerprint of the configuration, fingerprint of the hook state) from every rank through
    ``comm`` (untracked) and raise the same ValueError on every rank if any differs."""
    row = torch.tensor([[seed & 0xFFFFFFFF, (seed >> 32) & 0x7FFFFFFF, fingerprint(configuration),
                         fingerprint(saved)]], dtype=torch.int64)  # (1, 4)
    table = comm.gather_untracked(row).cpu()  # (W, 4)
    differ = [name for name, columns in zip(SETUP_FIELDS, ([0, 1], [2], [3]))
              if not bool((table[:, columns] == table[0, columns]).all())]
    if differ:
        seeds = [int(r[0]) + (int(r[1]) << 32) for r in table]
        raise ValueError(f"ddp_comm_hook: the ranks' {' and '.join(differ)} differ; allowed: the same on every "
                         f"rank (seeds by rank: {seeds}; this rank's compressor: {configuration}; this rank's "
                         f"state: {saved})")
