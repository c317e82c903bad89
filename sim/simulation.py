"""One simulated step: ``Simulation`` (the pieces of a run built from an Experiment) and ``TrainState``.

One step: each worker's batch -> per-worker gradients (W, *shape) -> non-finite check -> aggregator (through
``comm``, which records every collective) -> optional clipping of the aggregated update (clip_grad_norm) ->
the optimizer on the shared parameters -> metrics. Everything the loop
carries is in ``TrainState``, so a checkpoint is that record and a resumed run continues bitwise.

The same step runs on real processes: ``comm`` is then a torch.distributed collective and ``local_workers``
the global worker ids this process emulates (``sim.run_distributed``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, NamedTuple

import torch

from compressors.comm import VirtualCollective
from compressors.degenerate import warn_if_dense
from compressors.options import check_choice, invalid
from compressors.serialization import register_record
from compressors.state_tree import float_leaves, memory_tensors, squared_norm
from .cost import price_step, resolve_network
from .engine import evaluate, make_engine
from .experiment import Experiment
from .models import build
from .optim import AdamState, SGDState, clip_by_global_norm
from .sharding import BatchSampler, make_shards
from .tasks import Task, load_task, split_validation

Tensors = dict[str, torch.Tensor]
DATA_FIELDS = ("train_x", "train_y", "test_x", "test_y", "val_x", "val_y")  # a Task's tensors, moved once
EVAL_SPLITS = ("test", "validation")


@register_record
class TrainState(NamedTuple):
    step: int  # steps completed
    params: Tensors  # (*shape), one copy shared by all workers
    buffers: Tensors  # (k, *shape), per worker
    optimizer: SGDState | AdamState  # the state of Experiment.optimizer
    aggregator: Any  # the compressor's nested state
    bits: int  # cumulative payload bits sent per worker
    skipped_steps: int  # steps dropped by nonfinite="skip_step"
    sim_time: float  # cumulative simulated seconds (0 without a network)


class NonFiniteGradientError(FloatingPointError):
    """A worker produced a NaN/Inf gradient and the experiment's policy is nonfinite="raise"."""


class Simulation:
    """The pieces of a run built from an Experiment (task data, model, engine, aggregator, sampler)."""

    def __init__(self, experiment: Experiment, comm=None, local_workers: range | None = None):
        self.experiment = e = experiment
        self.comm = comm if comm is not None else VirtualCollective(e.workers, keep_records=e.keep_ledger)
        if self.comm.workers != e.workers:
            raise ValueError(f"run: comm.workers={self.comm.workers} does not match Experiment.workers={e.workers}")
        self.local_workers = local_workers if local_workers is not None else range(e.workers)
        self.device = check_device(e.torch_device)
        task: Task = load_task(e.task, dict(e.task_options), e.torch_dtype)
        if e.validation_fraction > 0:  # a fixed split, the same for every seed (sim/tasks/split.py)
            task = split_validation(task, e.validation_fraction)
        if e.workers > len(task.train_x):  # every worker needs at least one sample of its own
            raise ValueError(f"Experiment: workers={e.workers!r} is invalid for task {e.task!r}; allowed: at most "
                             f"its {len(task.train_x)} training samples")
        # The data moves to the device once; labels for sharding stay where the task made them (read once, on
        # the host). Batches are drawn as indices on the CPU and gathered on the device.
        self.task = dataclasses.replace(task, **{name: getattr(task, name).to(self.device) for name in DATA_FIELDS
                                                 if getattr(task, name) is not None})
        self.model = build(task.model, e.seed, device=self.device, dtype=e.torch_dtype)
        self.engine = make_engine(e.engine, self.model, self.task.loss)
        self.aggregator = e.make_compressor()
        shards = make_shards(task.labels if task.labels is not None else torch.zeros(len(task.train_x)),
                             e.workers, e.sharding, e.label_skew_alpha, e.seed)
        self.sampler = BatchSampler(shards, e.batch_size, e.seed)
        self.shapes = {name: tuple(p.shape) for name, p in self.model.named_parameters()}
        self.optimizer = e.make_optimizer(self.shapes)  # parameter names resolve weight_decay_exclude
        self.last_metrics: dict[str, float] = {}  # the latest step's metrics, for on_step callbacks (see run)
        if e.compressor.get("name") != "identity":  # the exact all-reduce is the dense baseline, not degenerate
            warn_if_dense(self.aggregator, self.shapes, f"compressor {dict(e.compressor)}", e.torch_dtype)
        self.network = None
        if e.network is not None:
            self.network = resolve_network(e.network)

    def initial_state(self) -> TrainState:
        e = self.experiment
        params = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        if self.task.zero_init:
            params = {name: torch.zeros_like(p) for name, p in params.items()}
        k = len(self.local_workers)
        buffers = {name: b.detach().unsqueeze(0).repeat(k, *([1] * b.dim())) for name, b in self.model.named_buffers()}
        agg_state = self.aggregator.init(self.shapes, workers=k, seed=e.seed, dtype=e.torch_dtype, device=self.device)
        return TrainState(0, params, buffers, self.optimizer.init(params), agg_state, 0, 0, 0.0)

    # -- one step ----------------------------------------------------------------------------------------
    def step(self, state: TrainState) -> tuple[TrainState, dict[str, float]]:
        """One step. The host waits for the device at most twice in the common case (``read_scalars``): once for
        the train loss with a finiteness probe of every gradient (the compressor must not see a non-finite one),
        once for every probe and metric of the result (update, compressor state, parameters and optimizer state,
        memory norm, compression error). Explaining a non-finite value costs more reads, only then."""
        e, comm = self.experiment, self.comm
        indices = self.sampler.batch(self.local_workers, state.step)  # (k, B), drawn on the host
        if self.device.type == "cuda":  # a blocking copy from pageable memory would wait for the previous step
            indices = indices.pin_memory()
        indices = indices.to(self.device, non_blocking=True)
        x, y = self.task.train_x[indices], self.task.train_y[indices]
        with self.autocast():
            grads, losses, buffers = self.engine.gradients(state.params, state.buffers, x, y)
        metrics = {"step": state.step + 1, "lr": e.learning_rate(state.step)}
        # One read of each (k, *shape) gradient serves both the finiteness check (a non-finite element makes
        # its column sum non-finite) and, below, the exact mean the compression error is measured against.
        sums = {name: g.sum(0) for name, g in grads.items()}  # (*shape)
        loss, *probes = read_scalars([losses.mean(), *(s.sum() for s in sums.values())])
        bad = confirmed_nonfinite(grads, probes)
        # The mean train loss travels with the vote: one collective (one synchronisation point) for both.
        metrics["train_loss"], anywhere = self._average_many([loss, 1.0 if bad else 0.0])
        if anywhere > 0:  # checked before the compressor sees the gradients: its state stays clean
            return self._skip(state, metrics, f"non-finite gradient in {bad or 'another process'}")
        comm.ledger.begin_step()
        update, agg_state = self.aggregator.aggregate(grads, state.aggregator, comm)
        # clip_grad_norm clips the aggregated update, identical on every worker (no collective); the compression
        # error below is measured on the update applied, clipped or not.
        applied, update_norm = (clip_by_global_norm(update, e.clip_grad_norm) if e.clip_grad_norm is not None
                                else (update, None))
        # Taken before the result is known to be finite (its checks share one read); dropped if it is not.
        params, opt_state = self.optimizer.step(state.params, applied, state.optimizer, metrics["lr"])
        leaves = dict(float_leaves(agg_state))  # path -> tensor
        squares = {path: squared_norm(t) for path, t in leaves.items()}  # one read each: check and memory norm
        square_of = {id(t): squares[path] for path, t in leaves.items()}
        memories = memory_tensors(agg_state)
        # A finite update can still overflow the parameters or the optimizer's state (lr * update beyond the
        # dtype's range, a squared update in Adam's second moment). Both are identical on every process (the
        # update is), so all decide alike unvoted. SGD without momentum keeps its zero buffers: nothing to check.
        moving = e.optimizer != "sgd" or e.momentum
        after = {**params, **({f"optimizer {n}": t for n, t in float_leaves(opt_state)} if moving else {})}
        every = e.compression_error_every
        measured = every > 0 and (state.step + 1) % every == 0
        errors = self._compression_error_terms(grads, sums, applied) if measured else []
        norms = [update_norm] if update_norm is not None else []
        values = read_scalars([*(u.sum() for u in update.values()), *squares.values(),
                               *(square_of[id(m)] if id(m) in square_of else squared_norm(m)
                                 for m in memories), sum_probe(after), *norms, *errors])
        update_probes, values = values[:len(update)], values[len(update):]
        leaf_probes, values = values[:len(leaves)], values[len(leaves):]
        memory_squares, values = values[:len(memories)], values[len(memories):]
        after_probe, norms, errors = values[0], values[1:1 + len(norms)], values[1 + len(norms):]
        if norms:
            metrics["update_norm"] = norms[0]
        bad = confirmed_nonfinite(update, update_probes) + [
            f"state {path}" for path in confirmed_nonfinite(leaves, leaf_probes)]
        # The memory norm's squared sum travels with the second vote (one collective for both).
        memory_square, anywhere = self._average_many([memory_sum(memories, memory_squares), 1.0 if bad else 0.0])
        if anywhere > 0:  # finite gradients, non-finite result: an overflow inside the compressor
            return self._skip(state, metrics, f"non-finite compressor output in {bad or 'another process'} from "
                                              "finite gradients (an overflow, e.g. of a 16-bit cast or factor)")
        if not math.isfinite(after_probe) and nonfinite(after):
            return self._skip(state, metrics, f"non-finite parameter after the optimizer step in {nonfinite(after)} "
                                              f"(an overflow of lr={metrics['lr']:g} times the update)")
        bits = state.bits + sum(r.bits for r in comm.ledger.step_records)
        sim_time = state.sim_time
        if self.network is not None:
            sim_time += price_step(self.network, comm.ledger.step_records, e.workers)
            metrics["sim_time"] = sim_time
        metrics.update(bits=bits, compression_error=relative_error(errors) if measured else math.nan,
                       memory_norm=math.sqrt(memory_square), skipped_steps=state.skipped_steps)
        # An aggregator may report scalars of its own state (e.g. PowerSGD's current ``rank``): an optional
        # ``metrics(state) -> {column: float}`` method, merged into the row. Values must be identical on every
        # worker (they come from the shared state), so real runs log the same columns.
        reported = getattr(self.aggregator, "metrics", None)
        if reported is not None:
            metrics.update({key: float(value) for key, value in reported(agg_state).items()})
        return TrainState(state.step + 1, params, buffers, opt_state, agg_state, bits,
                          state.skipped_steps, sim_time), metrics

    def autocast(self):
        """The context gradients are computed in: ``torch.autocast`` for ``Experiment.autocast``, else none."""
        dtype = self.experiment.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _average_many(self, values: list[float]) -> list[float]:
        """The mean of each value over processes (itself in one process), in one collective where the comm offers
        ``average_metrics``.
        Real runs must all skip or raise together (or they deadlock): a vote of 1.0/0.0 averaged > 0 means
        some process found a problem."""
        many = getattr(self.comm, "average_metrics", None)
        if many is not None:
            return list(many(values))
        one = getattr(self.comm, "average_metric", None)  # a comm with only the one-value form
        return [one(v) if one is not None else v for v in values]

    def _skip(self, state: TrainState, metrics: dict[str, float], what: str) -> tuple[TrainState, dict[str, float]]:
        """nonfinite="raise": raise naming the step and tensors; "skip_step": keep the state, count the step."""
        if self.experiment.nonfinite == "raise":
            raise NonFiniteGradientError(f"step {state.step + 1}: {what} (Experiment.nonfinite='raise'; "
                                         "use 'skip_step' to drop such steps)")
        skipped = state._replace(step=state.step + 1, skipped_steps=state.skipped_steps + 1)
        metrics.update(bits=state.bits, compression_error=math.nan, memory_norm=math.nan,
                       skipped_steps=skipped.skipped_steps)
        if self.network is not None:
            metrics["sim_time"] = state.sim_time
        return skipped, metrics

    def evaluate(self, state: TrainState, split: str = "test") -> tuple[float, float]:
        """Loss and accuracy (NaN for regression) on the "test" split or the "validation" one (held out of the
        training set by ``Experiment.validation_fraction``), with this process's first worker's BatchNorm
        statistics (worker 0 on rank 0, like DDP's broadcast_buffers)."""
        check_choice("Simulation.evaluate", "split", split, EVAL_SPLITS)
        x, y = (self.task.test_x, self.task.test_y) if split == "test" else (self.task.val_x, self.task.val_y)
        if x is None:
            raise invalid("Simulation.evaluate", "split", split, "'test' (this run has no validation split: set "
                                                                 "Experiment.validation_fraction > 0)")
        buffers = {name: b[0] for name, b in state.buffers.items()}
        with self.autocast():  # the model computes as in training (bf16 regions under Experiment.autocast)
            return evaluate(self.model, state.params, buffers, x, y, self.task.loss, self.task.classification)

    # -- metrics -----------------------------------------------------------------------------------------
    def _compression_error_terms(self, grads: Tensors, sums: Tensors, update: Tensors) -> list[torch.Tensor]:
        """The squared norms behind the ``compression_error`` column (``relative_error``): ||update - mean_i
        g_i||^2 then ||mean_i g_i||^2 per parameter, as 0-d tensors, so they are read with the step's other
        scalars. The column is the relative error of the update every worker applies against the exact mean of
        this step's gradients (0 for the exact mean). The update includes the error-feedback memory added back
        (C(g_i + e_i)), so with error feedback it measures the applied step's deviation, not the compressor's
        error on g alone.

        ``sums[name]``: this process's g.sum(0). The exact mean is sums / k here, or a real all-reduce without
        a ledger record on real processes (a measurement, not traffic). Squared norms by ``squared_norm``
        (chunked float32 partial sums added in float64: ~1e-7 relative, no float64 copies).
        """
        untracked = getattr(self.comm, "average_untracked", None)  # real processes: the mean over all of them
        errors, references = [], []
        for name, g in grads.items():
            exact = untracked(g) if untracked is not None else sums[name] / g.shape[0]  # (*shape)
            u = update[name]
            if exact.dtype not in (torch.float32, torch.float64) or u.dtype != exact.dtype:
                exact, u = exact.double(), u.double()  # 16-bit: subtract in float64, not in the 16-bit type
            errors.append(squared_norm(u - exact))
            references.append(squared_norm(exact))
        return errors + references


def nonfinite(tensors: Tensors, probes: Tensors | None = None) -> list[str]:
    """Names of the tensors holding a NaN/Inf, in one read of each in the common case.

    ``probes[name]`` is a reduction of ``tensors[name]`` that is non-finite whenever an element is (its sum,
    the sum of its column sums, its squared norm; default: its sum). A finite probe proves every element
    finite; a non-finite one (a bad element, or an overflow of finite ones) falls back to the exact
    elementwise test. Same answer as ``torch.isfinite(t).all()`` per tensor (4 passes and two masks).
    """
    bad = []
    for name, t in tensors.items():
        probe = t.sum() if probes is None else probes[name]
        if not math.isfinite(float(probe)) and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


def check_device(device: torch.device) -> torch.device:
    """``device`` if this machine has it; ValueError naming Experiment.device otherwise (before any work)."""
    if device.type in ("cpu", "meta"):
        return device
    module = getattr(torch, device.type, None)
    available = getattr(module, "is_available", None)
    count = getattr(module, "device_count", None)
    if available is None or not available() or (device.index is not None and count is not None
                                                 and device.index >= count()):
        raise ValueError(f"Experiment: device={str(device)!r} is invalid on this machine; allowed: 'cpu', 'meta'"
                         + (f" or {device.type}:0..{count() - 1}" if available is not None and available()
                            and count is not None else f" (no {device.type} device here)"))
    return device


def read_scalars(values: list[torch.Tensor]) -> list[float]:
    """0-d tensors as Python floats in one transfer (one wait for the device): stacked in float64 (exact for
    float32 values), so each float equals ``float(value)``. Tensors on several devices are read per device."""
    if not values:
        return []
    devices = {v.device for v in values}
    if len(devices) > 1:
        return [float(v) for v in values]
    return torch.stack([v.detach().reshape(()).to(torch.float64) for v in values]).tolist()


def confirmed_nonfinite(tensors: Tensors, probes: list[float]) -> list[str]:
    """``nonfinite`` with its probes already read: names whose probe is non-finite and which hold a NaN/Inf."""
    return [name for (name, t), probe in zip(tensors.items(), probes)
            if not math.isfinite(probe) and not bool(torch.isfinite(t).all())]


def sum_probe(tensors: Tensors) -> torch.Tensor:
    """A 0-d float64 tensor finite only if every element of every tensor is (the sum of their sums); the
    probe of ``nonfinite_any``."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([t.sum().to(torch.float64) for t in tensors.values()]).sum()


def memory_sum(memories: list[torch.Tensor], squares: list[float]) -> float:
    """This process's memory_norm**2 before the average over processes (``compressors.memory_norm``: sum over
    memories of ||m||^2 / rows), from their squared norms already read."""
    total = 0.0
    for m, value in zip(memories, squares):
        if not math.isfinite(value):  # a float32 overflow of a finite residual: redo it exactly
            value = float(m.double().pow(2).sum())
        total += value / max(m.shape[0], 1)
    return total


def relative_error(terms: list[float]) -> float:
    """sqrt(sum of errors / sum of references) from ``Simulation._compression_error_terms``' read values (the
    errors then the references), summed in order; sqrt(errors) when the reference is 0."""
    half = len(terms) // 2
    err, ref = 0.0, 0.0
    for value in terms[:half]:
        err += value
    for value in terms[half:]:
        ref += value
    return math.sqrt(err / ref) if ref > 0 else math.sqrt(err)


def nonfinite_any(tensors: Tensors) -> list[str]:
    """``nonfinite`` with one device synchronisation in the common all-finite case: the sum of every tensor's
    sum is finite only if every element is (a non-finite sum falls back to the per-tensor test)."""
    if not tensors:
        return []
    return [] if math.isfinite(float(sum_probe(tensors))) else nonfinite(tensors)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite (``nonfinite`` for one tensor)."""
    return not nonfinite({"": t})
