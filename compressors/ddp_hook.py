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
# No `from __future__ import annotations`: DDP inspects the hook's real return annotation.
from typing import Any

import torch

from .base import Aggregator
from .serialization import check_same_structure, digest, from_plain, to_plain


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

    #: Version of ``state_dict``'s layout; 2: registered record tags and a checksum (older ones are refused).
    FORMAT_VERSION = 2

    def state_dict(self) -> dict[str, Any]:
        """Plain containers of tensors (loads with ``torch.load(..., weights_only=True)``), with a SHA-256
        ``checksum`` of everything else (``compressors.serialization.digest``)."""
        body = {"format_version": self.FORMAT_VERSION, "seed": self.seed, "calls": self.calls,
                "buckets": [{"key": list(k) if isinstance(k, tuple) else k, "shapes": [list(s) for s in e["shapes"]],
                             "state": to_plain(e["state"])} for k, e in self.buckets.items()]}
        return {**body, "checksum": digest(body)}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output. Untrusted input: records are rebuilt only from registered types,
        the checksum is verified, and every bucket's state must have the structure (record types, keys, shapes,
        dtypes) that this aggregator's fresh state for that bucket has; anything else is a ValueError naming it.
        Nothing is changed unless all of it is valid."""
        seed, calls, buckets = _checked_hook_state(saved, self.aggregator, named=self.names is not None)
        self.seed, self.calls, self.buckets = seed, calls, buckets


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


# -- loading a saved hook state (untrusted data) ---------------------------------------------------------------
_HOOK_KEYS = ("format_version", "seed", "calls", "buckets", "checksum")


def _hook_error(what: str) -> ValueError:
    return ValueError(f"HookState.load_state_dict: {what}")


def _checked_hook_state(saved: Any, aggregator: Aggregator, named: bool) -> tuple[int, int, dict[Any, dict]]:
    """(seed, calls, buckets) from a ``state_dict()``, validated; ValueError naming the first problem."""
    if type(saved) is not dict:
        raise _hook_error(f"a {type(saved).__name__} is invalid; allowed: the dict HookState.state_dict() returns")
    if saved.get("format_version") != HookState.FORMAT_VERSION:
        raise _hook_error(f"format_version={saved.get('format_version')!r} is invalid; allowed: "
                          f"{HookState.FORMAT_VERSION} (state dicts of this version, with a checksum)")
    if set(saved) != set(_HOOK_KEYS):
        raise _hook_error(f"keys {sorted(map(str, saved))} are invalid; allowed: exactly {sorted(_HOOK_KEYS)}")
    body = {k: saved[k] for k in _HOOK_KEYS[:-1]}
    try:
        intact = saved["checksum"] == digest(body)  # digest refuses unexpected types and deep nesting itself
    except ValueError as error:
        raise _hook_error(str(error)) from None
    if not intact:
        raise _hook_error("checksum mismatch: the state was altered or corrupted after it was saved")
    seed, calls, buckets = body["seed"], body["calls"], body["buckets"]
    for field, value in (("seed", seed), ("calls", calls)):
        if type(value) is not int or value < 0:
            raise _hook_error(f"{field}={value!r} is invalid; allowed: an integer >= 0")
    if type(buckets) is not list:
        raise _hook_error(f"buckets is a {type(buckets).__name__}; allowed: a list")
    out: dict[Any, dict] = {}
    for i, bucket in enumerate(buckets):
        key, entry = _checked_bucket(bucket, f"buckets[{i}]", aggregator, seed, named)
        if key in out:
            raise _hook_error(f"buckets[{i}].key={bucket['key']!r} is invalid; allowed: a key not used before")
        out[key] = entry
    return seed, calls, out


def _checked_bucket(bucket: Any, where: str, aggregator: Aggregator, seed: int, named: bool):
    if type(bucket) is not dict or set(bucket) != {"key", "shapes", "state"}:
        raise _hook_error(f"{where} is invalid; allowed: a dict with exactly the keys key, shapes, state")
    key, shapes = bucket["key"], bucket["shapes"]
    if named:
        if type(key) is not list or not key or not all(type(n) is str for n in key) or len(set(key)) != len(key):
            raise _hook_error(f"{where}.key={key!r} is invalid; allowed: a non-empty list of distinct parameter "
                              "names (the hook was built with model=)")
    elif type(key) is not int or key < 0:
        raise _hook_error(f"{where}.key={key!r} is invalid; allowed: a bucket index >= 0 (the hook was built "
                          "without model=)")
    if type(shapes) is not list or not all(type(s) is list and all(type(d) is int and d >= 0 for d in s)
                                           for s in shapes):
        raise _hook_error(f"{where}.shapes is invalid; allowed: a list of shapes (lists of integers >= 0)")
    names = list(key) if named else [str(j) for j in range(len(shapes))]
    if len(names) != len(shapes):
        raise _hook_error(f"{where}: {len(shapes)} shapes for {len(names)} parameter names; allowed: one each")
    try:
        state = from_plain(bucket["state"], f"{where}.state")
        like = next((t for t in _tensors(state) if t.is_floating_point()), torch.empty(0))
        fresh = aggregator.init({n: tuple(s) for n, s in zip(names, shapes)}, workers=1, seed=seed, dtype=like.dtype)
        check_same_structure(state, fresh, f"{where}.state")
    except ValueError as error:
        raise _hook_error(str(error)) from None
    return (tuple(key) if named else key), {"shapes": tuple(tuple(s) for s in shapes), "params": None, "state": state}


def _tensors(tree):
    """Every tensor of a nested state, in order (records, dicts, lists, tuples)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)
