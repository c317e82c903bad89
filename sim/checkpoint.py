"""Checkpoints of a simulated run: written atomically, versioned, tied to the experiment that wrote them.

    sim.run(experiment, checkpoint_dir="ckpt", checkpoint_every=100)   # checkpoint-000000100.pt, ...
    sim.run(experiment, resume_from="ckpt")                            # continues from the latest one

A checkpoint holds everything the loop carries (``TrainState``: parameters, per-worker buffers, optimizer
momentum, the compressor's nested state with error-feedback memory, warm-start factors and generator
states, cumulative bits, skipped steps, simulated time), the history rows logged so far and the ledger's
totals. Data order needs nothing: batches are a pure function of (seed, worker, step). So a resumed run's
history equals the uninterrupted run's bitwise.

Atomicity: the payload is written to a hidden temporary file in the same directory, flushed and fsynced,
then renamed over the final name with ``os.replace`` (atomic on POSIX and Windows). A crash mid-write
leaves at worst a stray ``.*.tmp`` file, which ``latest`` ignores; earlier checkpoints are untouched.

The file is a ``torch.save`` of plain containers only (dicts, lists, tuples, numbers, strings, tensors;
NamedTuples become tagged dicts, see ``compressors.serialization``), so it loads with
``torch.load(weights_only=True)``: opening a checkpoint never runs arbitrary pickled code.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch

from compressors.serialization import from_plain, to_plain
from compressors.options import check_int
from .collective import Ledger, LedgerRecord
from .experiment import Experiment

FORMAT_VERSION = 1
KEEP = 2  # checkpoints kept per directory (the newest); older ones are removed after a successful write
_NAME = re.compile(r"^checkpoint-(\d{9})(-w\d+-\d+)?\.pt$")


class Checkpoint(NamedTuple):
    step: int
    state: Any  # sim.runner.TrainState
    rows: list[dict[str, float]]  # history rows logged up to and including ``step``
    ledger: dict[str, Any]  # {"calls", "total_bits", "records"} of the run's collective


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


# -- writing -----------------------------------------------------------------------------------------------
def save(directory, experiment: Experiment, state, rows: list[dict[str, float]], *, ledger: Ledger | None = None,
         local_workers: range | None = None, keep: int = KEEP) -> Path:
    """Write ``directory/checkpoint-<step>.pt`` atomically and keep only the newest ``keep`` checkpoints."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    workers = experiment.workers
    local = local_workers if local_workers is not None else range(workers)
    payload = {
        "format_version": FORMAT_VERSION,
        "experiment": to_plain(experiment.to_dict()),
        "local_workers": [local.start, local.stop],
        "step": state.step,
        "state": to_plain(state),
        "rows": to_plain(list(rows)),
        "ledger": _ledger_to_plain(ledger),
    }
    final = directory / file_name(state.step, local, workers)
    temporary = directory / f".{final.name}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as f:
            _write(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
    _prune(directory, local, workers, keep)
    return final


def _write(payload: dict, f) -> None:
    torch.save(payload, f)


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


def _prune(directory: Path, local: range, workers: int, keep: int) -> None:
    mine = _checkpoints(directory, local, workers)
    for _, path in mine[:-keep] if keep > 0 else []:
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
def _checkpoints(directory: Path, local: range, workers: int) -> list[tuple[int, Path]]:
    """This process's complete checkpoints in ``directory``, oldest first (temporary files never match)."""
    part = _workers_part(local, workers)
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match and (match.group(2) or "") == part:
            found.append((int(match.group(1)), path))
    return sorted(found)


def checkpoints(directory, local_workers: range, workers: int) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint of these local workers in ``directory``, oldest first."""
    directory = Path(directory)
    return _checkpoints(directory, local_workers, workers) if directory.is_dir() else []


def latest(directory, local_workers: range | None = None, workers: int | None = None) -> Path | None:
    """The newest checkpoint in ``directory`` (for these local workers), or None if there is none."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    local = local_workers if local_workers is not None else range(workers or 0)
    found = _checkpoints(directory, local, workers if workers is not None else len(local))
    return found[-1][1] if found else None


def load(path, experiment: Experiment, local_workers: range | None = None) -> Checkpoint:
    """Read a checkpoint file, or the latest in a directory, written by this very experiment.

    Raises ValueError when there is none, when it is unreadable or of another format version, or when it was
    written by a different configuration (the message lists each differing field with both values).
    """
    local = local_workers if local_workers is not None else range(experiment.workers)
    path = Path(path)
    if path.is_dir():
        found = latest(path, local, experiment.workers)
        if found is None:
            raise ValueError(f"run: resume_from={str(path)!r} is invalid; allowed: a directory holding a checkpoint "
                             f"({file_name(0, local, experiment.workers).replace('000000000', '<step>')}), "
                             "found none")
        path = found
    elif not path.is_file():
        raise ValueError(f"run: resume_from={str(path)!r} is invalid; allowed: an existing checkpoint file or directory")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, or holding non-plain objects
        raise ValueError(f"checkpoint {str(path)!r} is unreadable: {type(error).__name__}: {error}") from error
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        version = payload.get("format_version") if isinstance(payload, dict) else None
        raise ValueError(f"checkpoint {str(path)!r}: format_version={version!r} is invalid; "
                         f"allowed: {FORMAT_VERSION} (this version of sim)")
    check_same_experiment(from_plain(payload["experiment"]), experiment, path)
    saved_local = range(*payload["local_workers"])
    if saved_local != local:
        raise ValueError(f"checkpoint {str(path)!r} was written for local workers {saved_local}, "
                         f"this process runs {local}")
    state = from_plain(payload["state"])
    return Checkpoint(payload["step"], state, from_plain(payload["rows"]), payload["ledger"])


def check_same_experiment(saved: dict[str, Any], experiment: Experiment, path) -> None:
    current = experiment.to_dict()
    differing = [k for k in sorted(set(saved) | set(current))
                 if k not in saved or k not in current or not _same(saved[k], current[k])]
    if differing:
        details = "; ".join(f"{k}: checkpoint {saved.get(k, '<absent>')!r}, experiment {current.get(k, '<absent>')!r}"
                            for k in differing)
        raise ValueError(f"checkpoint {str(path)!r} was written by another configuration; "
                         f"differing fields: {', '.join(differing)} ({details})")


def _same(a, b) -> bool:
    """Config equality that treats tuples and lists alike (to_dict may give either after a round trip)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                               and not isinstance(a, bool) and not isinstance(b, bool) and a == b)
