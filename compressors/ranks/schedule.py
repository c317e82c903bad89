"""Rank schedules: a PowerSGD rank that changes at given steps, as (first step, rank) pairs.

    compressors.make("powersgd", rank_schedule=[[0, 4], [100, 2], [300, 1]])

Phase k runs from its first step up to the next phase's first step (the last phase forever). Steps count
the compressor's own compressed steps (its state's counter), which are the training steps unless
``start_compressing_after_num_steps`` holds compression back: then phase boundaries fall that many training
steps later. Lists, not tuples, so that a TOML/JSON config can write them.
"""
from __future__ import annotations

import bisect
from typing import NamedTuple

from ..options import invalid

ALLOWED = ("a non-empty list of [first_step, rank] pairs: first step 0, strictly increasing integer steps, "
           "integer ranks >= 1, e.g. [[0, 4], [100, 2], [300, 1]]")


class Phase(NamedTuple):
    """One phase of a schedule and what one worker sends per step during it."""

    first_step: int
    rank: int
    bits: float


def parse_rank_schedule(owner: str, value) -> tuple[tuple[int, int], ...]:
    """Validate a schedule; returns ((first_step, rank), ...). ValueError naming ``rank_schedule`` otherwise."""
    if not isinstance(value, (list, tuple)) or not value:
        raise invalid(owner, "rank_schedule", value, ALLOWED)
    phases = []
    for pair in value:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
            raise invalid(owner, "rank_schedule", value, ALLOWED + f" (entry {pair!r} is not an integer pair)")
        phases.append((int(pair[0]), int(pair[1])))
    if phases[0][0] != 0:
        raise invalid(owner, "rank_schedule", value, ALLOWED + " (the first phase must start at step 0)")
    for (a, _), (b, _) in zip(phases, phases[1:]):
        if b <= a:
            raise invalid(owner, "rank_schedule", value, ALLOWED + f" (step {b} does not come after {a})")
    for _, rank in phases:
        if rank < 1:
            raise invalid(owner, "rank_schedule", value, ALLOWED + f" (rank {rank} < 1)")
    return tuple(phases)


def rank_at(schedule: tuple[tuple[int, int], ...], step: int) -> int:
    """The rank of the phase holding ``step`` (0-based compressed step)."""
    index = bisect.bisect_right([first for first, _ in schedule], step) - 1
    return schedule[max(index, 0)][1]


def steps_in_phases(schedule: tuple[tuple[int, int], ...], steps: int) -> list[int]:
    """How many of the first ``steps`` steps fall in each phase."""
    bounds = [first for first, _ in schedule] + [max(steps, schedule[-1][0])]
    return [max(0, min(b, steps) - min(a, steps)) for a, b in zip(bounds, bounds[1:])]
