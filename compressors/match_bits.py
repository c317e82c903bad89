"""``match_bits(name, shapes, target_bits, **fixed)``: the option value that makes a compressor send a given budget.

Comparing compressors fairly means comparing them at the same communication (the PowerSGD paper, Vogels et
al. 2019, compares its baselines at a budget close to PowerSGD rank 2's). A compressor with one bits knob is
searched on that knob, its other options held at ``fixed``:

- ``ratio`` (topk, randomk, random_block): continuous in (0, 1]; bits are a non-decreasing step function of it
  (k = max(1, round(ratio d)) coordinates per tensor), so bisection finds the two steps around the target.
- ``rank`` (powersgd, svd, lowrank_sketch, atomo) and ``levels`` (qsgd): integers; bits are non-decreasing in
  them, so an exponential search then a bisection finds the two values around the target.

The closer of the two (the cheaper one on a tie) wins; among values that send exactly those bits, the smallest.
Bits are non-decreasing in every knob while ``min_compression_rate >= 1`` (a tensor that stops paying off goes
dense, which costs more); below that a tensor could go from "compressed, above dense" back to dense, and the
search may then miss a closer value. Granularity: a rank moves every matrix at once and QSGD's levels move
whole bits per coordinate, so those can land far from the target; ratios get within one coordinate per tensor.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from .base import matrix_view_shape, numel
from .options import invalid
from .registry import make

#: compressor -> (its bits knob, "ratio" (continuous in (0, 1]) or "int" (from 1)).
KNOBS: dict[str, tuple[str, str]] = {
    "topk": ("ratio", "ratio"),
    "randomk": ("ratio", "ratio"),
    "random_block": ("ratio", "ratio"),
    "qsgd": ("levels", "int"),
    "powersgd": ("rank", "int"),
    "svd": ("rank", "int"),
    "lowrank_sketch": ("rank", "int"),
    "atomo": ("rank", "int"),
}
MAX_LEVELS = 2 ** 31 - 1  # make("qsgd") accepts levels up to this
SMALLEST_RATIO = 1e-12  # below 1 / (2 d) for any tensor: k = 1 everywhere


def match_bits(name: str, shapes: Mapping[str, tuple[int, ...]], target_bits: float, **fixed) -> dict:
    """Options (``fixed`` included) whose ``make(name, **options).bits_per_step(shapes)`` is closest to target.

    ``name``: a compressor with a bits knob (``KNOBS``: ratio, rank or levels); ``fixed``: its other options
    (e.g. ``error_feedback="none"``, ``num_iters_per_step=2``), never the knob itself. A target below the knob's
    smallest budget gives its smallest value; one above its largest budget, the smallest value that sends it.
    """
    if name not in KNOBS:
        raise invalid("match_bits", "name", name, "a compressor with one bits knob: " + ", ".join(sorted(KNOBS)))
    knob, kind = KNOBS[name]
    if knob in fixed or (kind == "ratio" and "k" in fixed):
        given = knob if knob in fixed else "k"
        raise invalid("match_bits", given, fixed[given], f"not given: match_bits chooses {knob!r} for {name!r}")
    if not isinstance(shapes, Mapping) or not shapes:
        raise invalid("match_bits", "shapes", shapes, "a non-empty mapping of tensor names to shapes")
    if not isinstance(target_bits, (int, float)) or isinstance(target_bits, bool) or not (
            math.isfinite(target_bits) and target_bits > 0):
        raise invalid("match_bits", "target_bits", target_bits, "a finite number > 0")
    shapes = {key: tuple(shape) for key, shape in shapes.items()}

    def bits(value) -> float:
        return float(make(name, **fixed, **{knob: value}).bits_per_step(shapes))

    value = (closest_ratio(bits, float(target_bits)) if kind == "ratio"
             else closest_integer(bits, float(target_bits), _largest(knob, shapes)))
    return {**fixed, knob: value}


def closest_ratio(bits: Callable[[float], float], target: float) -> float:
    """The ratio in (0, 1] whose bits are closest to target (bits non-decreasing in the ratio), tidied."""
    low, high = SMALLEST_RATIO, 1.0
    if bits(low) >= target:
        return _tidy(bits, low)
    if bits(high) <= target:
        return _tidy(bits, high)
    # Invariant: bits(low) < target <= bits(high). 60 halvings of (0, 1] leave an interval below 1e-18.
    for _ in range(60):
        middle = (low + high) / 2
        if bits(middle) >= target:
            high = middle
        else:
            low = middle
    return _tidy(bits, low if target - bits(low) <= bits(high) - target else high)  # a tie: the cheaper


def closest_integer(bits: Callable[[int], float], target: float, largest: int) -> int:
    """The integer in [1, largest] whose bits are closest to target (smallest such; bits non-decreasing)."""
    high = 1
    while high < largest and bits(high) < target:  # exponential search: O(log largest) evaluations
        high = min(2 * high, largest)
    above = _first_integer_reaching(bits, target, 1, high)
    if above is None:  # even the largest value is below target
        return _first_integer_reaching(bits, bits(largest), 1, largest)
    if above == 1:
        return 1
    below = _first_integer_reaching(bits, bits(above - 1), 1, above - 1)
    return below if target - bits(below) <= bits(above) - target else above


def _first_integer_reaching(bits, level: float, low: int, high: int) -> int | None:
    """Smallest integer in [low, high] with bits >= level (None if none)."""
    if bits(high) < level:
        return None
    while low < high:
        middle = (low + high) // 2
        if bits(middle) >= level:
            high = middle
        else:
            low = middle + 1
    return low


def _tidy(bits, ratio: float) -> float:
    """The ratio with the fewest significant digits that sends what ``ratio`` sends (same k on every tensor)."""
    wanted = bits(ratio)
    start = _edge(bits, lambda r: bits(r) >= wanted, SMALLEST_RATIO, ratio)  # first ratio of this step
    end = _edge(bits, lambda r: bits(r) > wanted, ratio, 1.0) if bits(1.0) > wanted else 1.0  # first of the next
    middle = (start + end) / 2
    for digits in range(1, 18):
        rounded = float(f"{middle:.{digits}g}")
        if 0 < rounded <= 1 and bits(rounded) == wanted:
            return rounded
    return ratio


def _edge(bits, reached, low: float, high: float) -> float:
    """(Nearly) the smallest ratio in [low, high] where ``reached`` holds, given it holds at high."""
    if reached(low):
        return low
    for _ in range(60):
        middle = (low + high) / 2
        if reached(middle):
            high = middle
        else:
            low = middle
    return high


def _largest(knob: str, shapes: Mapping[str, tuple[int, ...]]) -> int:
    if knob == "levels":
        return MAX_LEVELS
    # Beyond the largest matrix dimension a rank changes nothing more (every factor is full or the tensor dense).
    return max(max(matrix_view_shape(shape)) if len(shape) >= 2 else numel(shape) for shape in shapes.values())
