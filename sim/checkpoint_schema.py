"""What a checkpoint file must hold, checked before any of it is used (every problem a ValueError naming it).

A checkpoint is untrusted data: a hand edit, a flipped bit, a truncated copy or a crafted file. ``validate``
turns the ``torch.load(weights_only=True)`` payload into a ``Checkpoint`` only if

- it is a dict with exactly the expected keys, of this ``FORMAT_VERSION``;
- its ``checksum`` equals the SHA-256 of everything else (``compressors.serialization.digest``: the plain
  structure, every tensor's dtype, shape and bytes), so corruption is caught, not resumed;
- it was written by this experiment (every field equal) for these local workers;
- its records are registered state types only (``compressors.serialization.from_plain``: nothing named in
  the file is imported or called), its step lies in [0, steps] and equals the state's step;
- its history rows are the steps this experiment logs up to that step (all of them, or the last ones
  for a run continued from a given state), with numeric values;
- its ledger totals are non-negative integers (and agree with its records, when it has them);
- every tensor in it is a plain dense CPU tensor, each element stored once (``check_tensor``: checked on its
  metadata, before the checksum reads its bytes, so an expanded or meta tensor is refused without allocating);
- its state has the structure of a fresh ``initial_state()`` of this experiment (``check_state``): the same
  record types, keys, tensor shapes and dtypes; counters in range (steps within the run, ranks >= 1, seeds
  within 64 bits); every float finite (parameters, momentum, error-feedback memory, factors).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import torch

from compressors.comm import LedgerRecord
from compressors.serialization import check_same_structure, check_values, digest, from_plain
from compressors.state_tree import float_leaves
from .experiment import Experiment
from .simulation import TrainState

FORMAT_VERSION = 2  # 2: registered record tags and a checksum; 1 (importable type names) is refused
KEYS = ("format_version", "experiment", "local_workers", "step", "state", "rows", "ledger")  # + "checksum"
LEDGER_KEYS = ("calls", "total_bits", "records")
#: Experiment fields added after files of this format were first written, with their defaults: a file without
#: one was written by a run that behaved as that default (any other absent field is a difference).
LATER_FIELDS = {f.name: f.default for f in dataclasses.fields(Experiment) if f.name in (
    "lr_schedule", "lr_poly_power", "weight_decay_exclude", "clip_grad_norm", "validation_fraction", "device",
    "autocast")}
#: Experiment fields that say where a run computes, not what: a checkpoint resumes whatever they are.
PLACEMENT_FIELDS = ("device",)


class Checkpoint(NamedTuple):
    step: int
    state: Any  # sim.simulation.TrainState
    rows: list[dict[str, float]]  # history rows logged up to and including ``step``
    ledger: dict[str, Any]  # {"calls", "total_bits", "records"} of the run's collective


def body_of(payload: dict[str, Any]) -> dict[str, Any]:
    """The checksummed part of a payload, in its fixed key order."""
    return {k: payload[k] for k in KEYS}


def validate(payload: Any, experiment: Experiment, local: range, where: str) -> Checkpoint:
    """The checkpoint in ``payload`` (a loaded file), or a ValueError starting with ``where``."""
    try:
        return _validate(payload, experiment, local)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _validate(payload: Any, experiment: Experiment, local: range) -> Checkpoint:
    if type(payload) is not dict:
        raise ValueError(f"a {type(payload).__name__} at the top level is invalid; allowed: a dict")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"format_version={version!r} is invalid; allowed: {FORMAT_VERSION} (this version of sim; "
                         "older checkpoints cannot be resumed)")
    expected = set(KEYS) | {"checksum"}
    if set(payload) != expected:
        missing = sorted(expected - set(payload))
        extra = sorted(map(str, set(payload) - expected))
        raise ValueError(f"missing keys {missing} and unexpected keys {extra} are invalid; allowed: exactly "
                         f"{sorted(expected)}")
    if payload["checksum"] != digest(body_of(payload)):  # digest refuses odd types and deep nesting itself
        raise ValueError("checksum mismatch: the file was altered or corrupted after it was written")
    saved = from_plain(payload["experiment"], "$.experiment")
    if type(saved) is not dict:
        raise ValueError(f"experiment is a {type(saved).__name__}; allowed: a dict of Experiment fields")
    check_same_experiment(saved, experiment)
    bounds = payload["local_workers"]
    if type(bounds) is not list or len(bounds) != 2 or not all(type(b) is int for b in bounds):
        raise ValueError(f"local_workers={bounds!r} is invalid; allowed: [start, stop]")
    if range(*bounds) != local:
        raise ValueError(f"was written for local workers {range(*bounds)}, this process runs {local}")
    step = payload["step"]
    if type(step) is not int or not 0 <= step <= experiment.steps:
        raise ValueError(f"step={step!r} is invalid; allowed: an integer in [0, {experiment.steps}] (the "
                         "experiment's steps)")
    state = from_plain(payload["state"], "$.state")

    if type(state) is not TrainState:
        raise ValueError(f"state is a {type(state).__name__}; allowed: a TrainState record")
    if state.step != step:
        raise ValueError(f"state.step={state.step!r} differs from step={step}; allowed: equal")
    rows = checked_rows(from_plain(payload["rows"], "$.rows"), experiment, step)
    return Checkpoint(step, state, rows, _checked_ledger(from_plain(payload["ledger"], "$.ledger")))


def logged_steps(experiment: Experiment, upto: int) -> list[int]:
    """The steps ``sim.run`` writes a history row for, up to ``upto``: every ``log_every``-th, every
    evaluation (``eval_every``-th and the last) (the rule of ``sim.runner.run`` and ``_should_eval``)."""
    e = experiment
    return [s for s in range(1, upto + 1) if s % e.log_every == 0 or s == e.steps
            or (e.eval_every > 0 and s % e.eval_every == 0)]


def checked_rows(rows: Any, experiment: Experiment, step: int) -> list[dict[str, float]]:
    """``rows`` if they are history rows of the steps logged up to ``step`` (ValueError otherwise); also run
    before writing, so a checkpoint that could not be loaded is never written."""
    if type(rows) is not list:
        raise ValueError(f"rows is a {type(rows).__name__}; allowed: a list of history rows")
    for i, row in enumerate(rows):
        if type(row) is not dict or "step" not in row:
            raise ValueError(f"rows[{i}] is invalid; allowed: a dict of metric names to numbers with a 'step'")
        for key, value in row.items():
            if type(value) not in (int, float):
                raise ValueError(f"rows[{i}].{key}={value!r} is invalid; allowed: a number")
    steps = [row["step"] for row in rows]
    expected = logged_steps(experiment, step)
    # A suffix: a run continued from a given state (``sim.run(state=...)``) logs only from that state on.
    if len(steps) > len(expected) or steps != expected[len(expected) - len(steps):]:
        raise ValueError(f"rows hold steps {_short(steps)}; allowed: the logged steps up to step {step}, "
                         f"{_short(expected)}, or a suffix of them (a run continued from a given state)")
    return rows


def _short(values: list) -> str:
    return str(values) if len(values) <= 12 else f"[{', '.join(map(str, values[:5]))}, ..., " \
                                                  f"{', '.join(map(str, values[-5:]))}]"


def _checked_ledger(ledger: Any) -> dict[str, Any]:
    if type(ledger) is not dict or set(ledger) != set(LEDGER_KEYS):
        raise ValueError(f"ledger is invalid; allowed: a dict with exactly the keys {list(LEDGER_KEYS)}")
    for key in ("calls", "total_bits"):
        if type(ledger[key]) is not int or ledger[key] < 0:
            raise ValueError(f"ledger.{key}={ledger[key]!r} is invalid; allowed: an integer >= 0")
    records = ledger["records"]
    if records is None:
        return ledger
    types = [f.type for f in dataclasses.fields(LedgerRecord)]  # "str", "int" (postponed annotations)
    if type(records) is not list or len(records) != ledger["calls"]:
        raise ValueError(f"ledger.records is invalid; allowed: None or a list of ledger.calls={ledger['calls']} "
                         "records")
    for i, r in enumerate(records):
        if type(r) not in (list, tuple) or len(r) != len(types) or any(
                type(v).__name__ != t or (t == "int" and v < 0) for v, t in zip(r, types)):
            raise ValueError(f"ledger.records[{i}]={r!r} is invalid; allowed: ({', '.join(types)}) as LedgerRecord")
    if sum(r[1] for r in records) != ledger["total_bits"]:
        raise ValueError("ledger.total_bits differs from the sum of its records' bits; allowed: equal")
    return ledger


def check_state(state, fresh, experiment: Experiment, where: str) -> None:
    """ValueError (starting with ``where``) unless ``state`` is shaped like ``fresh`` (this experiment's
    ``initial_state()``) and its counters and parameters are sane."""
    try:
        check_same_structure(state, fresh, "$.state")
        if not state.bits >= 0:
            raise ValueError(f"state.bits={state.bits} is invalid; allowed: >= 0")
        if not 0 <= state.skipped_steps <= state.step:
            raise ValueError(f"state.skipped_steps={state.skipped_steps} is invalid; allowed: in [0, step]")
        if not (math.isfinite(state.sim_time) and state.sim_time >= 0):
            raise ValueError(f"state.sim_time={state.sim_time!r} is invalid; allowed: a finite number >= 0")

        optimizer_steps = getattr(state.optimizer, "step", 0)  # Adam's bias-correction count (SGD has none)
        if not (type(optimizer_steps) is int and 0 <= optimizer_steps <= state.step - state.skipped_steps):
            raise ValueError(f"state.optimizer.step={optimizer_steps!r} is invalid; allowed: an integer in "
                             f"[0, step - skipped_steps]")
        optimizer = {f"optimizer.{path}": t for path, t in float_leaves(state.optimizer)}  # momentum, moments
        for name, t in [*(("params." + n, t) for n, t in state.params.items()), *optimizer.items()]:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"state.{name} holds NaN/Inf; allowed: finite values")
        check_values(state, fresh, state.step, "$.state")  # the rest: compressor state, buffers, counters
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def check_same_experiment(saved: dict[str, Any], experiment: Experiment) -> None:
    """ValueError listing every field where ``saved`` (a stored ``Experiment.to_dict()``) differs."""
    differing = experiment_differences(saved, experiment)
    if differing:
        raise ValueError(f"was written by another configuration; {differing}")


def experiment_differences(saved: dict[str, Any], experiment: Experiment) -> str:
    """'' when equal, else 'differing fields: a, b (a: checkpoint x, experiment y; ...)'."""
    current = {k: v for k, v in experiment.to_dict().items() if k not in PLACEMENT_FIELDS}
    saved = {k: v for k, v in saved.items() if k not in PLACEMENT_FIELDS}
    # A field added after the file was written is absent from it: that run had the field's default behaviour.
    saved = {**{k: v for k, v in LATER_FIELDS.items() if k in current and k not in saved}, **saved}
    differing = [k for k in sorted(set(saved) | set(current), key=str)
                 if k not in saved or k not in current or not _same(saved[k], current[k])]
    if not differing:
        return ""
    details = "; ".join(f"{k}: checkpoint {_shown(saved.get(k, '<absent>'))}, experiment "
                        f"{_shown(current.get(k, '<absent>'))}" for k in differing)
    return f"differing fields: {', '.join(map(str, differing))} ({details})"


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 300 else text[:300] + "..."


def _same(a, b) -> bool:
    """Config equality that treats tuples and lists alike (to_dict may give either after a round trip)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                               and not isinstance(a, bool) and not isinstance(b, bool) and a == b)
