"""Adaptive rank: Accordion (Agarwal, Wang, Lee, Venkataraman, Papailiopoulos, "Adaptive Gradient
Communication via Critical Learning Regime Identification", MLSys 2021), for PowerSGD's rank. Two rules:

    compressors.make("powersgd", adaptive={"rule": "accordion", "low_rank": 1, "high_rank": 4,
                                           "interval": 234, "threshold": 0.5, "lr_milestones": [2340]})
    compressors.make("powersgd", adaptive={"rule": "accordion-global", "low_rank": 1, "high_rank": 4,
                                           "interval": 10, "threshold": 0.5})

``"accordion"`` follows the authors' code (uw-mad-dash/Accordion, ``main.py`` and ``auto_scale.py``): **per
layer**, from the norm of the **uncompressed local gradient** accumulated over an interval. Over interval k every
worker i accumulates, for each compressed layer l, G_il = sum_t g_il(t) (its own gradient, before error
feedback and compression). At the interval's end the workers average the per-layer norms in one all-reduce of L
numbers (L = compressed layers; recorded in the ledger with the tag "accordion"), N_l(k) = mean_i ||G_il||, and

    critical_l  <=>  | N_l(k-1) - N_l(k) | / N_l(k-1)  >=  threshold   (eta = 0.5 in the paper)

layer l runs the next interval at ``high_rank`` (light compression) when critical, at ``low_rank`` otherwise.
The first interval runs at ``high_rank`` and the first decision (end of interval 0) keeps it (nothing to compare
with); N_l(k-1) = 0 counts as critical (the reference's ratio 9). **After a learning-rate decay** every layer
runs at ``high_rank``: from step m of each m in ``lr_milestones`` (the experiment's ``lr_milestones``: the first
step at the decayed rate) up to the next interval's end, where the usual decision takes over (the reference
forces the high setting at the decay and decides again at its next decision point). A decay that falls on an
interval's end wins over that interval's decision, as in the reference.

Clock: the rule counts the training steps the aggregator takes (dense warm-up steps included), so
``lr_milestones`` are training steps. ``interval`` stands for the paper's epoch: set it to the steps of one epoch
(training examples / (workers x batch size)) to follow the paper; the reference compares an epoch with the
epoch ``switch_freq`` (10) epochs earlier and decides every ``switch_freq`` epochs, while here each interval is
compared with the one before it. Departures from the reference: the norms are averaged over the workers (the
reference uses worker 0's and broadcasts its decisions; one all-reduce of L numbers here either way), and the
threshold is an option (the reference hard-codes 0.5).

``"accordion-global"``: one decision for every layer, from the aggregated update U_t (what every worker applies,
before momentum, over the compressed tensors) accumulated over ``interval`` compressed steps, Delta = sum_t U_t,
critical iff | ||Delta_old|| - ||Delta_new|| | / ||Delta_old|| >= threshold. The update is identical on every
worker, so it needs no communication; it sees a decay only through the norm change. ||Delta_old|| = 0 counts as
critical iff ||Delta_new|| > 0.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..options import check_choice, check_float, check_int, check_known_options, invalid
from ..serialization import register_record

ADAPTIVE_RULES = ("accordion", "accordion-global")
KEYS = ("rule", "low_rank", "high_rank", "interval", "threshold")
LAYER_KEYS = KEYS + ("lr_milestones",)
REQUIRED_LAYER_KEYS = ("rule", "low_rank", "high_rank", "interval")
DEFAULT_THRESHOLD = 0.5  # the paper's eta
NO_NORM = -1.0  # previous norm before the first interval ends (norms are >= 0)
EXAMPLE = ('a mapping such as {"rule": "accordion", "low_rank": 1, "high_rank": 4, "interval": 234, '
           '"threshold": 0.5, "lr_milestones": [2340]}')


def critical(threshold: float, previous_norm: float, norm: float, zero_is_critical: bool) -> bool:
    """Accordion's test: |prev - new| / prev >= threshold. prev = 0: ``zero_is_critical`` (per-layer rule, as the
    reference) or new > 0 (global rule)."""
    if previous_norm == 0.0:
        return zero_is_critical or norm > 0.0
    return abs(previous_norm - norm) / previous_norm >= threshold


@dataclass(frozen=True)
class Accordion:
    """The global rule ``"accordion-global"``: one rank for every layer, from the aggregated update's norm."""

    low_rank: int
    high_rank: int
    interval: int
    threshold: float

    def critical(self, previous_norm: float, norm: float) -> bool:
        """Accordion's test: |prev - new| / prev >= threshold (prev = 0: critical iff new > 0)."""
        return critical(self.threshold, previous_norm, norm, zero_is_critical=False)


@dataclass(frozen=True)
class AccordionLayers:
    """The rule ``"accordion"``: a rank per layer from each layer's local-gradient norm, high after lr decays."""

    low_rank: int
    high_rank: int
    interval: int
    threshold: float
    lr_milestones: tuple[int, ...]


@register_record
class AccordionState(NamedTuple):
    rank: int  # the rank of the current interval
    previous_norm: float  # ||Delta|| of the last finished interval; NO_NORM before the first one ends
    accumulated: dict[str, torch.Tensor]  # Delta of the current interval so far: {name: (*shape)}
    decisions: int  # intervals finished (decisions taken, the first one included)


@register_record
class AccordionLayersState(NamedTuple):
    step: int  # training steps observed so far (the rule's clock)
    ranks: dict[str, int]  # {layer: rank} for the next step
    previous_norms: dict[str, float]  # {layer: N_l} of the last finished interval; NO_NORM before the first
    accumulated: dict[str, torch.Tensor]  # {layer: (k, *shape)}: each local worker's gradient summed so far
    decisions: int  # intervals finished


def parse_adaptive(owner: str, value) -> Accordion | AccordionLayers:
    """Validate ``adaptive={...}``: every key checked, ValueError naming ``adaptive.<key>``."""
    if not isinstance(value, Mapping):
        raise invalid(owner, "adaptive", value, EXAMPLE)
    check_choice(owner, "adaptive.rule", value.get("rule"), ADAPTIVE_RULES)
    layered = value["rule"] == "accordion"
    check_known_options(f"{owner} adaptive", value, LAYER_KEYS if layered else KEYS)
    required = REQUIRED_LAYER_KEYS if layered else KEYS
    missing = [k for k in required if k not in value]
    if missing:
        raise invalid(owner, "adaptive", dict(value), f"a mapping with every key of {list(required)} (missing {missing})")
    low = check_int(owner, "adaptive.low_rank", value["low_rank"], minimum=1)
    high = check_int(owner, "adaptive.high_rank", value["high_rank"], minimum=1)
    if high < low:
        raise invalid(owner, "adaptive.high_rank", high, f"an integer >= adaptive.low_rank ({low})")
    interval = check_int(owner, "adaptive.interval", value["interval"], minimum=1)
    threshold = check_float(owner, "adaptive.threshold", value.get("threshold", DEFAULT_THRESHOLD), minimum=0.0,
                            min_inclusive=False)
    if not layered:
        return Accordion(low, high, interval, float(threshold))
    milestones = value.get("lr_milestones", [])
    if not isinstance(milestones, (list, tuple)) or not all(
            isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in milestones):
        raise invalid(owner, "adaptive.lr_milestones", milestones, "a list of training steps >= 0 (the "
                      "experiment's lr_milestones)")
    return AccordionLayers(low, high, interval, float(threshold), tuple(sorted(set(milestones))))


# -- "accordion-global" -----------------------------------------------------------------------------------
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


# -- "accordion" (per layer) ------------------------------------------------------------------------------
def init_layers(rule: AccordionLayers, shapes, workers: int, dtype, device) -> AccordionLayersState:
    """``shapes``: the compressed layers; ``workers``: the local workers (the leading axis of the gradients)."""
    accumulated = {n: torch.zeros((workers, *s), dtype=dtype, device=device) for n, s in shapes.items()}
    return AccordionLayersState(0, {n: rule.high_rank for n in shapes}, {n: NO_NORM for n in shapes},
                                accumulated, 0)


def observe_layers(rule: AccordionLayers, state: AccordionLayersState, grads: Mapping[str, torch.Tensor], comm
                   ) -> AccordionLayersState:
    """After one training step: add each worker's gradient {layer: (k, *shape)}; at an interval's end, average
    the per-layer norms over the workers (one all-reduce) and decide each layer's rank; after a decay, high."""
    accumulated = {n: acc + grads[n].to(acc.dtype) for n, acc in state.accumulated.items()}
    step = state.step + 1  # steps observed, = the index of the next step
    ranks, previous, decisions = state.ranks, state.previous_norms, state.decisions
    if step % rule.interval == 0 and accumulated:
        names = list(accumulated)
        local = torch.stack([accumulated[n].flatten(1).norm(dim=1) for n in names], dim=1)  # (k, L): ||G_il||
        norms = comm.all_reduce_mean(local, tag="accordion").tolist()  # N_l, identical on every worker: one read
        ranks = {}
        for n, norm in zip(names, norms):
            first = state.previous_norms[n] == NO_NORM  # nothing to compare with yet
            hot = first or critical(rule.threshold, state.previous_norms[n], norm, zero_is_critical=True)
            ranks[n] = rule.high_rank if hot else rule.low_rank
        previous = dict(zip(names, norms))
        accumulated = {n: torch.zeros_like(a) for n, a in accumulated.items()}
        decisions += 1
    if step in rule.lr_milestones:
        ranks = {n: rule.high_rank for n in ranks}  # the next step is the first at the decayed rate
    return AccordionLayersState(step, ranks, previous, accumulated, decisions)
