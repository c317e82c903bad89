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

Non-finite gradients and compressor failures (``hook_guard``): a NaN/Inf in any rank's bucket, or a
compressor raising on any rank, gives a NaN bucket on every rank (a GradScaler or skip-step guard sees it
everywhere) and leaves every bucket's state as it was before the step: new states are committed only when
the step's last bucket is in and no bucket of the step was bad. One untracked float64 all-reduce per bucket
carries the agreement. After a bad bucket the step's remaining buckets are NaN without communication.

Steps: the hook counts optimizer steps (a step is committed with its last bucket; a bad step is not a step).
A state created at step s, e.g. when DDP rebuilds its buckets after the first iteration, starts its warm-up
count (``start_compressing_after_num_steps``) at s, so compression starts at the requested step with any
number of buckets, as torch's hook (one iteration counter) does.

DDP rebuilds its buckets once after the first iteration (gradient-ready order). With ``model=`` a bucket
keeps its state when only its order changed; otherwise a bucket whose parameters changed gets a fresh state.
"""
# No `from __future__ import annotations`: DDP inspects the hook's real return annotation.
import functools
import weakref
from typing import Any, NamedTuple

import torch

from ..base import Aggregator
from ..comm import DistributedCollective
from ..policies import Warmup
from ..registry import make
from .guard import agree_bad, all_finite, guarded_aggregate
from .state_io import checked_hook_state, hook_state_dict
from .worker import HookWorker


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
        self.process_group = process_group
        self.timeout = timeout
        self.names = {id(p): n for n, p in model.named_parameters()} if model is not None else None
        self.comm = None  # a DistributedCollective, created on the first call (needs the process group)
        self.buckets: dict[Any, dict[str, Any]] = {}  # key -> {"shapes", "params" (ids), "state"}
        self.calls = 0
        self.steps = 0  # optimizer steps: steps whose every bucket was finite on every rank
        self.skipped_steps: list[tuple[int, str]] = []  # (step, why) of every step returned as NaN
        self.pending: dict[Any, Any] = {}  # key -> the new state of a bucket of the current step, not yet kept
        self.step_bad: str | None = None  # why the current step is bad (agreed by every rank), else None
        self.worker = HookWorker()
        weakref.finalize(self, self.worker.close, 0.0)  # a dropped state stops its thread

    def close(self) -> None:
        """Stop the communication thread after the buckets already handed over (idempotent)."""
        self.worker.close()

    def collective(self):
        if self.comm is None:
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
            fresh = self.aggregator.init({name: tuple(g.shape[1:]) for name, g in grads.items()}, workers=1,
                                         seed=self.seed, dtype=like.dtype, device=like.device)
            entry = {"shapes": shapes, "params": ids, "state": born_at(self.aggregator, fresh, self.steps)}
            self.buckets[key] = entry
        entry["params"] = ids
        return entry

    def aggregate_bucket(self, bucket: "BucketView") -> torch.Tensor:
        """The bucket's flat result (NaN if any rank's step is bad); commits the step with its last bucket."""
        try:
            flat = self._aggregate_bucket(bucket)
        except BaseException:
            self.pending.clear()  # the step is lost on this rank: keep the states from before it
            self.step_bad = None
            raise
        if bucket.is_last:
            self._end_step()
        return flat

    def _aggregate_bucket(self, bucket: "BucketView") -> torch.Tensor:
        buffer = bucket.buffer  # (total,), the concatenation of the bucket's gradients, in order
        comm = self.collective()
        if bucket.index == 0:  # DDP's first bucket of a step: the ledger's step_records then hold one step
            comm.ledger.begin_step()
        self.calls += 1
        if self.step_bad is not None:  # every rank knows: no communication for the rest of the step
            return torch.full_like(buffer, float("nan"))
        parts, bucket_order = self.bucket_parts(bucket.index, bucket.params, bucket.gradients)
        bad_input = not all_finite([buffer])
        failure = "non-finite gradient" if bad_input else None
        update: dict[str, torch.Tensor] = {}
        for key, grads in parts:
            members = bucket.params if self.names is None else [p for p in bucket.params if self.key_of(p) in grads]
            entry = self.bucket_state(key, members, grads)
            done = guarded_aggregate(self.aggregator, grads, entry["state"], comm, zeros=failure is not None)
            failure = failure or done.failure
            if done.update is not None:
                update.update(done.update)
                self.pending[key] = done.state
        flat = None
        if failure is None:
            flat = torch.cat([update[name].reshape(-1).to(buffer.dtype) for name in bucket_order])  # (total,)
            if flat.numel() != buffer.numel():
                raise RuntimeError(f"ddp_comm_hook: bucket {bucket.index} holds {buffer.numel()} elements but its "
                                   f"gradients {flat.numel()}: DDP's bucket layout is not the concatenation assumed")
            if not all_finite([flat]):
                failure = "non-finite result"
        if agree_bad(comm, failure is not None):
            self.step_bad = f"bucket {bucket.index}: " + (failure or "bad on another rank")
            return torch.full_like(buffer, float("nan"))
        return flat

    def _end_step(self) -> None:
        if self.step_bad is None:
            for key, new_state in self.pending.items():
                if key in self.buckets:
                    self.buckets[key]["state"] = new_state
            self.steps += 1
        else:
            self.skipped_steps.append((self.steps, self.step_bad))
        self.pending.clear()
        self.step_bad = None

    #: Version of ``state_dict``'s layout; 2: registered record tags and a checksum (older ones are refused).

    def state_dict(self) -> dict[str, Any]:
        """Plain containers of tensors (loads with ``torch.load(..., weights_only=True)``) with a SHA-256 checksum:
        ``compressors.ddp.state_io``."""
        return hook_state_dict(self)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output. Untrusted input: records are rebuilt only from registered types,
        the checksum is verified, and every bucket's state must have the structure (record types, keys, shapes,
        dtypes) that this aggregator's fresh state for that bucket has; anything else is a ValueError naming it.
        Nothing is changed unless all of it is valid."""
        restored = checked_hook_state(saved, self.aggregator, named=self.names is not None)
        self.seed, self.calls, self.steps, self.buckets = restored


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


def ddp_comm_hook(aggregator: Aggregator | str, *, seed: int = 0, process_group=None, timeout: float = 60.0,
                  keep_records: bool = False, model: torch.nn.Module | None = None, overlap: bool = True,
                  **options):
    """``(state, hook)`` for ``DistributedDataParallel.register_comm_hook``.

    aggregator: an Aggregator, or a registered name with its ``options`` (``ddp_comm_hook("powersgd", rank=2)``).
    seed: the aggregator's shared seed (must be equal on every rank). timeout: seconds any collective may take.
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
    if not state.overlap:
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(state.aggregate_bucket(view))
        return future
    if buffer.is_cuda:  # a CUDA-aware future: DDP's stream waits for the thread's work on the result
        future = torch.futures.Future(devices=[buffer.device])
        ready = torch.cuda.Event()
        ready.record()  # the gradients were queued on this thread's current stream
        job = functools.partial(_on_cuda, state, view, ready)
    else:
        future = torch.futures.Future()
        job = functools.partial(state.aggregate_bucket, view)
    state.worker.submit(job, future)
    return future


def _on_cuda(state: HookState, view: BucketView, ready) -> torch.Tensor:
    with torch.cuda.device(view.buffer.device):
        torch.cuda.current_stream().wait_event(ready)
        return state.aggregate_bucket(view)


# -- loading a saved hook state (untrusted data) ---------------------------------------------------------------
