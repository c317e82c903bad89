"""Adaptive rank: Accordion (Agarwal, Wang, Lee, Venkataraman, Papailiopoulos, "Adaptive Gradient
Communication via Critical Learning Regime Identification", MLSys 2021), for PowerSGD's rank.

    compressors.make("powersgd", adaptive={"rule": "accordion", "low_rank": 1, "high_rank": 4,
                                           "interval": 10, "threshold": 0.5})

Accordion's rule (its Algorithm 1, with their epoch replaced by an interval of ``interval`` compressed steps):
over each interval, accumulate the aggregated update Delta = sum_t U_t (what every worker applies, before
momentum); at the end of the interval, with Delta_old the previous interval's,

    critical  <=>  | ||Delta_old|| - ||Delta_new|| | / ||Delta_old||  >=  threshold   (eta in the paper)

and the next interval runs at ``high_rank`` (light compression) when critical, ``low_rank`` otherwise. The first
interval has nothing to compare with and runs at ``high_rank`` (early training is the critical regime the paper
identifies); the first decision is taken at the end of the second interval. ||Delta_old|| = 0 counts as
critical when ||Delta_new|| > 0 and as not critical when both are 0.

The update is identical on every worker (it is the all-reduced result), so every worker takes the same
decision with no extra communication. The paper also forces the critical setting after a learning-rate
decay; this rule sees only the updates (a decay shows as a large relative change of ||Delta||).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..options import check_choice, check_float, check_int, check_known_options, invalid
from ..serialization import register_record

ADAPTIVE_RULES = ("accordion",)
KEYS = ("rule", "low_rank", "high_rank", "interval", "threshold")
NO_NORM = -1.0  # previous_norm before the first interval ends (norms are >= 0)


@dataclass(frozen=True)
class Accordion:
    low_rank: int
    high_rank: int
    interval: int
    threshold: float

    def critical(self, previous_norm: float, norm: float) -> bool:
        """Accordion's test: |prev - new| / prev >= threshold (prev = 0: critical iff new > 0)."""
        if previous_norm == 0.0:
            return norm > 0.0
        return abs(previous_norm - norm) / previous_norm >= self.threshold


@register_record
class AccordionState(NamedTuple):
    rank: int  # the rank of the current interval
    previous_norm: float  # ||Delta|| of the last finished interval; NO_NORM before the first one ends
    accumulated: dict[str, torch.Tensor]  # Delta of the current interval so far: {name: (*shape)}
    decisions: int  # intervals finished (decisions taken, the first one included)


def parse_adaptive(owner: str, value) -> Accordion:
    """Validate ``adaptive={...}``: every key checked, ValueError naming ``adaptive.<key>``."""
    if not isinstance(value, Mapping):
        raise invalid(owner, "adaptive", value, 'a mapping such as {"rule": "accordion", "low_rank": 1, '
                      '"high_rank": 4, "interval": 10, "threshold": 0.5}')
    check_known_options(f"{owner} adaptive", value, KEYS)
    missing = [k for k in KEYS if k not in value]
    if missing:
        raise invalid(owner, "adaptive", dict(value), f"a mapping with every key of {list(KEYS)} (missing {missing})")
    check_choice(owner, "adaptive.rule", value["rule"], ADAPTIVE_RULES)
    low = check_int(owner, "adaptive.low_rank", value["low_rank"], minimum=1)
    high = check_int(owner, "adaptive.high_rank", value["high_rank"], minimum=1)
    if high < low:
        raise invalid(owner, "adaptive.high_rank", high, f"an integer >= adaptive.low_rank ({low})")
    interval = check_int(owner, "adaptive.interval", value["interval"], minimum=1)
    threshold = check_float(owner, "adaptive.threshold", value["threshold"], minimum=0.0, min_inclusive=False)
    return Accordion(low, high, interval, float(threshold))


def init_state(rule: Accordion, shapes, dtype, device) -> AccordionState:
    accumulated = {name: torch.zeros(tuple(s), dtype=dtype, device=device) for name, s in shapes.items()}
    return AccordionState(rule.high_rank, NO_NORM, accumulated, 0)


def observe(rule: Accordion, state: AccordionState, step: int, update: Mapping[str, torch.Tensor]) -> AccordionState:
    """After compressed step ``step`` (0-based): add its update; at an interval's end, decide the next rank."""
    accumulated = {name: acc + update[name].to(acc.dtype) for name, acc in state.accumulated.items()}
    if (step + 1) % rule.interval != 0:
        return AccordionState(state.rank, state.previous_norm, accumulated, state.decisions)
    squares = [a.double().pow(2).sum() for a in accumulated.values()]
    # one read of every tensor's square (float64 holds them exactly), summed on the host in the same order
    norm = math.sqrt(sum(torch.stack(squares).tolist() if squares else []))  # ||Delta_new||
    if state.previous_norm == NO_NORM:
        rank = rule.high_rank  # nothing to compare with yet
    else:
        rank = rule.high_rank if rule.critical(state.previous_norm, norm) else rule.low_rank
    zeros = {name: torch.zeros_like(a) for name, a in accumulated.items()}
    return AccordionState(rank, norm, zeros, state.decisions + 1)
