"""Registry entries for the exact mean and PowerSGD (the other compressors register in their own modules)."""
from __future__ import annotations

from .base import Aggregator
from .error_feedback import ERROR_FEEDBACK_MODES
from .identity import Identity
from .options import MAX_SEED, check_bool, check_choice, check_float, check_int, invalid
from .orthogonalize import ORTHOGONALIZATIONS
from .policies import compose
from .powersgd import PowerSGDKernel, VARIANTS
from .ranks.adaptive import AccordionLayers, parse_adaptive
from .ranks.control import RankControl, RankedPowerSGD
from .ranks.layers import LayerRanks, parse_layer_ranks, parse_rank_allocation
from .ranks.schedule import parse_rank_schedule
from .registry import register


def check_policies(owner: str, error_feedback, min_compression_rate, start_compressing_after_num_steps):
    check_choice(owner, "error_feedback", error_feedback, ERROR_FEEDBACK_MODES)
    check_float(owner, "min_compression_rate", min_compression_rate, minimum=0.0)
    check_int(owner, "start_compressing_after_num_steps", start_compressing_after_num_steps, minimum=0)


@register("identity")
def make_identity(*, error_feedback: str = "none") -> Aggregator:
    """Exact mean via one packed all-reduce (no error, so error feedback keeps a zero memory)."""
    check_choice("identity", "error_feedback", error_feedback, ERROR_FEEDBACK_MODES)
    return compose(Identity(), error_feedback=error_feedback, min_compression_rate=0.0, compress_vectors=True)


class DefaultRank(int):
    """PowerSGD's default rank, 1: an int that shows as 1 (``options_of``, ``python -m sim list compressors``)
    and that the factory tells apart from a rank the caller gave, which a rank rule refuses."""


DEFAULT_RANK = DefaultRank(1)


@register("powersgd")
def make_powersgd(*, rank: int = DEFAULT_RANK, num_iters_per_step: int = 1, warm_start: bool = True,
                  variant: str = "paper", orthogonalization: str = "qr", epsilon: float = 1e-8,
                  min_compression_rate: float = 2.0, start_compressing_after_num_steps: int = 0,
                  error_feedback: str = "local", seed: int | None = None, rank_schedule=None, adaptive=None,
                  layer_ranks=None, rank_allocation=None) -> Aggregator:
    """PowerSGD. Defaults: the paper's algorithm (variant "paper", local error feedback, warm start) at rank 1
    (``rank=1``, the smallest: give the rank you mean, e.g. ``make("powersgd", rank=2)``).

    Ranks over time and layers (docs/rank_schedules.md): ``rank_schedule=[[0, 4], [100, 2], ...]`` (first step,
    rank) phases; ``adaptive={"rule": "accordion", ...}`` (per layer, from
    the workers' gradients, high rank after lr decays) or ``{"rule": "accordion-global", ...}``; ``rank_allocation={"rule": "spectral", ...}`` (one
    bit budget over layers); ``layer_ranks={"conv*": 2, ...}`` (name patterns; unmatched tensors use ``rank``).
    At most one of rank_schedule/adaptive/rank_allocation, which then decides every rank: giving ``rank`` or
    ``layer_ranks`` with it is refused (ValueError) rather than silently overridden.
    """
    owner = "powersgd"
    rules = [(k, v) for k, v in (("rank_schedule", rank_schedule), ("adaptive", adaptive),
                                 ("rank_allocation", rank_allocation)) if v is not None]
    if len(rules) > 1:
        raise invalid(owner, rules[1][0], rules[1][1], f"None when {rules[0][0]} is given (one rule decides the "
                      "ranks over time)")
    if rank is None:  # None: the default (left out)
        rank = DEFAULT_RANK
    if rules and rank is not DEFAULT_RANK:
        raise invalid(owner, "rank", rank, f"None (leave it out) when {rules[0][0]} is given: {rules[0][0]} "
                      "decides every rank")
    if rules and layer_ranks is not None:
        raise invalid(owner, "layer_ranks", layer_ranks, f"None when {rules[0][0]} is given (per-layer patterns "
                      "combine with a fixed rank only)")
    check_int(owner, "rank", rank, minimum=1)
    check_int(owner, "num_iters_per_step", num_iters_per_step, minimum=1)
    check_bool(owner, "warm_start", warm_start)
    check_choice(owner, "variant", variant, VARIANTS)
    check_choice(owner, "orthogonalization", orthogonalization, ORTHOGONALIZATIONS)
    check_float(owner, "epsilon", epsilon, minimum=0.0)
    check_policies(owner, error_feedback, min_compression_rate, start_compressing_after_num_steps)
    if seed is not None:
        check_int(owner, "seed", seed, minimum=0, maximum=MAX_SEED)
    options = (num_iters_per_step, warm_start, variant, orthogonalization, epsilon, seed)
    if not rules and layer_ranks is None:
        kernel = PowerSGDKernel(rank, *options)
        return compose(kernel, error_feedback=error_feedback, min_compression_rate=min_compression_rate,
                       start_compressing_after_num_steps=start_compressing_after_num_steps)
    schedule = adaptive_rule = allocation = None
    layer_rank, separate = None, False
    if rank_schedule is not None:
        schedule = parse_rank_schedule(owner, rank_schedule)
        capacity = max(r for _, r in schedule)
    elif adaptive is not None:
        adaptive_rule = parse_adaptive(owner, adaptive)
        # per-layer Accordion: one group per tensor, so that a layer's factors keep their key whatever the others do
        capacity, separate = adaptive_rule.high_rank, isinstance(adaptive_rule, AccordionLayers)
    elif rank_allocation is not None:
        allocation = parse_rank_allocation(owner, rank_allocation)
        capacity, separate = allocation.max_rank, True
    else:
        layer_rank = LayerRanks(parse_layer_ranks(owner, layer_ranks), rank)
        capacity = layer_rank.largest
    kernel = PowerSGDKernel(capacity, *options, layer_rank=layer_rank, separate=separate)
    control = RankControl(kernel, schedule=schedule, adaptive=adaptive_rule, allocation=allocation)
    return RankedPowerSGD(control, error_feedback=error_feedback, min_compression_rate=min_compression_rate,
                          start_compressing_after_num_steps=start_compressing_after_num_steps)
