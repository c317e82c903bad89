"""Any registered aggregator as a ``DistributedDataParallel`` communication hook.

    state, hook = compressors.ddp_comm_hook(compressors.make("powersgd", rank=2))
    ddp_model.register_comm_hook(state, hook)
    ...
    torch.save(state.state_dict(), path)   # and later: state.load_state_dict(torch.load(path))

Per bucket: the flat gradient is split into its parameters' shapes (``bucket.gradients()``), given the
leading worker axis k = 1, aggregated with the same ``aggregate`` the simulator runs (collectives through
a ``DistributedCollective``), and written back as the bucket's flat result. Aggregator state is kept per
bucket index, created on first sight.

Collective order: every collective is issued synchronously inside the hook, and DDP calls the hook for
bucket 0, 1, 2, ... in index order on every rank, so all ranks issue the same collectives in the same order.
torch's own ``powerSGD_hook`` instead issues its Q all-reduce from a future callback, which on gloo with
several buckets interleaves differently per rank and crashes or deadlocks. The price here is no overlap
of communication with the rest of the backward pass; the hook returns an already-completed future.

DDP rebuilds its buckets once after the first iteration: a bucket whose parameters changed gets a fresh
state (its first-iteration state belonged to other parameters).
"""
from __future__ import annotations

import importlib
from typing import Any

import torch

from .base import Aggregator

_NAMEDTUPLE = "__namedtuple__"


class HookState:
    """Everything the hook carries between steps: per-bucket aggregator states and the collective."""

    def __init__(self, aggregator: Aggregator, seed: int = 0, process_group=None, timeout: float = 60.0,
                 keep_records: bool = False):
        self.aggregator = aggregator
        self.keep_records = keep_records  # ledger records kept (tests, accounting); totals are always kept
        self.seed = seed
        self.process_group = process_group
        self.timeout = timeout
        self.comm = None  # a DistributedCollective, created on the first call (needs the process group)
        self.buckets: dict[int, dict[str, Any]] = {}  # index -> {"shapes", "params" (ids), "state"}
        self.calls = 0

    def collective(self):
        if self.comm is None:
            from sim.distributed_collective import DistributedCollective  # lazy: compressors never import sim eagerly
            self.comm = DistributedCollective(1, group=self.process_group, timeout=self.timeout,
                                              keep_records=self.keep_records)
        return self.comm

    def bucket_state(self, index: int, params: list[torch.Tensor], grads: dict[str, torch.Tensor]):
        shapes = tuple(tuple(p.shape) for p in params)
        ids = tuple(id(p) for p in params)
        entry = self.buckets.get(index)
        # A loaded entry has no ids yet: it is adopted when the shapes agree.
        if entry is None or entry["shapes"] != shapes or (entry["params"] is not None and entry["params"] != ids):
            like = next(iter(grads.values()))
            entry = {"shapes": shapes, "params": ids, "state": self.aggregator.init(
                {name: tuple(g.shape[1:]) for name, g in grads.items()}, workers=1, seed=self.seed,
                dtype=like.dtype, device=like.device)}
            self.buckets[index] = entry
        entry["params"] = ids
        return entry

    def state_dict(self) -> dict[str, Any]:
        """Plain containers of tensors (loads with ``torch.load(..., weights_only=True)``)."""
        return {"seed": self.seed, "calls": self.calls,
                "buckets": [{"index": i, "shapes": [list(s) for s in e["shapes"]], "state": to_plain(e["state"])}
                            for i, e in sorted(self.buckets.items())]}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.seed = saved["seed"]
        self.calls = saved["calls"]
        self.buckets = {b["index"]: {"shapes": tuple(tuple(s) for s in b["shapes"]), "params": None,
                                     "state": from_plain(b["state"])} for b in saved["buckets"]}


def ddp_comm_hook(aggregator: Aggregator | str, *, seed: int = 0, process_group=None, timeout: float = 60.0,
                  keep_records: bool = False, **options):
    """``(state, hook)`` for ``DistributedDataParallel.register_comm_hook``.

    aggregator: an Aggregator, or a registered name with its ``options`` (``ddp_comm_hook("powersgd", rank=2)``).
    seed: the aggregator's shared seed (must be equal on every rank). timeout: seconds any collective may take.
    keep_records: keep every ledger record in ``state.comm.ledger`` (otherwise totals only: flat memory).
    """
    from .registry import make

    if isinstance(aggregator, str):
        aggregator = make(aggregator, **options)
    elif options:
        raise ValueError(f"ddp_comm_hook: options {sorted(options)} are invalid with an Aggregator; "
                         "allowed: options only with a registered name")
    if not isinstance(aggregator, Aggregator):
        raise ValueError(f"ddp_comm_hook: aggregator={aggregator!r} is invalid; allowed: an Aggregator or a name")
    return HookState(aggregator, seed, process_group, timeout, keep_records), hook


def hook(state: HookState, bucket) -> torch.futures.Future:
    """Aggregate one bucket synchronously; returns a completed future holding the bucket's flat result."""
    buffer = bucket.buffer()  # (total,), the concatenation of the bucket's gradients, in order
    gradients = bucket.gradients()
    params = bucket.parameters()
    grads = {str(i): g.reshape(1, *p.shape) for i, (g, p) in enumerate(zip(gradients, params))}  # (1, *shape)
    entry = state.bucket_state(bucket.index(), params, grads)
    comm = state.collective()
    if bucket.index() == 0:  # DDP's first bucket of a step: the ledger's step_records then hold one step
        comm.ledger.begin_step()
    update, entry["state"] = state.aggregator.aggregate(grads, entry["state"], comm)
    flat = torch.cat([update[name].reshape(-1).to(buffer.dtype) for name in grads])  # (total,)
    if flat.numel() != buffer.numel():
        raise RuntimeError(f"ddp_comm_hook: bucket {bucket.index()} holds {buffer.numel()} elements but its "
                           f"gradients {flat.numel()}: DDP's bucket layout is not the concatenation assumed here")
    state.calls += 1
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(flat)
    return future


# -- plain containers for checkpoints ------------------------------------------------------------------------
def to_plain(value: Any) -> Any:
    """Nested aggregator state -> dicts/lists/tensors/numbers only; NamedTuples keep their type's name."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        kind = type(value)
        return {_NAMEDTUPLE: f"{kind.__module__}:{kind.__qualname__}",
                "fields": {f: to_plain(getattr(value, f)) for f in value._fields}}
    if isinstance(value, (tuple, list)):
        return type(value)(to_plain(v) for v in value)
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value) or _NAMEDTUPLE in value:
            raise ValueError(f"state: dict keys must be strings other than {_NAMEDTUPLE!r}, got {list(value)}")
        return {k: to_plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"state: a value of type {type(value).__name__} cannot be checkpointed; allowed: tensors, "
                     "numbers, strings, None, and tuples/lists/dicts/NamedTuples of them")


def from_plain(value: Any) -> Any:
    """Inverse of ``to_plain``; NamedTuple types are looked up only in this project's packages."""
    if isinstance(value, dict) and _NAMEDTUPLE in value:
        module, _, qualname = value[_NAMEDTUPLE].partition(":")
        if module.split(".")[0] not in ("compressors", "sim"):
            raise ValueError(f"state: type {value[_NAMEDTUPLE]!r} is invalid; allowed: types from compressors or sim")
        kind: Any = importlib.import_module(module)
        for part in qualname.split("."):
            kind = getattr(kind, part)
        return kind(**{f: from_plain(v) for f, v in value["fields"].items()})
    if isinstance(value, (tuple, list)):
        return type(value)(from_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: from_plain(v) for k, v in value.items()}
    return value
