"""Any registered aggregator as a ``DistributedDataParallel`` communication hook.

    state, hook = compressors.ddp_comm_hook(compressors.make("powersgd", rank=2), model=ddp_model)
    ddp_model.register_comm_hook(state, hook)
    ...
    torch.save(state.state_dict(), path)   # and later: state.load_state_dict(torch.load(path))
    state.close()                          # at the end: stops the communication thread

Per bucket: the flat gradient is split into its parameters' shapes (``bucket.gradients()``), given the
leading worker axis k = 1, aggregated with the same ``aggregate`` the simulator runs (collectives through
a ``DistributedCollective``), and written back as the bucket's flat result. Aggregator state is kept per
bucket (by its parameter names with ``model=``, else by bucket index), created on first sight.

Overlap (``overlap=True``, the default): the hook only hands the bucket to the state's communication thread
(``hook_worker.HookWorker``) and returns a future; the thread aggregates buckets first in, first out while the
backward pass computes the next ones, and completes the futures DDP waits on. DDP hands buckets over in
index order on every rank and one thread per process issues every collective, so all ranks issue the same
collectives in the same order (torch's own ``powerSGD_hook`` issues its Q all-reduce from a future callback,
which on gloo with several buckets interleaves differently per rank and crashes). ``overlap=False``
aggregates inside the hook (no overlap); both modes compute bitwise the same results.

Process group (``compressors.ddp.setup``): the hook's collectives run on a group of its own, made once with
``dist.new_group`` over DDP's ranks, never on DDP's group. The first bucket checks that every rank has the
same seed, compressor configuration and hook state (a ValueError on every rank otherwise).

Failures (``compressors.ddp.guard``): everything a step does per bucket (unpacking the bucket, creating or
placing its states, size checks, the compressor, its collectives) runs guarded. A NaN/Inf in any rank's
bucket, or a failure on any rank, gives a NaN bucket on every rank (a GradScaler or skip-step guard sees it
everywhere) for the rest of the step, and leaves every bucket's state as it was before the step (states
created in the step included): new states are committed only when the step's last bucket is in and no
bucket of the step was bad. The agreement rides on the compressor's own collectives (one extra element
each); a bucket that creates states agrees first, with one scalar all-reduce, since a rank whose creation
failed cannot issue the compressor's collectives. The step is counted in ``skipped_steps``.

Sparse gradients (``nn.Embedding(sparse=True)``; DDP gives each such parameter a bucket of its own): an exact
dense all-reduce mean, returned sparse, as torch's ``allreduce_hook`` computes it (no compression).

Steps: the hook counts optimizer steps (a step is committed with its last bucket; a bad step is not a step).
A state created at step s, e.g. when DDP rebuilds its buckets after the first iteration, starts its warm-up
count (``start_compressing_after_num_steps``) at s, so compression starts at the requested step with any
number of buckets, as torch's hook (one iteration counter) does.

DDP rebuilds its buckets once after the first iteration (gradient-ready order). With ``model=`` a bucket
keeps its state when only its order changed; otherwise a bucket whose parameters changed gets a fresh state.
"""
# No `from __future__ import annotations`: DDP inspects the hook's real return annotation.
import dataclasses
import functools
import weakref
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from ..base import Aggregator
from ..comm import DistributedCollective
from ..policies import Warmup
from ..registry import make
from .guard import FlagCollective, guarded_aggregate, nonfinite_flag
from .setup import check_same_setup, describe, own_group
from .state_io import checked_hook_state, hook_state_dict
from .worker import HookWorker


class HookUsageError(ValueError):
    """The hook was used wrongly (a module that is not the trained one, a bucket layout it cannot read): raised
    on the ranks where it happens, after every rank agreed to skip the step."""


class HookState:
    """Everything the hook carries between steps: per-bucket aggregator states and the collective.

    With ``model`` (the module or the DDP wrapper) each bucket's tensors are named by their parameter names,
    taken in sorted order, and its state is keyed by that set of names: stable across DDP's bucket rebuild,
    across ranks and across runs (so a checkpoint resumes exactly). Without it tensors are named by their
    position and the state is keyed by the bucket index, reset when the bucket's parameters change.
    """

    def __init__(self, aggregator: Aggregator, seed: int = 0, process_group=None, timeout: float = 60.0,
                 keep_records: bool = False, model: torch.nn.Module | None = None, overlap: bool = True):
        self.aggregator = aggregator
        self.overlap = overlap  # aggregate on the communication thread (True) or inside the hook (False)
        self.keep_records = keep_records  # ledger records kept (tests, accounting); totals are always kept
        self.seed = seed
        self.process_group = process_group  # DDP's group: the hook's own group spans the same ranks
        self.timeout = timeout
        self.names = {id(p): n for n, p in model.named_parameters()} if model is not None else None
        self.comm = None  # a DistributedCollective on the hook's own process group (``connect``)
        self.verified = False  # the ranks' seeds, configurations and states were checked equal
        self.buckets: dict[Any, dict[str, Any]] = {}  # key -> {"shapes", "params" (ids), "state"}
        self.calls = 0
        self.steps = 0  # optimizer steps: steps whose every bucket was finite on every rank
        self.skipped_steps: list[tuple[int, str]] = []  # (step, why) of every step returned as NaN
        self.pending: dict[Any, Any] = {}  # key -> the new state of a bucket of the current step, not yet kept
        self.created: dict[Any, dict[str, Any]] = {}  # key -> an entry created (or placed) in the current step
        self.step_bad: str | None = None  # why the current step is bad (agreed by every rank), else None
        self.late: str | None = None  # a failure here after a bucket's last collective: rides on the next one
        self.worker = HookWorker()
        weakref.finalize(self, self.worker.close, 0.0)  # a dropped state stops its thread
        if dist.is_available() and dist.is_initialized():
            self.connect()  # every rank builds its hook in program order: where new_group must be called

    def close(self) -> None:
        """Stop the communication thread after the buckets already handed over (idempotent)."""
        self.worker.close()

    def connect(self) -> DistributedCollective:
        """The hook's collective on a process group of its own, made once (``compressors.ddp.setup``)."""
        if self.comm is None:
            self.comm = DistributedCollective(1, group=own_group(self.process_group, self.timeout),
                                              timeout=self.timeout, keep_records=self.keep_records)
        return self.comm

    def collective(self) -> DistributedCollective:
        return self.connect()

    def bucket_parts(self, index: int, params: list[torch.Tensor], gradients: list[torch.Tensor]):
        """[(key, {name: (1, *shape)})] to aggregate one after the other, and the names in the bucket's order.

        Named (model=): a bucket is split into the parameter sets of states it already has (a resumed run's
        first iteration uses DDP's initial buckets, not the rebuilt ones that were saved), the rest forms a
        new set; states overlapping a bucket but not used by it are stale (DDP rebuilt its buckets) and dropped.
        """
        if len(gradients) != len(params):
            raise HookUsageError(f"ddp_comm_hook: bucket {index} has {len(params)} parameters but "
                                 f"{len(gradients)} gradient views; allowed: one dense gradient per parameter")
        if self.names is None:
            names = [str(i) for i in range(len(params))]
            return [(index, {n: g.reshape(1, *p.shape) for n, g, p in zip(names, gradients, params)})], names
        missing = [tuple(p.shape) for p in params if id(p) not in self.names]
        if missing:
            raise HookUsageError(f"ddp_comm_hook: model is invalid; allowed: the module being trained "
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

    def needs_state(self, key, params: list[torch.Tensor], grads: dict[str, torch.Tensor]) -> bool:
        """Whether this part's state must be created, or placed (a loaded one), in this step: decided by the
        bucket layout and the states kept, which are the same on every rank (checked on the first call)."""
        entry = self.buckets.get(key)
        shapes = tuple(tuple(g.shape[1:]) for g in grads.values())
        if entry is None or entry["shapes"] != shapes or entry["params"] is None:
            return True
        return self.names is None and entry["params"] != tuple(id(p) for p in params)  # DDP rebuilt it

    def new_entry(self, key, params: list[torch.Tensor], grads: dict[str, torch.Tensor]) -> dict[str, Any]:
        """A state for this part, on the gradients' device: a loaded one placed there, else a fresh one born
        at this step. Kept in ``created`` until the step commits."""
        shapes = tuple(tuple(g.shape[1:]) for g in grads.values())
        like = next(iter(grads.values()))
        fresh = self.aggregator.init({name: tuple(g.shape[1:]) for name, g in grads.items()}, workers=1,
                                     seed=self.seed, dtype=like.dtype, device=like.device)
        loaded = self.buckets.get(key)
        if loaded is not None and loaded["params"] is None and loaded["shapes"] == shapes:
            state = placed_like(loaded["state"], fresh)  # a loaded state moves to the bucket's device
        else:
            state = born_at(self.aggregator, fresh, self.steps)
        entry = {"shapes": shapes, "params": tuple(id(p) for p in params), "state": state}
        self.created[key] = entry
        return entry

    def aggregate_bucket(self, bucket: "BucketView") -> torch.Tensor:
        """The bucket's flat result (NaN if any rank's step is bad); commits the step with its last bucket.
        An exception (a network failure, a usage error, a failure that no collective could carry) makes the
        rest of the step NaN without communication and is raised."""
        try:
            result = self._aggregate_bucket(bucket)
        except BaseException as error:
            self.pending.clear()
            self.created.clear()
            self.late = None
            self.step_bad = self.step_bad or f"bucket {bucket.index}: {type(error).__name__}: {error}"
            if bucket.is_last:
                self._end_step()
            raise
        if bucket.is_last:
            self._end_step()
        return result

    def _aggregate_bucket(self, bucket: "BucketView") -> torch.Tensor:
        comm = self.connect()
        if bucket.index == 0:  # DDP's first bucket of a step: the ledger's step_records then hold one step
            comm.ledger.begin_step()
        self.calls += 1
        if self.step_bad is not None:  # every rank knows: no communication for the rest of the step
            return nan_like(bucket.buffer)
        if not self.verified:
            check_same_setup(comm, self.seed, describe(self.aggregator), self.saved_summary())
            self.verified = True
        if bucket.buffer.layout != torch.strided:
            return self._sparse_bucket(bucket, comm)
        flags = FlagCollective(comm, nonfinite_flag(bucket.buffer), failure=self.late)
        self.late = None
        work, usage_error = self._prepare(bucket, flags)
        if work is None:
            if usage_error is not None:
                raise usage_error
            return nan_like(bucket.buffer)
        parts, order = work
        update: dict[str, torch.Tensor] = {}
        new_states: dict[Any, Any] = {}
        for key, grads, state in parts:
            done = guarded_aggregate(self.aggregator, grads, state, flags, zeros=flags.failure is not None)
            if done.update is not None:
                update.update(done.update)
                new_states[key] = done.state
        flat, result_bad = None, None
        if flags.failure is None:
            try:
                flat = self._assemble(bucket, update, order)
                result_bad = nonfinite_flag(flat)
            except Exception as error:  # after the last collective: rides on the next bucket's
                flags.fail(f"{type(error).__name__}: {error}")
        return self._decide(bucket, flags, result_bad, flat, new_states)

    def _prepare(self, bucket: "BucketView", flags: FlagCollective):
        """Unpack the bucket and create its missing states: ((parts, order), None), or (None, usage error or
        None) when any rank failed here. A bucket that creates states agrees before the compressor's
        collectives (a rank whose creation failed cannot issue them): one scalar all-reduce, untracked."""
        creating, usage_error = False, None
        parts, order = [], []
        try:
            split, order = self.bucket_parts(bucket.index, bucket.params, bucket.gradients)
            for key, grads in split:
                members = (bucket.params if self.names is None
                           else [p for p in bucket.params if self.key_of(p) in grads])
                if self.needs_state(key, members, grads):
                    creating = True
                    entry = self.new_entry(key, members, grads)
                else:
                    entry = self.buckets[key]
                parts.append((key, grads, entry["state"]))
        except Exception as error:
            creating = True  # the failing rank does not know; a layout failure is the same on every rank
            flags.fail(f"{type(error).__name__}: {error}")
            usage_error = error if isinstance(error, HookUsageError) else None
        if creating and flags.comm.average_metric(0.0 if flags.failure is None else 1.0) > 0.0:
            self.step_bad = f"bucket {bucket.index}: " + (flags.failure or "failed on another rank")
            return None, usage_error
        return (parts, order), None

    def _assemble(self, bucket: "BucketView", update: dict[str, torch.Tensor], order: list[str]) -> torch.Tensor:
        buffer = bucket.buffer
        pieces = [update[name].reshape(-1).to(buffer.dtype) for name in order]
        total = sum(piece.numel() for piece in pieces)
        if total != buffer.numel():
            raise HookUsageError(f"ddp_comm_hook: bucket {bucket.index} holds {buffer.numel()} elements but its "
                                 f"gradients {total}: DDP's bucket layout is not the concatenation assumed")
        # Into the bucket's own buffer, as torch's hooks write their results (its gradients were read by now):
        # no new bucket-sized block each step. A piece that shares the buffer's memory (none of the registered
        # compressors returns one) gets a fresh result instead, since cat cannot write over its own input.
        storage = buffer.untyped_storage().data_ptr()
        shares = any(piece.untyped_storage().data_ptr() == storage for piece in pieces)
        return torch.cat(pieces) if shares else torch.cat(pieces, out=buffer)  # (total,)

    def _decide(self, bucket: "BucketView", flags: FlagCollective, result_bad, result, new_states) -> torch.Tensor:
        """The bucket's result after the one host sync: NaN if any rank flagged it; a failure here that no
        collective carried rides on the next bucket (this rank returns NaN now); on the step's last bucket it
        cannot be agreed on any more and is raised."""
        agreed, nonfinite, bad_input = flags.read(result_bad)
        if agreed:
            why = flags.failure or ("non-finite gradient" if bad_input else "bad on another rank")
            self.step_bad = f"bucket {bucket.index}: {why}"
            return nan_like(bucket.buffer)
        if nonfinite:  # the same on every rank: a compressor's result is what every rank applies
            self.step_bad = f"bucket {bucket.index}: non-finite result"
            return nan_like(bucket.buffer)
        if flags.unsent is not None:
            if bucket.is_last:
                raise RuntimeError(f"ddp_comm_hook: bucket {bucket.index} (the step's last) failed on rank "
                                   f"{flags.rank} after its last collective, where the ranks cannot agree any "
                                   f"more: {flags.unsent}")
            self.late = f"bucket {bucket.index}: {flags.unsent}"
            return nan_like(bucket.buffer)
        self.pending.update(new_states)
        return result

    def _sparse_bucket(self, bucket: "BucketView", comm) -> torch.Tensor:
        """A sparse gradient (DDP gives it a bucket of its own): an exact dense all-reduce mean, returned in the
        gradient's sparse layout, under the same guard (the flag rides on that all-reduce)."""
        buffer = bucket.buffer
        dense = buffer.to_dense()  # (*shape)
        flags = FlagCollective(comm, nonfinite_flag(dense), failure=self.late)
        self.late = None
        mean = flags.all_reduce_mean(dense.unsqueeze(0), tag="sparse")  # (*shape)
        sparse = mean.to(buffer.dtype).to_sparse(buffer.sparse_dim())
        return self._decide(bucket, flags, nonfinite_flag(mean), sparse, {})

    def saved_summary(self) -> str:
        """What must be equal on every rank of this hook's state: the step count and the kept buckets."""
        return repr((self.steps, self.names is None, sorted((repr(k), e["shapes"]) for k, e in self.buckets.items())))

    def _end_step(self) -> None:
        if self.step_bad is None:
            for key, entry in self.created.items():
                self.buckets[key] = entry
            for key, new_state in self.pending.items():
                if key in self.buckets:
                    self.buckets[key]["state"] = new_state
            self.steps += 1
        else:
            self.skipped_steps.append((self.steps, self.step_bad))
        self.pending.clear()
        self.created.clear()
        self.step_bad = None
        self.late = None

    #: Version of ``state_dict``'s layout; 2: registered record tags and a checksum (older ones are refused).

    def state_dict(self) -> dict[str, Any]:
        """Plain containers of tensors (loads with ``torch.load(..., weights_only=True)``) with a SHA-256 checksum:
        ``compressors.ddp.state_io``."""
        return hook_state_dict(self)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output. Untrusted input: records are rebuilt only from registered types,
        the checksum is verified, and every bucket's state must have the structure (record types, keys, shapes,
        dtypes) that this aggregator's fresh state for that bucket has; anything else is a ValueError naming it.
        Nothing is changed unless all of it is valid. The states are loaded on the CPU and each moves to its
        bucket's device when the bucket is first aggregated."""
        restored = checked_hook_state(saved, self.aggregator, named=self.names is not None)
        self.seed, self.calls, self.steps, self.buckets = restored
        self.verified = False  # the ranks' loaded states are compared at the next bucket


class BucketView(NamedTuple):
    """What the aggregation needs of a ``dist.GradBucket``, read on DDP's thread when the hook is called."""

    index: int
    is_last: bool
    buffer: torch.Tensor  # (total,) flat gradients
    params: list[torch.Tensor]
    gradients: list[torch.Tensor]  # views of buffer, in the parameters' shapes


def born_at(aggregator: Aggregator, state: Any, step: int) -> Any:
    """A state created at optimizer step ``step`` counts its warm-up from that step (torch's hook keeps one
    iteration counter for every bucket; a bucket rebuilt by DDP must not start its warm-up over)."""
    if isinstance(aggregator, Warmup):
        return state._replace(step=step)
    return state


def nan_like(buffer: torch.Tensor) -> torch.Tensor:
    """The result of a skipped step: NaN everywhere, in the buffer's layout (a sparse buffer gets NaN rows)."""
    if buffer.layout == torch.strided:
        return torch.full_like(buffer, float("nan"))
    dense = torch.full(buffer.shape, float("nan"), dtype=buffer.dtype, device=buffer.device)
    return dense.to_sparse(buffer.sparse_dim())


def placed_like(loaded: Any, fresh: Any) -> Any:
    """``loaded`` with every tensor on the device of the tensor at the same place in ``fresh`` (a fresh state
    of the same structure on the bucket's device: RNG states stay where the compressor keeps them)."""
    if isinstance(loaded, torch.Tensor):
        return loaded.to(fresh.device) if isinstance(fresh, torch.Tensor) else loaded
    if isinstance(loaded, tuple) and hasattr(loaded, "_fields"):  # a NamedTuple record
        return type(loaded)(*(placed_like(a, b) for a, b in zip(loaded, fresh)))
    if dataclasses.is_dataclass(loaded) and not isinstance(loaded, type):
        return dataclasses.replace(loaded, **{f.name: placed_like(getattr(loaded, f.name), getattr(fresh, f.name))
                                              for f in dataclasses.fields(loaded) if f.init})
    if isinstance(loaded, dict):
        return {k: placed_like(v, fresh[k]) if k in fresh else v for k, v in loaded.items()}
    if isinstance(loaded, (list, tuple)):
        return type(loaded)(placed_like(a, b) for a, b in zip(loaded, fresh))
    return loaded


def ddp_comm_hook(aggregator: Aggregator | str, *, seed: int = 0, process_group=None, timeout: float = 60.0,
                  keep_records: bool = False, model: torch.nn.Module | None = None, overlap: bool = True,
                  **options):
    """``(state, hook)`` for ``DistributedDataParallel.register_comm_hook``.

    aggregator: an Aggregator, or a registered name with its ``options`` (``ddp_comm_hook("powersgd", rank=2)``).
    seed: the aggregator's shared seed (must be equal on every rank: checked on the first bucket).
    process_group: DDP's group; the hook's collectives run on a group of its own over the same ranks, made here
    (``dist.new_group``: build the hook on every rank, in the same order) or, before ``init_process_group``,
    at the first bucket. timeout: that group's timeout, seconds any collective may take.
    keep_records: keep every ledger record in ``state.comm.ledger`` (otherwise totals only: flat memory).
    model: the trained module (recommended): names each bucket's tensors and keys its state stably.
    overlap: aggregate on a communication thread while the backward pass goes on (True), or inside the hook.
    Call ``state.close()`` when done (the thread is a daemon: an unclosed one never blocks the exit).
    """
    if isinstance(aggregator, str):
        aggregator = make(aggregator, **options)
    elif options:
        raise ValueError(f"ddp_comm_hook: options {sorted(options)} are invalid with an Aggregator; "
                         "allowed: options only with a registered name")
    if not isinstance(aggregator, Aggregator):
        raise ValueError(f"ddp_comm_hook: aggregator={aggregator!r} is invalid; allowed: an Aggregator or a name")
    if not isinstance(overlap, bool):
        raise ValueError(f"ddp_comm_hook: overlap={overlap!r} is invalid; allowed: True or False")
    return HookState(aggregator, seed, process_group, timeout, keep_records, model, overlap), hook


def hook(state: HookState, bucket) -> torch.futures.Future[torch.Tensor]:
    """Hand one bucket to the communication thread (or aggregate it here with ``overlap=False``); returns
    the future of the bucket's flat result."""
    buffer = bucket.buffer()
    view = BucketView(bucket.index(), bucket.is_last(), buffer, bucket.parameters(), bucket.gradients())
    state.connect()  # on DDP's thread, in program order: where the hook's group is made if not made yet
    if not state.overlap:
        future = result_future(buffer.device)
        future.set_result(state.aggregate_bucket(view))
        return future
    if buffer.is_cuda:  # a CUDA-aware future: DDP's stream waits for the thread's work on the result
        future = result_future(buffer.device)
        ready = torch.cuda.Event()
        ready.record()  # the gradients were queued on this thread's current stream
        job = functools.partial(_on_cuda, state, view, ready)
    else:
        future = torch.futures.Future()
        job = functools.partial(state.aggregate_bucket, view)
    state.worker.submit(job, future)
    return future


def result_future(device: torch.device) -> torch.futures.Future:
    """The future of a bucket's result: CUDA-aware for a CUDA bucket (``set_result`` records an event on the
    current stream and DDP's stream waits for it, as with ``work.get_future()``), plain otherwise."""
    if device.type == "cuda":
        return torch.futures.Future(devices=[device])
    return torch.futures.Future()


def _on_cuda(state: HookState, view: BucketView, ready) -> torch.Tensor:
    with torch.cuda.device(view.buffer.device):
        torch.cuda.current_stream().wait_event(ready)
        return state.aggregate_bucket(view)
