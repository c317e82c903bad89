"""Any registered aggregator as a ``DistributedDataParallel`` communication hook.

    state, hook = compressors.ddp_comm_hook(compressors.make("powersgd", rank=2), model=ddp_model)
    ddp_model.register_comm_hook(state, hook)
    ...
    torch.save(state.state_dict(), path)   # and later: state.load_state_dict(torch.load(path))

Per bucket: the flat gradient is split into its parameters' shapes (``bucket.gradients()``), given the
leading worker axis k = 1, aggregated with the same ``aggregate`` the simulator runs (collectives through
a ``DistributedCollective``), and written back as the bucket's flat result. Aggregator state is kept per
bucket (by its parameter names with ``model=``, else by bucket index), created on first sight.

Collective order: every collective is issued synchronously inside the hook, and DDP calls the hook for
bucket 0, 1, 2, ... in index order on every rank, so all ranks issue the same collectives in the same order.
torch's own ``powerSGD_hook`` instead issues its Q all-reduce from a future callback, which on gloo with
several buckets interleaves differently per rank and crashes or deadlocks. The price here is no overlap
of communication with the rest of the backward pass; the hook returns an already-completed future.

DDP rebuilds its buckets once after the first iteration (gradient-ready order). With ``model=`` a bucket
keeps its state when only its order changed; otherwise a bucket whose parameters changed gets a fresh state.
"""
import importlib  # no `from __future__ import annotations`: DDP inspects the hook's real return annotation
from typing import Any

import torch

from .base import Aggregator

_NAMEDTUPLE = "__namedtuple__"


class HookState:
    """Everything the hook carries between steps: per-bucket aggregator states and the collective.

    With ``model`` (the module or the DDP wrapper) each bucket's tensors are named by their parameter names,
    taken in sorted order, and its state is keyed by that set of names: stable across DDP's bucket rebuild,
    across ranks and across runs (so a checkpoint resumes exactly). Without it tensors are named by their
    position and the state is keyed by the bucket index, reset when the bucket's parameters change.
    """

    def __init__(self, aggregator: Aggregator, seed: int = 0, process_group=None, timeout: float = 60.0,
                 keep_records: bool = False, model: torch.nn.Module | None = None):
        self.aggregator = aggregator
        self.keep_records = keep_records  # ledger records kept (tests, accounting); totals are always kept
        self.seed = seed
        self.process_group = process_group
        self.timeout = timeout
        self.names = {id(p): n for n, p in model.named_parameters()} if model is not None else None
        self.comm = None  # a DistributedCollective, created on the first call (needs the process group)
        self.buckets: dict[Any, dict[str, Any]] = {}  # key -> {"shapes", "params" (ids), "state"}
        self.calls = 0

    def collective(self):
        if self.comm is None:
            from sim.distributed_collective import DistributedCollective  # lazy: compressors never import sim eagerly
            self.comm = DistributedCollective(1, group=self.process_group, timeout=self.timeout,
                                              keep_records=self.keep_records)
        return self.comm

    def bucket_parts(self, index: int, params: list[torch.Tensor], gradients: list[torch.Tensor]):
        """[(key, {name: (1, *shape)})] to aggregate one after the other, and the names in the bucket's order.

        Named (model=): a bucket is split into the parameter sets of states it already has (a resumed run's
        first iteration uses DDP's initial buckets, not the rebuilt ones that were saved), the rest forms a
        new set; states overlapping a bucket but not used by it are stale (DDP rebuilt its buckets) and dropped.
        """
        if self.names is None:
            names = [str(i) for i in range(len(params))]
            return [(index, {n: g.reshape(1, *p.shape) for n, g, p in zip(names, gradients, params)})], names
        missing = [tuple(p.shape) for p in params if id(p) not in self.names]
        if missing:
            raise ValueError(f"ddp_comm_hook: model is invalid; allowed: the module being trained "
                             f"(parameters of shapes {missing} are not among its parameters)")
        names = [self.names[id(p)] for p in params]
        by_name = {n: g.reshape(1, *p.shape) for n, g, p in zip(names, gradients, params)}  # (1, *shape)
        members, covered = [], set()
        for key in self.buckets:
            if set(key) <= set(names) and not set(key) & covered:
                members.append(key)
                covered |= set(key)
        rest = tuple(sorted(n for n in names if n not in covered))
        if rest:
            members.append(rest)
        for key in [k for k in self.buckets if k not in members and set(k) & set(names)]:
            del self.buckets[key]
        position = {n: i for i, n in enumerate(names)}
        members.sort(key=lambda k: min(position[n] for n in k))  # the same order on every rank
        return [(key, {n: by_name[n] for n in key}) for key in members], names

    def key_of(self, param: torch.Tensor) -> str | None:
        return self.names.get(id(param)) if self.names is not None else None

    def bucket_state(self, key, params: list[torch.Tensor], grads: dict[str, torch.Tensor]):
        shapes = tuple(tuple(g.shape[1:]) for g in grads.values())
        ids = tuple(id(p) for p in params)
        entry = self.buckets.get(key)
        stale = entry is not None and self.names is None and entry["params"] is not None and entry["params"] != ids
        # A loaded entry has no ids yet: it is adopted when the shapes agree.
        if entry is None or entry["shapes"] != shapes or stale:
            like = next(iter(grads.values()))
            entry = {"shapes": shapes, "params": ids, "state": self.aggregator.init(
                {name: tuple(g.shape[1:]) for name, g in grads.items()}, workers=1, seed=self.seed,
                dtype=like.dtype, device=like.device)}
            self.buckets[key] = entry
        entry["params"] = ids
        return entry

    def state_dict(self) -> dict[str, Any]:
        """Plain containers of tensors (loads with ``torch.load(..., weights_only=True)``)."""
        return {"seed": self.seed, "calls": self.calls,
                "buckets": [{"key": list(k) if isinstance(k, tuple) else k, "shapes": [list(s) for s in e["shapes"]],
                             "state": to_plain(e["state"])} for k, e in self.buckets.items()]}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.seed = saved["seed"]
        self.calls = saved["calls"]
        self.buckets = {(tuple(b["key"]) if isinstance(b["key"], list) else b["key"]):
                        {"shapes": tuple(tuple(s) for s in b["shapes"]), "params": None, "state": from_plain(b["state"])}
                        for b in saved["buckets"]}


def ddp_comm_hook(aggregator: Aggregator | str, *, seed: int = 0, process_group=None, timeout: float = 60.0,
                  keep_records: bool = False, model: torch.nn.Module | None = None, **options):
    """``(state, hook)`` for ``DistributedDataParallel.register_comm_hook``.

    aggregator: an Aggregator, or a registered name with its ``options`` (``ddp_comm_hook("powersgd", rank=2)``).
    seed: the aggregator's shared seed (must be equal on every rank). timeout: seconds any collective may take.
    keep_records: keep every ledger record in ``state.comm.ledger`` (otherwise totals only: flat memory).
    model: the trained module (recommended): names each bucket's tensors and keys its state stably.
    """
    from .registry import make

    if isinstance(aggregator, str):
        aggregator = make(aggregator, **options)
    elif options:
        raise ValueError(f"ddp_comm_hook: options {sorted(options)} are invalid with an Aggregator; "
                         "allowed: options only with a registered name")
    if not isinstance(aggregator, Aggregator):
        raise ValueError(f"ddp_comm_hook: aggregator={aggregator!r} is invalid; allowed: an Aggregator or a name")
    return HookState(aggregator, seed, process_group, timeout, keep_records, model), hook


def hook(state: HookState, bucket) -> torch.futures.Future[torch.Tensor]:
    """Aggregate one bucket synchronously; returns a completed future holding the bucket's flat result."""
    buffer = bucket.buffer()  # (total,), the concatenation of the bucket's gradients, in order
    params = bucket.parameters()
    parts, bucket_order = state.bucket_parts(bucket.index(), params, bucket.gradients())
    comm = state.collective()
    if bucket.index() == 0:  # DDP's first bucket of a step: the ledger's step_records then hold one step
        comm.ledger.begin_step()
    update: dict[str, torch.Tensor] = {}
    for key, grads in parts:
        members = params if state.names is None else [p for p in params if state.key_of(p) in grads]
        entry = state.bucket_state(key, members, grads)
        part, entry["state"] = state.aggregator.aggregate(grads, entry["state"], comm)
        update.update(part)
    flat = torch.cat([update[name].reshape(-1).to(buffer.dtype) for name in bucket_order])  # (total,)
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
