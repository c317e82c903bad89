"""Validation helpers: every invalid option fails at construction with a ValueError naming the field.

Messages follow one pattern, "<owner>: <field>=<value!r> is invalid; allowed: <what>", so a user can grep
for the field and a test can assert the field is named.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any


MAX_SEED = 2 ** 63 - 1  # torch.Generator.manual_seed and seed arithmetic need a signed 64-bit integer


def invalid(owner: str, field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{owner}: {field}={value!r} is invalid; allowed: {allowed}")


def closest(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean X?)' for the nearest candidate, or '' when nothing is close."""
    match = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_choice(owner: str, field: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = list(choices)
    if value not in choices:
        hint = closest(value, [str(c) for c in choices]) if isinstance(value, str) else ""
        raise invalid(owner, field, value, "one of " + ", ".join(repr(c) for c in choices) + hint)
    return value


def check_int(owner: str, field: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "-inf" if minimum is None else str(minimum)
        hi = "inf" if maximum is None else str(maximum)
        raise invalid(owner, field, value, f"an integer in [{lo}, {hi}]")
    return value


def check_float(owner: str, field: str, value: Any, minimum: float | None = None, maximum: float | None = None,
                min_inclusive: bool = True, max_inclusive: bool = True) -> float:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = is_number and math.isfinite(value)
    if ok and minimum is not None:
        ok = value >= minimum if min_inclusive else value > minimum
    if ok and maximum is not None:
        ok = value <= maximum if max_inclusive else value < maximum
    if not ok:
        lo = "-inf" if minimum is None else ("[" if min_inclusive else "(") + f"{minimum}"
        hi = "inf" if maximum is None else f"{maximum}" + ("]" if max_inclusive else ")")
        raise invalid(owner, field, value, f"a finite number in {lo}, {hi}".replace("-inf,", "(-inf,").replace(", inf", ", inf)"))
    return float(value)


def check_bool(owner: str, field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise invalid(owner, field, value, "True or False")
    return value


def check_known_options(owner: str, given: Iterable[str], known: Iterable[str]) -> None:
    known = list(known)
    for name in given:
        if name not in known:
            raise ValueError(
                f"{owner}: unknown option {name!r}{closest(name, known)}; allowed options: {', '.join(sorted(known))}")
