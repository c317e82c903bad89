"""Interleaved repetitions and medians: the one timing primitive every benchmark uses.

Why interleave: on a shared, noisy machine a burst of load lasts seconds; timing all of A then all of B lets
the burst land on one side only. Timing A, B, A, B, ... and taking the median of each side (and the median
of the per-round ratios, each ratio taken from two adjacent measurements) keeps the comparison fair.
"""
from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping


def time_once(fn: Callable[[], object]) -> float:
    """Wall seconds of one call (garbage collected before, so a collection does not land inside)."""
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                inner: int = 1, setup: Mapping[str, Callable[[], object]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` rounds, the functions in turn within each round.

    ``inner`` calls make one sample (their mean; for calls too short to time alone). The order within a
    round alternates (A B, then B A) so neither side always runs right after the other.
    ``setup[name]``, if given, runs untimed before every call of ``fns[name]`` (e.g. refilling an input the
    call consumes).
    """
    if repeats < 1 or warmup < 0 or inner < 1:
        raise ValueError(f"interleaved: repeats={repeats}, warmup={warmup}, inner={inner} are invalid; "
                         "allowed: repeats >= 1, warmup >= 0, inner >= 1")
    names = list(fns)
    setup = setup or {}

    def call(name: str) -> None:
        if name in setup:
            setup[name]()
        fns[name]()

    for _ in range(warmup):
        for name in names:
            call(name)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            total = 0.0
            for _ in range(inner):
                if name in setup:
                    setup[name]()
                total += time_once(fns[name])
            samples[name].append(total / inner)
    return samples


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def ratio_of_medians(samples: Mapping[str, list[float]], top: str, bottom: str) -> float:
    """median over rounds of top_i / bottom_i (adjacent measurements), the robust side-by-side ratio."""
    return statistics.median(t / b for t, b in zip(samples[top], samples[bottom]))


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def table(header: list[str], rows: list[list[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
