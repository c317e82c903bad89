"""``sim.run_distributed``: the same experiment on real ``torch.distributed`` processes.

    result = sim.run_distributed(experiment, nproc=2, backend="gloo", workers_per_process=2)  # 4 workers

Each of ``nproc`` spawned processes emulates ``k = workers_per_process`` workers (global ids
``rank * k ... rank * k + k - 1``) and runs ``sim.run`` with a ``DistributedCollective``: the same data
shards, seeds, model initialisation and aggregator code as the single-process simulator, the mean over
workers being a local row sum plus a real all-reduce. Rank 0's ``Result`` comes back, with ``buffers``
gathered from every process (W, ...) as in ``sim.run``.

``spawn`` is the underlying launcher (also used by the tests): fresh processes (start method "spawn"), a
process group (file rendezvous in a fresh temporary directory), one deadline for the whole run, and a clear error naming the rank
when any process raises, dies or hangs; the survivors are terminated, never left behind.

What the processes hand back is data, never code: each rank's return value is saved with ``torch.save`` and read
with ``torch.load(weights_only=True)`` (tensors, numbers, strings and containers of them; a ``Result`` travels
as plain containers and is rebuilt here). The temporary directory is private (mode 0700, owned by this user) and
made only where no other user can swap it: a ``TMPDIR`` that other users may write without the sticky bit is
refused with an error naming it.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import stat
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pandas as pd
import torch

from compressors.comm import DistributedCollective
from compressors.serialization import from_plain, to_plain
from .. import checkpoint
from ..experiment import Experiment, registering_modules
from ..result import Result
from ..runner import run
from .link import ShapedLink, enter_namespace, shaped_namespace

BACKENDS = ("gloo", "nccl")


class DistributedRunError(RuntimeError):
    """A process of a distributed run raised, died or did not finish before the deadline."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable[..., Any], nproc: int, args: tuple = (), *, backend: str = "gloo", timeout: float = 600.0,
          collective_timeout: float = 60.0, threads: int | None = None,
          link: str | ShapedLink | None = None) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``nproc`` fresh processes with an initialized process group.

    Returns every rank's return value (``None`` for a rank that exited early). ``fn`` must be importable
    (a module-level function). ``timeout`` bounds the whole run; ``collective_timeout`` is the process
    group's own timeout. ``threads``: intra-op threads per process (default: the cores shared out).
    ``link``: run the ranks inside a private network namespace whose loopback is shaped to this rate
    (``"100mbit"``, ``"1gbit"``; sim/real/link.py; root and iproute2 needed, gloo only), removed afterwards.
    """
    if link is None:
        return _spawn(fn, nproc, args, backend, timeout, collective_timeout, threads, None)
    link = ShapedLink.parse(link)
    if backend != "gloo":
        raise ValueError(f"spawn: link={link.label()!r} is invalid with backend={backend!r}; allowed: backend='gloo' "
                         "(NCCL does not route through the shaped loopback)")
    with shaped_namespace(link) as namespace:
        return _spawn(fn, nproc, args, backend, timeout, collective_timeout, threads, namespace)


def _spawn(fn, nproc, args, backend, timeout, collective_timeout, threads, namespace) -> list[Any]:
    import torch.multiprocessing as mp

    _check_int("spawn", "nproc", nproc, 1)
    if backend not in BACKENDS:
        raise ValueError(f"spawn: backend={backend!r} is invalid; allowed: {', '.join(BACKENDS)}")
    threads = threads if threads is not None else max(1, (os.cpu_count() or 1) // nproc)
    with private_directory("spawn") as outdir:
        # Rendezvous through a file in our own fresh directory, not a "free" TCP port: a port found free can be
        # taken by another process before rank 0 binds it (a race under parallel test workers).
        rendezvous = "file://" + os.path.join(outdir, "rendezvous")
        context = mp.start_processes(_child, args=(fn, nproc, rendezvous, backend, collective_timeout, threads,
                                                   outdir, args, namespace), nprocs=nproc, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    alive = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
                    raise DistributedRunError(f"spawn: ranks {alive} of {nproc} did not finish within timeout="
                                              f"{timeout:g}s (hung); they were terminated")
        except DistributedRunError:
            _terminate(context.processes)
            raise
        except Exception as error:  # ProcessRaisedException / ProcessExitedException: one rank failed
            _terminate(context.processes)
            raise DistributedRunError(f"spawn: a process of {nproc} failed; the others were terminated.\n{error}") from error
        return [_read_result(outdir, rank) for rank in range(nproc)]


def _read_result(outdir: str, rank: int) -> Any:
    """A rank's return value, read as data only (``weights_only=True``: nothing in the file is imported or called)."""
    path = os.path.join(outdir, f"rank{rank}.pt")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise DistributedRunError(f"spawn: the result of rank {rank} is not a regular file")
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as error:
            raise DistributedRunError(f"spawn: the result of rank {rank} is invalid; allowed: tensors, numbers, "
                                      "strings, None and lists/tuples/dicts of them (a rank's return value is read "
                                      f"as data only): {str(error).splitlines()[0] if str(error) else type(error).__name__}"
                                      ) from None


@contextlib.contextmanager
def private_directory(owner: str) -> Iterator[str]:
    """A fresh temporary directory only this user can enter (0700), removed on exit. Refused (ValueError) where
    another user could rename it away and plant their own in its place: a temporary-files folder (``TMPDIR``)
    that is writable by others without the sticky bit, or owned by another user (not root)."""
    base = tempfile.gettempdir()
    info = os.stat(base)
    shared = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX
    if shared or info.st_uid not in (0, os.getuid()):
        raise ValueError(f"{owner}: the temporary directory {base!r} (TMPDIR) is invalid; allowed: a directory "
                         "only you can write, or one with the sticky bit like /tmp (other users can replace files "
                         "in this one); e.g. TMPDIR=$HOME/tmp")
    with tempfile.TemporaryDirectory(prefix="sim-dist-") as path:
        made = os.lstat(path)
        if not stat.S_ISDIR(made.st_mode) or made.st_uid != os.getuid() or stat.S_IMODE(made.st_mode) & 0o077:
            raise ValueError(f"{owner}: the private directory {path!r} is not private (owner, mode); allowed: a "
                             "TMPDIR only you can write")
        yield path


def _child(rank, fn, world, init_method, backend, collective_timeout, threads, outdir, args, namespace=None):
    import faulthandler

    import torch.distributed as dist

    if namespace is not None:  # the shaped link: every socket of this rank goes through the namespace's loopback
        enter_namespace(namespace)
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # the namespace has no other interface
    # A rank killed by a signal (a C++ abort in a backend) prints every thread's Python stack to stderr, so
    # the parent's "terminated with signal" error comes with where that rank was.
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=collective_timeout))
    result = fn(rank, world, *args)
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    exit_without_finalizers()


def exit_without_finalizers() -> None:
    """End a finished rank process now, skipping interpreter finalization: there, a backend thread still
    running when C++ static objects are destroyed aborts the process ("terminate called without an active
    exception", SIGABRT, no Python frame; seen about once in a few hundred gloo process exits on this
    machine), which would fail a run whose results are already saved. Call it only after the results are
    written and the process group destroyed."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _terminate(processes) -> None:
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


# -- experiments ---------------------------------------------------------------------------------------------
def run_distributed(experiment: Experiment | Sequence[Experiment], *, nproc: int = 2, backend: str = "gloo",
                    workers_per_process: int | None = None, timeout: float = 600.0,
                    collective_timeout: float = 60.0, threads: int | None = None, checkpoint_dir=None,
                    checkpoint_every: int | None = None, resume_from=None,
                    link: str | ShapedLink | None = None) -> Result | list[Result]:
    """Run an Experiment (or several, one after the other in the same processes) on ``nproc`` processes.

    ``workers_per_process`` defaults to ``experiment.workers // nproc`` and must satisfy
    ``nproc * workers_per_process == experiment.workers``. Returns rank 0's Result (a list for a list).

    ``checkpoint_dir``/``checkpoint_every``/``resume_from`` (one Experiment only): as in ``sim.run``, every
    process writing its own workers' checkpoints into the shared directory (``checkpoint-<step>-w<a>-<b>.pt``).
    ``resume_from`` must be that directory: the processes agree on the newest step that every one of them
    holds (a crash can land between two processes' writes) and all continue from it, bitwise as if never
    interrupted.

    ``link``: the processes talk over a real link of this rate (``"100mbit"``, ``"1gbit"``): a private network
    namespace whose loopback is shaped by a token bucket (sim/real/link.py; root and iproute2 needed; gloo).
    ``result.extras["link"]`` names it. Without it, the processes use this machine's unshaped loopback.
    """
    experiments = [experiment] if isinstance(experiment, Experiment) else list(experiment)
    if not experiments or not all(isinstance(e, Experiment) for e in experiments):
        raise ValueError("run_distributed: experiment is invalid; allowed: an Experiment or a list of them")
    _check_int("run_distributed", "nproc", nproc, 1)
    checkpoint.check_options(checkpoint_dir, checkpoint_every, resume_from)
    checkpointing = {"checkpoint_dir": checkpoint_dir, "checkpoint_every": checkpoint_every,
                     "resume_from": resume_from}
    if (checkpoint_dir is not None or resume_from is not None) and len(experiments) != 1:
        raise ValueError("run_distributed: checkpoint_dir/resume_from are invalid with a list of experiments; "
                         "allowed: one Experiment")
    if resume_from is not None and not os.path.isdir(resume_from):
        raise ValueError(f"run_distributed: resume_from={str(resume_from)!r} is invalid; allowed: an existing "
                         "checkpoint directory (every process reads its own workers' files there)")
    ks = []
    for e in experiments:
        k = workers_per_process if workers_per_process is not None else e.workers // nproc
        _check_int("run_distributed", "workers_per_process", k, 1)
        if k * nproc != e.workers:
            raise ValueError(f"run_distributed: workers_per_process={k} is invalid for nproc={nproc} and "
                             f"Experiment.workers={e.workers}; allowed: nproc * workers_per_process == workers")
        ks.append(k)
    if checkpoint_dir is not None:  # writable and this configuration's, before any process starts
        checkpoint.claim(checkpoint_dir, experiments[0])
    if resume_from is not None:  # refuse unusable checkpoints here, before any process starts
        common_checkpoint_step(resume_from, experiments[0], nproc, ks[0])

    shaped = ShapedLink.parse(link) if link is not None else None  # a bad rate fails here, before any process
    results = spawn(run_on_rank_as_data, nproc, (experiments, ks, collective_timeout, checkpointing,
                                                 registering_modules()),
                    backend=backend, timeout=timeout, collective_timeout=collective_timeout, threads=threads,
                    link=shaped)
    rebuilt = [result_from_data(data, e) for data, e in zip(results[0], experiments)]
    for result in rebuilt:
        result.extras["link"] = shaped.label() if shaped is not None else None
    return rebuilt[0] if isinstance(experiment, Experiment) else rebuilt


def run_on_rank_as_data(rank: int, world: int, *args) -> list[dict] | None:
    """``run_on_rank`` with rank 0's Results as plain data (``result_to_data``), for ``spawn`` to hand back."""
    results = run_on_rank(rank, world, *args)
    return None if results is None else [result_to_data(r) for r in results]


def result_to_data(result: Result) -> dict[str, Any]:
    """A Result as tensors, numbers, strings and containers (its state records tagged by their registered
    names, ``compressors.serialization``); the Experiment stays with the caller, who has it."""
    history = result.history
    return {"columns": [str(c) for c in history.columns],
            "history": {str(c): history[c].tolist() for c in history.columns},
            "params": dict(result.params), "buffers": dict(result.buffers),
            "bits_per_step": float(result.bits_per_step), "dense_bits_per_step": float(result.dense_bits_per_step),
            "wall_seconds": float(result.wall_seconds), "extras": to_plain(result.extras, "$.extras")}


def result_from_data(data: Any, experiment: Experiment) -> Result:
    """Inverse of ``result_to_data`` (records rebuilt only from the allow-list of registered types)."""
    if not isinstance(data, dict):
        raise DistributedRunError(f"run_distributed: rank 0 handed back {type(data).__name__}; allowed: a dict")
    history = pd.DataFrame(data["history"], columns=data["columns"])
    return Result(experiment, history, data["params"], data["buffers"], data["bits_per_step"],
                  data["dense_bits_per_step"], data["wall_seconds"], from_plain(data["extras"], "$.extras"))


def run_on_rank(rank: int, world: int, experiments: list[Experiment], ks: list[int],
                collective_timeout: float = 60.0, checkpointing: dict | None = None,
                imports: Sequence[str] = ()) -> list[Result] | None:
    """What each process runs (also ``python -m sim.launch`` under torchrun): returns rank 0's Results.
    ``checkpointing``: ``sim.run``'s checkpoint arguments (``resume_from`` a directory, see ``run_distributed``);
    ``imports``: modules that register the experiments' tasks or compressors (``sim.experiment.registering_modules``)."""
    import importlib

    for module in imports:
        try:
            importlib.import_module(module)
        except ImportError:  # not importable here: harmless unless an experiment names what it registers,
            pass             # which then fails with the usual "task=... is invalid" naming the choices

    out = []
    for e, k in zip(experiments, ks):
        comm = DistributedCollective(k, timeout=collective_timeout)
        options = {name: value for name, value in (checkpointing or {}).items() if value is not None}
        if "resume_from" in options:
            options["resume_from"] = agreed_checkpoint(options["resume_from"], e, comm)
        stamps: list[float] = []  # perf_counter after every step: per-step seconds without process start-up
        result = run(e, comm=comm, local_workers=comm.local_workers,
                     on_step=lambda _sim, _state: stamps.append(time.perf_counter()), **options)
        result.extras["step_seconds"] = [b - a for a, b in zip(stamps, stamps[1:])]  # steps 2..N (+ their evals)
        result.buffers = {name: _gather(comm, b) for name, b in result.buffers.items()}  # (W, *shape)
        result.extras.update(_summary(comm, result, world, k))
        out.append(result)
    return out if rank == 0 else None


def agreed_checkpoint(directory, experiment: Experiment, comm) -> str:
    """The checkpoint file of this process's workers at the newest step that EVERY process holds.

    Each process writes its own files; a crash between two processes' writes leaves some one checkpoint
    ahead (each keeps its newest ``checkpoint.KEEP``, so the others' newest is still there). Only valid files
    count (``checkpoint.valid_checkpoints``; a corrupt one is skipped with a warning). Two tiny
    collectives (``comm.gather_untracked``: the run's own wire device and timeout) agree on the step (the
    smallest of the processes' newest) and confirm that every process holds it. Every process takes part in
    both whatever it found (a directory it cannot read votes "none"), so all raise the same ValueError
    together when there is no common step: none is left waiting in a collective.
    """
    local, workers = comm.local_workers, experiment.workers
    try:  # only files that pass every check but the state's structure (sim.run checks that on loading)
        steps = sorted(step for step, _, _ in checkpoint.valid_checkpoints(directory, experiment, local))
        problem = ""
    except (OSError, ValueError) as error:  # unusable here: vote "none" (the others must not wait for us)
        steps, problem = [], f" ({type(error).__name__}: {error})"

    def smallest(value: float) -> float:
        votes = torch.full((comm.workers_per_process, 1), value, dtype=torch.float64)  # one row per local worker
        return float(comm.gather_untracked(votes).min())

    step = int(smallest(float(steps[-1]) if steps else -1.0))
    held = smallest(1.0 if step in steps else 0.0)
    if step < 0 or held < 1:
        raise ValueError(f"run_distributed: resume_from={str(directory)!r} is invalid; allowed: a directory where "
                         f"every process holds a checkpoint of one common step (newest common step: "
                         f"{step if step >= 0 else 'none'}; rank {comm.rank} holds steps {steps}{problem})")
    return os.path.join(directory, checkpoint.file_name(step, local, workers))


def common_checkpoint_step(directory, experiment: Experiment, nproc: int, k: int) -> int:
    """The newest step at which every process's workers have a valid checkpoint file in ``directory`` (read
    here, in one process; each file is checked as ``checkpoint.read`` does), or a ValueError naming why not."""
    held, reasons = [], []
    for rank in range(nproc):
        local = range(rank * k, rank * k + k)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            held.append({step for step, _, _ in checkpoint.valid_checkpoints(directory, experiment, local)})
        reasons += [str(w.message) for w in caught]
    common = set.intersection(*held)
    if not common:
        raise ValueError(f"run_distributed: resume_from={str(directory)!r} is invalid; allowed: a directory where "
                         f"every process holds a valid checkpoint of one common step (valid steps per process: "
                         f"{[sorted(h) for h in held]})" + "".join(f"; {r}" for r in reasons))
    for reason in reasons:
        warnings.warn(reason, stacklevel=3)
    return max(common)


def _gather(comm, x: torch.Tensor) -> torch.Tensor:
    """(k, *s) -> (W, *s) without a ledger record (the ledger holds only what the algorithm sent)."""
    return comm.gather_untracked(x)


def _summary(comm, result: Result, world: int, k: int) -> dict[str, Any]:
    """Where the run happened, what was sent, and the largest parameter difference between processes."""
    import torch.distributed as dist

    spread = 0.0
    for p in result.params.values():
        rows = _gather(comm, p.unsqueeze(0).expand(k, *p.shape))  # (W, *shape)
        spread = max(spread, float((rows - rows[0]).abs().max()) if rows.numel() else 0.0)
    return {"backend": dist.get_backend(), "nproc": world, "workers_per_process": k,
            "ledger_calls": comm.ledger.calls, "ledger_bits": comm.ledger.total_bits,
            "param_spread_across_processes": spread}


def _check_int(owner: str, field: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}: {field}={value!r} is invalid; allowed: an integer >= {minimum}")
