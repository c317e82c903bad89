"""Checkpoints of a simulated run: written atomically, checksummed, validated on load, one directory per run.

    sim.run(experiment, checkpoint_dir="ckpt", checkpoint_every=100)   # checkpoint-000000100.pt, ...
    sim.run(experiment, resume_from="ckpt")                            # continues from the latest valid one

Checkpoints are read onto the CPU and their state moved to the resuming run's device (``placed_like``), so a
run checkpointed on one device resumes on another (``Experiment.device`` is a placement, not part of the
configuration). A checkpoint holds everything the loop carries (``TrainState``: parameters, per-worker buffers, optimizer
momentum, the compressor's nested state with error-feedback memory, warm-start factors and generator
states, cumulative bits, skipped steps, simulated time), the history rows logged so far and the ledger's
totals. Data order needs nothing: batches are a pure function of (seed, worker, step). So a resumed run's
history equals the uninterrupted run's bitwise.

Atomicity: the payload is written to a hidden temporary file in the same directory, flushed and fsynced,
then renamed over the final name with ``os.replace`` (atomic on POSIX and Windows). A crash mid-write
leaves at worst a stray ``.*.tmp`` file, which ``latest`` ignores and the next write of the same process's
files removes; earlier checkpoints are untouched.

Loading never runs anything named by the file: it is a ``torch.save`` of plain containers (dicts, lists,
tuples, numbers, strings, tensors; state records become tagged dicts rebuilt only from the registry of
``compressors.serialization``), read with ``torch.load(weights_only=True)``, and validated before use
(``sim.checkpoint_schema``: checksum, keys, experiment, step, rows, ledger, and the state's structure against
a fresh ``initial_state()``). A directory's newest invalid file is skipped with a warning for the newest valid
one. A directory belongs to one configuration: ``claim`` writes ``experiment.json`` there on first use and
refuses any other configuration afterwards, before any work.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import stat
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from compressors.comm import Ledger, LedgerRecord
from compressors.options import check_int
from compressors.serialization import digest, loads_json, to_plain
from .checkpoint_schema import (Checkpoint, FORMAT_VERSION, body_of, check_state, checked_rows, experiment_differences,
    validate)
from .experiment import Experiment
from .simulation import Simulation

KEEP = 2  # checkpoints kept per directory (the newest); older ones are removed after a successful write
MANIFEST = "experiment.json"  # the configuration a checkpoint directory belongs to
MAX_MANIFEST_BYTES = 1 << 20
_NAME = re.compile(r"^checkpoint-([0-9]{9})(-w[0-9]+-[0-9]+)?\.pt$", re.ASCII)
_TEMPORARY = re.compile(r"^\.checkpoint-[0-9]{9}(-w[0-9]+-[0-9]+)?\.pt\.[0-9]+\.tmp$", re.ASCII)  # ``save``'s first
#: How new files are created: never over an existing file or through a planted symbolic link.
CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
OPEN = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block a read


def _workers_part(local_workers: range | None, workers: int) -> str:
    """'' for a process running every worker; '-w<start>-<stop>' for one emulating a slice (real runs)."""
    if local_workers is None or local_workers == range(workers):
        return ""
    return f"-w{local_workers.start}-{local_workers.stop}"


def file_name(step: int, local_workers: range | None, workers: int) -> str:
    return f"checkpoint-{step:09d}{_workers_part(local_workers, workers)}.pt"


def check_options(checkpoint_dir, checkpoint_every, resume_from) -> None:
    """Validate ``run``'s checkpoint arguments before any work (ValueError naming the argument)."""
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise ValueError(f"run: checkpoint_dir={checkpoint_dir!r} is invalid; allowed: a directory path")
    if checkpoint_dir is None and checkpoint_every is not None:
        raise ValueError(f"run: checkpoint_every={checkpoint_every!r} is invalid without checkpoint_dir; "
                         "allowed: None, or give checkpoint_dir too")
    if checkpoint_dir is not None:
        if checkpoint_every is None:
            raise ValueError("run: checkpoint_every=None is invalid with checkpoint_dir; allowed: an integer >= 1")
        check_int("run", "checkpoint_every", checkpoint_every, minimum=1)
    if resume_from is not None and not isinstance(resume_from, (str, os.PathLike)):
        raise ValueError(f"run: resume_from={resume_from!r} is invalid; allowed: a checkpoint directory or file path")


# -- the directory ---------------------------------------------------------------------------------------
def claim(directory, experiment: Experiment) -> Path:
    """Make ``directory`` this configuration's checkpoint directory, before any work; ValueError otherwise.

    Creates it, checks that files can be written there, and writes ``experiment.json`` (the configuration)
    unless present. A directory already holding another configuration's ``experiment.json`` is refused,
    naming the differing fields: two runs sharing a directory would otherwise prune each other's checkpoints.
    Checkpoint files without an ``experiment.json`` (written by something else) are refused too.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe.{os.getpid()}.tmp"
        probe.unlink(missing_ok=True)
        os.close(os.open(probe, CREATE, 0o644))
        probe.unlink()
    except OSError as error:
        raise ValueError(f"run: checkpoint_dir={str(directory)!r} is invalid; allowed: a writable directory "
                         f"({type(error).__name__}: {error})") from error
    manifest = directory / MANIFEST
    if not manifest.exists():
        strays = [p.name for p in directory.iterdir() if _NAME.match(p.name) and _is_regular(p)]
        if strays:
            raise ValueError(f"run: checkpoint_dir={str(directory)!r} is invalid; allowed: an empty directory or one "
                             f"this configuration wrote (it holds {strays[:3]} but no {MANIFEST})")
        _create_exclusively(manifest, json.dumps(experiment.to_dict(), indent=1, sort_keys=True).encode())
    saved = _read_manifest(manifest)
    differing = experiment_differences(saved, experiment)
    if differing:
        raise ValueError(f"run: checkpoint_dir={str(directory)!r} is invalid; allowed: a directory of this "
                         f"configuration (it belongs to another one; {differing})")
    return directory


def _create_exclusively(path: Path, data: bytes) -> None:
    """Write ``path`` complete or not at all, and never over an existing one (processes may race here)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)  # a leftover of a killed write by this pid, or a planted link: never followed
    try:
        with os.fdopen(os.open(temporary, CREATE, 0o644), "wb") as f:
            f.write(data)
        try:
            os.link(temporary, path)  # fails if another process created it first: theirs is then compared
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: atomic, but the last of racing writers wins
            if not path.exists():
                os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _read_manifest(manifest: Path) -> dict[str, Any]:
    try:
        with open_regular(manifest) as f:
            text = f.read(MAX_MANIFEST_BYTES + 1)
        saved = loads_json(text) if len(text) <= MAX_MANIFEST_BYTES else None
    except (OSError, ValueError) as error:
        raise ValueError(f"checkpoint directory manifest {str(manifest)!r} is unreadable: {error}; allowed: "
                         "the JSON object sim wrote (remove the directory's checkpoints to start afresh)") from error
    if type(saved) is not dict:
        raise ValueError(f"checkpoint directory manifest {str(manifest)!r} is invalid; allowed: a JSON object of "
                         f"Experiment fields of at most {MAX_MANIFEST_BYTES} bytes")
    return saved


# -- writing -----------------------------------------------------------------------------------------------
def save(directory, experiment: Experiment, state, rows: list[dict[str, float]], *, ledger: Ledger | None = None,
         local_workers: range | None = None, keep: int = KEEP) -> Path:
    """Write ``directory/checkpoint-<step>.pt`` atomically and keep only the newest ``keep`` checkpoints.

    The directory is ``claim``ed first (so a checkpoint never lands among another configuration's), and this
    process's stale temporary files (left by killed writes, older than this write) are removed."""
    started = time.time()
    directory = claim(directory, experiment)
    workers = experiment.workers
    local = local_workers if local_workers is not None else range(workers)
    checked_rows(list(rows), experiment, state.step)
    body = {
        "format_version": FORMAT_VERSION,
        "experiment": to_plain(experiment.to_dict()),
        "local_workers": [local.start, local.stop],
        "step": state.step,
        "state": to_plain(state),
        "rows": to_plain(list(rows)),
        "ledger": _ledger_to_plain(ledger),
    }
    payload = {**body_of(body), "checksum": digest(body_of(body))}
    final = directory / file_name(state.step, local, workers)
    temporary = directory / f".{final.name}.{os.getpid()}.tmp"
    _remove_stale_temporaries(directory, _workers_part(local, workers), started)
    temporary.unlink(missing_ok=True)  # ours from a killed write, or planted: the new file never follows a link
    try:
        with os.fdopen(os.open(temporary, CREATE, 0o644), "wb") as f:
            _write(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
    _prune(directory, local, workers, keep, state.step)
    return final


def _write(payload: dict, f) -> None:
    torch.save(payload, f)


def _remove_stale_temporaries(directory: Path, part: str, started: float) -> None:
    """Remove ``.checkpoint-*.tmp`` files of these local workers last modified before this write began: only a
    killed write leaves one (each process writes only its own workers' files, one at a time)."""
    for path in directory.iterdir():
        match = _TEMPORARY.match(path.name)
        if match and (match.group(1) or "") == part:
            try:
                if path.stat().st_mtime < started:
                    path.unlink()
            except FileNotFoundError:
                pass


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); not available on every platform, hence best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prune(directory: Path, local: range, workers: int, keep: int, written: int) -> None:
    """Keep the one just written (step ``written``) and the newest ``keep - 1`` before it; files of later steps
    are never touched (a junk file named like a far-future checkpoint cannot make the newest valid one go)."""
    older = [path for step, path in _checkpoints(directory, local, workers) if step < written]
    for path in older[:max(0, len(older) - max(keep - 1, 0))] if keep > 0 else []:
        path.unlink(missing_ok=True)


def _ledger_to_plain(ledger: Ledger | None) -> dict[str, Any]:
    if ledger is None:
        return {"calls": 0, "total_bits": 0, "records": None}
    records = [dataclasses.astuple(r) for r in ledger.records] if ledger.keep_records else None
    return {"calls": ledger.calls, "total_bits": ledger.total_bits, "records": records}


def restore_ledger(ledger: Ledger, saved: dict[str, Any]) -> None:
    """Put a checkpoint's ledger totals (and records, when both sides keep them) back into ``ledger``."""
    ledger.calls = saved["calls"]
    ledger.total_bits = saved["total_bits"]
    if ledger.keep_records and saved["records"] is not None:
        ledger.records = [LedgerRecord(*r) for r in saved["records"]]


# -- reading -----------------------------------------------------------------------------------------------
def _checkpoints(directory: Path, local: range, workers: int, steps: int | None = None) -> list[tuple[int, Path]]:
    """This process's complete checkpoints in ``directory``, oldest first: regular files (not links, FIFOs or
    folders) named with ASCII digits, of a step in [0, ``steps``] when given (temporary files never match)."""
    part = _workers_part(local, workers)
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match and (match.group(2) or "") == part and _is_regular(path):
            step = int(match.group(1))
            if steps is None or step <= steps:
                found.append((step, path))
    return sorted(found)


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


@contextlib.contextmanager
def open_regular(path) -> Iterator[BinaryIO]:
    """``path`` opened for reading if it is a regular file (not a link, FIFO or device: never blocks), else
    OSError."""
    fd = os.open(path, OPEN)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{str(path)!r} is not a regular file")
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def checkpoints(directory, local_workers: range, workers: int, steps: int | None = None) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint of these local workers in ``directory``, oldest first
    (``steps``: only those of steps in [0, steps], the run's length)."""
    directory = Path(directory)
    return _checkpoints(directory, local_workers, workers, steps) if directory.is_dir() else []


def latest(directory, local_workers: range | None = None, workers: int | None = None,
           steps: int | None = None) -> Path | None:
    """The newest checkpoint file in ``directory`` (for these local workers; ``steps``: of a step in [0, steps]),
    or None if there is none. Not checked: ``load(directory, ...)`` takes the newest valid one."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    local = local_workers if local_workers is not None else range(workers or 0)
    found = _checkpoints(directory, local, workers if workers is not None else len(local), steps)
    return found[-1][1] if found else None


def read(path, experiment: Experiment, local_workers: range | None = None) -> Checkpoint:
    """One checkpoint file, checked for everything but the state's structure (``sim.checkpoint_schema``)."""
    local = local_workers if local_workers is not None else range(experiment.workers)
    where = f"checkpoint {str(path)!r}"
    try:
        with open_regular(path) as f:
            payload = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, holding non-plain objects, or not a regular file
        raise ValueError(f"{where} is unreadable: {type(error).__name__}: {_first_line(error)}") from None
    return validate(payload, experiment, local, where)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


def valid_checkpoints(directory, experiment: Experiment, local_workers: range | None = None,
                      reference=None) -> list[tuple[int, Path, Checkpoint]]:
    """(step, path, checkpoint) of the valid checkpoints of these local workers in ``directory``, newest first.

    Invalid files are skipped with a warning naming each and why. ``reference``: this process's
    ``initial_state()``, to check each state's structure too. ValueError when the directory belongs to another
    configuration (its ``experiment.json``)."""
    valid, skipped = _scan(Path(directory), experiment, local_workers, reference)
    for reason in skipped:
        warnings.warn(f"skipped {reason}", stacklevel=2)
    return valid


def _scan(directory: Path, experiment: Experiment, local_workers: range | None, reference):
    """(valid [(step, path, checkpoint)] newest first, [why each invalid file was skipped])."""
    local = local_workers if local_workers is not None else range(experiment.workers)
    manifest = directory / MANIFEST
    if manifest.exists():
        differing = experiment_differences(_read_manifest(manifest), experiment)
        if differing:
            raise ValueError(f"run: resume_from={str(directory)!r} is invalid; allowed: a directory of this "
                             f"configuration (it belongs to another one; {differing})")
    valid, skipped = [], []
    for step, path in reversed(checkpoints(directory, local, experiment.workers, experiment.steps)):
        try:
            found = read(path, experiment, local)
            if reference is not None:
                check_state(found.state, reference, experiment, f"checkpoint {str(path)!r}")
        except Exception as error:  # anything wrong with this file: the next older one may be fine
            text = str(error) if isinstance(error, ValueError) else \
                f"checkpoint {str(path)!r}: {type(error).__name__}: {_first_line(error)}"
            skipped.append(text)
            continue
        valid.append((step, path, found))
    return valid, skipped


def load(path, experiment: Experiment, local_workers: range | None = None, reference=None) -> Checkpoint:
    """Read a checkpoint file, or the newest valid one in a directory, written by this very experiment.

    ``reference``: this process's ``initial_state()`` (built here when omitted); the loaded state must have
    its structure. A directory's invalid newer files are skipped with a warning. Raises ValueError when there is
    none, or naming what is wrong with the file (unreadable, another format version, a checksum mismatch,
    another configuration with each differing field, a step or history or state that does not fit).
    """
    local = local_workers if local_workers is not None else range(experiment.workers)
    if reference is None:
        reference = Simulation(experiment, local_workers=local).initial_state()
    path = Path(path)
    if path.is_dir():
        valid, skipped = _scan(path, experiment, local, reference)
        if not valid:
            pattern = file_name(0, local, experiment.workers).replace("000000000", "<step>")
            raise ValueError(f"run: resume_from={str(path)!r} is invalid; allowed: a directory holding a valid "
                             f"checkpoint ({pattern}), found none" + "".join(f"; {reason}" for reason in skipped))
        step, chosen, checkpoint = valid[0]
        if skipped:
            warnings.warn(f"resuming from {str(chosen)!r} (step {step}), the newest valid checkpoint; skipped "
                          + "; ".join(skipped), stacklevel=3)
        return checkpoint
    if not path.is_file():
        raise ValueError(f"run: resume_from={str(path)!r} is invalid; allowed: an existing checkpoint file or directory")
    checkpoint = read(path, experiment, local)
    check_state(checkpoint.state, reference, experiment, f"checkpoint {str(path)!r}")
    return checkpoint


def placed_like(loaded: Any, fresh: Any) -> Any:
    """``loaded`` (a checked state, read onto the CPU) with every tensor moved to the device of its counterpart
    in ``fresh`` (this run's ``initial_state()``): parameters, buffers, optimizer and compressor state go to the
    run's device, generator states stay on the CPU where the compressor keeps them. Structures must match
    (``check_state`` ran first)."""
    if isinstance(fresh, torch.Tensor):
        return loaded.to(fresh.device)
    if isinstance(fresh, tuple) and hasattr(fresh, "_fields"):
        return type(fresh)(*(placed_like(a, b) for a, b in zip(loaded, fresh)))
    if isinstance(fresh, (list, tuple)):
        return type(fresh)(placed_like(a, b) for a, b in zip(loaded, fresh))
    if isinstance(fresh, dict):
        return {k: placed_like(loaded[k], fresh[k]) for k in loaded}
    return loaded
