"""Per-layer PowerSGD ranks: name patterns, and one bit budget allocated over layers by spectral energy.

``layer_ranks={"conv*": 2, "fc*": 1}``: fnmatch patterns on parameter names, the first matching pattern (in
the mapping's order) gives the rank; unmatched tensors take ``rank``.

``rank_allocation={"rule": "spectral", "budget_bits": B, "every": K, "max_rank": R}``: every K compressed
steps, the compressed layers' ranks are re-chosen so that one worker sends at most B bits per step:

    c_l = T (n_l + m_l) * bits(dtype)          bits one rank unit of layer l costs (halved by "alternating")
    w_l = ||Delta_l||_F = sqrt(sum_i sigma_i(Delta_l)^2)   spectral energy (root) of layer l's aggregated update
                                                            Delta_l accumulated over the last K steps
    t_l = B * w_l / sum_j w_j                   the layer's share of the budget, proportional to w_l
    r_l = 1 for every layer, then repeatedly +1 to the layer with the largest shortfall (t_l - c_l r_l) / c_l
          among those with r_l < min(R, n_l, m_l) whose next unit still fits in B (ties: parameter order)

The first K steps use equal weights. Everything is computed from the aggregated update, identical on every
worker, so every worker allocates the same ranks with no extra communication. The measure follows the idea of
spending bits where the update's spectrum has its energy (ATOMO's spectral budget, Wang et al., NeurIPS 2018;
per-layer rank selection from the spectrum, Cuttlefish, Wang et al., MLSys 2023); the proportional greedy rule
itself is this project's simple choice, not a published algorithm. A layer's measured energy is that of its
rank-r_l update, so a layer held at a low rank can look poorer than it is: ``every`` sets how often it gets
a chance to grow.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..base import matrix_view_shape
from ..options import check_choice, check_int, check_known_options, invalid
from ..serialization import register_record

ALLOCATION_RULES = ("spectral",)
ALLOCATION_KEYS = ("rule", "budget_bits", "every", "max_rank")
DEFAULT_MAX_RANK = 8


def parse_layer_ranks(owner: str, value) -> tuple[tuple[str, int], ...]:
    """Validate ``layer_ranks``: a mapping of fnmatch pattern -> integer rank >= 1 (order kept)."""
    allowed = 'a mapping of parameter-name patterns (fnmatch) to ranks >= 1, e.g. {"conv*": 2, "fc*": 1}'
    if not isinstance(value, Mapping) or not value:
        raise invalid(owner, "layer_ranks", value, allowed)
    out = []
    for pattern, rank in value.items():
        if not isinstance(pattern, str) or not pattern:
            raise invalid(owner, "layer_ranks", dict(value), allowed + f" (key {pattern!r} is not a pattern)")
        out.append((pattern, check_int(owner, f"layer_ranks[{pattern!r}]", rank, minimum=1)))
    return tuple(out)


@dataclass(frozen=True)
class LayerRanks:
    """name -> rank: the first matching pattern's rank, else ``default``."""

    patterns: tuple[tuple[str, int], ...]
    default: int

    def __call__(self, name: str) -> int:
        for pattern, rank in self.patterns:
            if fnmatch.fnmatchcase(name, pattern):
                return rank
        return self.default

    @property
    def largest(self) -> int:
        return max([self.default] + [r for _, r in self.patterns])


@dataclass(frozen=True)
class SpectralAllocation:
    budget_bits: int
    every: int
    max_rank: int


@register_record
class AllocationState(NamedTuple):
    ranks: dict[str, int]  # the current allocation
    accumulated: dict[str, torch.Tensor]  # Delta_l of the current period: {name: (*shape)}


def parse_rank_allocation(owner: str, value) -> SpectralAllocation:
    if not isinstance(value, Mapping):
        raise invalid(owner, "rank_allocation", value, 'a mapping such as {"rule": "spectral", "budget_bits": 100000, '
                      '"every": 50, "max_rank": 8}')
    check_known_options(f"{owner} rank_allocation", value, ALLOCATION_KEYS)
    for key in ("rule", "budget_bits", "every"):
        if key not in value:
            raise invalid(owner, "rank_allocation", dict(value), f"a mapping with keys rule, budget_bits, every "
                          f"(and optionally max_rank); {key!r} is missing")
    check_choice(owner, "rank_allocation.rule", value["rule"], ALLOCATION_RULES)
    budget = check_int(owner, "rank_allocation.budget_bits", value["budget_bits"], minimum=1)
    every = check_int(owner, "rank_allocation.every", value["every"], minimum=1)
    max_rank = check_int(owner, "rank_allocation.max_rank", value.get("max_rank", DEFAULT_MAX_RANK), minimum=1)
    return SpectralAllocation(budget, every, max_rank)


def allocate(rule: SpectralAllocation, shapes, unit_bits: Mapping[str, float], weights: Mapping[str, float],
             owner: str = "powersgd") -> dict[str, int]:
    """The greedy proportional allocation of the module docstring. unit_bits[name] = c_l; weights[name] = w_l."""
    names = list(shapes)
    caps = {n: min(rule.max_rank, *matrix_view_shape(tuple(shapes[n]))) for n in names}
    ranks = {n: 1 for n in names}
    spent = sum(unit_bits[n] for n in names)
    if spent > rule.budget_bits:
        raise invalid(owner, "rank_allocation.budget_bits", rule.budget_bits,
                      f"at least {math.ceil(spent)} bits (rank 1 on every compressed tensor)")
    total = sum(weights[n] for n in names)
    share = {n: (weights[n] / total if total > 0 else 1.0 / len(names)) * rule.budget_bits for n in names}
    while True:
        best, best_gap = None, -math.inf
        for n in names:
            if ranks[n] < caps[n] and spent + unit_bits[n] <= rule.budget_bits:
                gap = (share[n] - unit_bits[n] * ranks[n]) / unit_bits[n]
                if gap > best_gap:
                    best, best_gap = n, gap
        if best is None:
            return ranks
        ranks[best] += 1
        spent += unit_bits[best]


def init_allocation(rule: SpectralAllocation, shapes, unit_bits, dtype, device, owner="powersgd") -> AllocationState:
    ranks = allocate(rule, shapes, unit_bits, {n: 1.0 for n in shapes}, owner)
    return AllocationState(ranks, {n: torch.zeros(tuple(s), dtype=dtype, device=device) for n, s in shapes.items()})


def observe_allocation(rule: SpectralAllocation, state: AllocationState, step: int, update, shapes, unit_bits
                       ) -> AllocationState:
    """After compressed step ``step`` (0-based): accumulate; every ``every`` steps, re-allocate from the energies."""
    accumulated = {n: a + update[n].to(a.dtype) for n, a in state.accumulated.items()}
    if (step + 1) % rule.every != 0:
        return AllocationState(state.ranks, accumulated)
    squares = torch.stack([a.double().pow(2).sum() for a in accumulated.values()]).tolist() if accumulated else []
    weights = {n: math.sqrt(v) for n, v in zip(accumulated, squares)}  # w_l, from one read of the device
    ranks = allocate(rule, shapes, unit_bits, weights)
    return AllocationState(ranks, {n: torch.zeros_like(a) for n, a in accumulated.items()})
