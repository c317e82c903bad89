"""PowerSGD whose ranks change over steps or layers: a schedule, Accordion, per-layer patterns, a spectral budget.

``RankControl`` wraps the PowerSGD kernel where error feedback expects a kernel. Its state holds the kernel's
state with every warm-start factor stored at its largest ("capacity") rank, the ranks of the last step and the
rule's own state; each step it decides the ranks, adapts the stored factors when they change, and runs the
kernel on the leading columns. ``RankedPowerSGD`` is the aggregator ``compressors.make("powersgd", ...)``
returns for these options: the usual Warmup(Partition(ErrorFeedback(.))) stack, plus per-phase accounting
and the ``rank`` history column (``metrics``).

Warm start across a change of rank (per group of batched matrices): growing r_old -> r_new keeps the first
r_old columns of P and Q and replaces columns r_old..r_new-1 by fresh Gaussian columns drawn from the
generator shared by all workers (the kernel's), made orthonormal and orthogonal to the kept columns' span;
shrinking keeps the leading r_new columns (the rest stay stored, unused). Error-feedback memory is never
touched. A constant schedule never changes a rank, so it runs exactly the fixed-rank computation.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..base import Aggregator, numel
from ..error_feedback import with_error_feedback
from ..identity import Identity
from ..policies import Partition, Warmup
from ..powersgd import PowerSGDKernel, PowerSGDState
from ..serialization import register_record
from .adaptive import (Accordion, AccordionLayers, AccordionLayersState, init_layers, init_state as init_accordion,
                       observe as observe_accordion, observe_layers)
from .layers import SpectralAllocation, init_allocation, observe_allocation
from .schedule import Phase, rank_at, steps_in_phases


@register_record
class RankControlState(NamedTuple):
    ranks: dict[str, int]  # {name: rank} of the last step (before the first step: those of step 0)
    rule: object  # AccordionState, AllocationState, or () for a schedule / fixed ranks
    kernel: PowerSGDState  # its ``step`` counts compressed steps (the schedule's clock); factors at capacity


@register_record
class LayerRuleState(NamedTuple):
    """``RankedPowerSGD``'s state under a rule that observes the workers' own gradients (Accordion per layer)."""

    stack: object  # the Warmup/Partition stack's state; its RankControlState.rule holds this step's {layer: rank}
    rule: AccordionLayersState


class RankControl(Aggregator):
    """The PowerSGD kernel with ranks decided each step by one rule (at most one of schedule/adaptive/allocation).

    ``kernel`` is configured at capacity: its ``rank`` is the largest rank any tensor may take (per-layer
    patterns through its ``layer_rank``; one group per tensor for an allocation).
    """

    name = "powersgd"
    all_reducible = True

    def __init__(self, kernel: PowerSGDKernel, *, schedule=None, adaptive: Accordion | AccordionLayers | None = None,
                 allocation: SpectralAllocation | None = None):
        self.kernel = kernel
        self.schedule = schedule
        self.adaptive = adaptive
        self.allocation = allocation

    # -- ranks -------------------------------------------------------------------------------------------
    def unit_bits(self, shapes, dtype=torch.float32) -> dict[str, float]:
        """Bits one rank unit of each tensor costs per step (the allocation's c_l)."""
        return {n: self.kernel.bits_at_ranks({n: s}, 1, dtype=dtype) for n, s in shapes.items()}

    def ranks_for(self, shapes, step: int, rule_state) -> dict[str, int]:
        if self.schedule is not None:
            r = rank_at(self.schedule, step)
            return {n: r for n in shapes}
        if isinstance(self.adaptive, AccordionLayers):
            return {n: rule_state[n] for n in shapes}  # decided by RankedPowerSGD from the workers' gradients
        if self.adaptive is not None:
            return {n: rule_state.rank for n in shapes}
        if self.allocation is not None:
            return {n: rule_state.ranks[n] for n in shapes}
        fixed = self.kernel.ranks(shapes)
        return {n: fixed for n in shapes} if isinstance(fixed, int) else fixed

    def smallest_ranks(self, shapes) -> dict[str, int]:
        """The lowest rank each tensor can take over a run (what the theory claim must cover)."""
        if self.schedule is not None:
            return {n: min(r for _, r in self.schedule) for n in shapes}
        if self.adaptive is not None:
            return {n: self.adaptive.low_rank for n in shapes}
        if self.allocation is not None:
            return {n: 1 for n in shapes}
        return self.ranks_for(shapes, 0, ())

    def _init_rule(self, shapes, dtype, device):
        if isinstance(self.adaptive, AccordionLayers):
            return {n: self.adaptive.high_rank for n in shapes}
        if self.adaptive is not None:
            return init_accordion(self.adaptive, shapes, dtype, device)
        if self.allocation is not None:
            return init_allocation(self.allocation, shapes, self.unit_bits(shapes, dtype), dtype, device)
        return ()

    def _observe(self, rule_state, step, update, shapes, dtype):
        if isinstance(self.adaptive, AccordionLayers):
            return rule_state
        if self.adaptive is not None:
            return observe_accordion(self.adaptive, rule_state, step, update)
        if self.allocation is not None:
            return observe_allocation(self.allocation, rule_state, step, update, shapes, self.unit_bits(shapes, dtype))
        return rule_state

    # -- aggregator --------------------------------------------------------------------------------------
    def init(self, shapes, workers, seed=0, dtype=torch.float32, device="cpu"):
        kernel_state = self.kernel.init(shapes, workers, seed, dtype=dtype, device=device)
        rule_state = self._init_rule(shapes, dtype, device)
        return RankControlState(self.ranks_for(shapes, 0, rule_state), rule_state, kernel_state)

    def reduce(self, grads, state, comm, want_local=False):
        return self._step(grads, state, comm, want_local, residual=False)

    def reduce_residual(self, x, state, comm):
        return self._step(x, state, comm, want_local=False, residual=True)

    def _step(self, grads, state, comm, want_local, residual):
        shapes = {n: tuple(g.shape[1:]) for n, g in grads.items()}
        stored = state.kernel
        ranks = self.ranks_for(shapes, stored.step, state.rule)
        if ranks != state.ranks:
            stored = self._warm_start_change(shapes, stored, state.ranks, ranks)
        active = self._active(shapes, stored, ranks)
        if residual:
            reduced, new_active, residuals = self.kernel.reduce_residual(grads, active, comm, ranks=ranks)
        else:
            reduced, new_active = self.kernel.reduce_at_ranks(grads, active, comm, want_local, ranks=ranks)
        stored = PowerSGDState(new_active.step, new_active.rng, _merge(new_active.p, stored.p),
                               _merge(new_active.q, stored.q))
        dtype = next(iter(grads.values())).dtype
        rule_state = self._observe(state.rule, state.kernel.step, reduced.update, shapes, dtype)
        new_state = RankControlState(ranks, rule_state, stored)
        return (reduced, new_state, residuals) if residual else (reduced, new_state)

    def _active(self, shapes, stored: PowerSGDState, ranks) -> PowerSGDState:
        """The stored factors cut to this step's ranks: (G, a, capacity) -> (G, a, r), leading columns."""
        cut = {gr.key: gr.rank for gr in self.kernel.groups(shapes, ranks)}
        return PowerSGDState(stored.step, stored.rng, {k: v[..., :cut[k]] for k, v in stored.p.items()},
                             {k: v[..., :cut[k]] for k, v in stored.q.items()})

    def _warm_start_change(self, shapes, stored: PowerSGDState, old, new) -> PowerSGDState:
        """Grow: keep the old columns, fill the new ones with fresh orthonormal columns orthogonal to them."""
        before = {gr.key: gr.rank for gr in self.kernel.groups(shapes, old)}
        after = {gr.key: gr.rank for gr in self.kernel.groups(shapes, new)}
        generator = torch.Generator().manual_seed(0)
        generator.set_state(stored.rng)
        p, q = dict(stored.p), dict(stored.q)
        for key in sorted(after):  # a fixed order: every worker draws the same numbers
            r_old, r_new = before[key], after[key]
            if r_new <= r_old:
                continue
            p[key] = _grow(p[key], r_old, r_new, generator)
            q[key] = _grow(q[key], r_old, r_new, generator)
        return PowerSGDState(stored.step, generator.get_state(), p, q)

    # -- accounting --------------------------------------------------------------------------------------
    def bits_at(self, shapes, ranks, dtype=torch.float32) -> float:
        return self.kernel.bits_at_ranks(shapes, ranks, dtype=dtype)

    def bits_per_step(self, shapes, dtype=torch.float32):
        """Bits of the first step (the first phase's rank, Accordion's high rank, the initial allocation)."""
        rule_state = self._init_rule(shapes, dtype, "cpu")
        return self.bits_at(shapes, self.ranks_for(shapes, 0, rule_state), dtype)

    def theory(self, shapes):
        """The claim at the lowest rank each tensor can take (it then holds at every rank of the run)."""
        return self.kernel.theory_at_ranks(shapes, self.smallest_ranks(shapes))

    def metrics(self, state: RankControlState) -> dict[str, float]:
        """``rank``: the mean rank over compressed tensors at the last step (a tensor whose matrix view has
        min(n, m) below it is sent at min(n, m)); per-layer rules add ``rank/<name>`` for each tensor."""
        if not state.ranks:
            return {}
        out: dict[str, float] = {"rank": float(sum(state.ranks.values()) / len(state.ranks))}
        if self.allocation is not None or self.kernel.layer_rank is not None or isinstance(self.adaptive, AccordionLayers):
            out.update({f"rank/{n}": float(r) for n, r in state.ranks.items()})
        return out

    def __repr__(self):
        rule = (f"schedule={[list(p) for p in self.schedule]}" if self.schedule is not None else
                f"adaptive={self.adaptive}" if self.adaptive is not None else
                f"allocation={self.allocation}" if self.allocation is not None else "fixed")
        return f"RankControl({self.kernel!r}, {rule})"


def _merge(active: dict[str, torch.Tensor], stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This step's factors (G, a, r) written over the leading columns of the stored ones (G, a, capacity)."""
    out = {}
    for key, new in active.items():
        old = stored[key]
        out[key] = new if new.shape[-1] == old.shape[-1] else torch.cat([new, old[..., new.shape[-1]:].to(new.dtype)], -1)
    return out


def _grow(factor: torch.Tensor, r_old: int, r_new: int, generator: torch.Generator) -> torch.Tensor:
    """(G, a, capacity): columns r_old..r_new-1 replaced by fresh orthonormal columns orthogonal to columns
    0..r_old-1. Drawn on the CPU in float64 from the shared generator (identical on every worker; a factor's
    size, not a gradient's), then orthogonalized in float64 on the factor's device (no copy to the host)."""
    g, a, _ = factor.shape
    fresh = torch.randn((g, a, r_new - r_old), generator=generator, dtype=torch.float64)  # (G, a, r_new - r_old)
    fresh = fresh.to(factor.device)
    kept = factor[..., :r_old].detach().to(torch.float64)  # (G, a, r_old)
    if r_old > 0:
        basis, _ = torch.linalg.qr(kept)  # (G, a, r_old), orthonormal span of the kept columns
        fresh = fresh - basis @ (basis.transpose(-1, -2) @ fresh)  # project the kept span out
        fresh = fresh - basis @ (basis.transpose(-1, -2) @ fresh)  # twice: "twice is enough" (Parlett)
    fresh, _ = torch.linalg.qr(fresh)  # (G, a, r_new - r_old), orthonormal
    out = factor.clone()
    out[..., r_old:r_new] = fresh.to(dtype=factor.dtype)
    return out


class NamedPartition(Partition):
    """``Partition`` whose rule sees each tensor's name (per-layer ranks decide by name)."""

    def split(self, shapes):
        chosen = {n: tuple(s) for n, s in shapes.items() if self.rule(n, tuple(s))}
        rest = {n: tuple(s) for n, s in shapes.items() if n not in chosen}
        return chosen, rest


class RankedPowerSGD(Aggregator):
    """PowerSGD with a rank schedule, Accordion, per-layer ranks or a spectral allocation (``compressors.make``).

    The stack is Warmup(NamedPartition(ErrorFeedback(RankControl(kernel)))). A tensor is compressed iff it is
    a matrix and worth compressing (dense / sent > ``min_compression_rate``) at the largest rank it may take
    over the run: the split is fixed for the whole run.

    Accordion per layer (``adaptive={"rule": "accordion", ...}``) observes each worker's own gradient before error
    feedback, which only this outermost level sees: the state is then ``LayerRuleState(stack, rule)``; each step
    the rule's ranks are written into the stack's ``RankControlState.rule``, the stack runs, and the rule
    observes the compressed layers' gradients.
    """

    name = "powersgd"
    all_reducible = True

    def __init__(self, control: RankControl, *, error_feedback: str = "local", min_compression_rate: float = 2.0,
                 start_compressing_after_num_steps: int = 0):
        self.control = control
        self.min_compression_rate = min_compression_rate
        self.error_feedback = error_feedback
        self.partition = NamedPartition(with_error_feedback(control, error_feedback), self._worth_compressing)
        self.steps = start_compressing_after_num_steps  # dense warm-up steps (as ``Warmup.steps``)
        self.stack = Warmup(self.partition, self.steps) if self.steps > 0 else self.partition

    def _worth_compressing(self, name: str, shape: tuple[int, ...]) -> bool:
        if len(shape) <= 1 or numel(shape) == 0:
            return False
        kernel = self.control.kernel
        capacity = kernel.ranks({name: shape})
        sent = kernel.bits_at_ranks({name: shape}, capacity, dtype=torch.float32)
        return sent == 0 or numel(shape) * 32 / sent > self.min_compression_rate

    @property
    def layer_rule(self) -> AccordionLayers | None:
        adaptive = self.control.adaptive
        return adaptive if isinstance(adaptive, AccordionLayers) else None

    def init(self, shapes, workers, seed=0, dtype=torch.float32, device="cpu"):
        stack = self.stack.init(shapes, workers, seed, dtype=dtype, device=device)
        if self.layer_rule is None:
            return stack
        chosen, _ = self.partition.split(shapes)
        return LayerRuleState(stack, init_layers(self.layer_rule, chosen, workers, dtype, device))

    def reduce(self, grads, state, comm, want_local=False):
        if self.layer_rule is None:
            return self.stack.reduce(grads, state, comm, want_local)
        stack = self._with_ranks(state.stack, state.rule.ranks)
        reduced, stack = self.stack.reduce(grads, stack, comm, want_local)
        observed = {n: grads[n] for n in state.rule.accumulated}  # the compressed layers: (k, *shape) each
        return reduced, LayerRuleState(stack, observe_layers(self.layer_rule, state.rule, observed, comm))

    def _with_ranks(self, stack, ranks: dict[str, int]):
        """The stack's state with ``ranks`` as its RankControlState's rule state (Warmup > Partition > EF > control)."""
        def into_partition(partition):
            compressed = partition.compressed
            if self.error_feedback == "none":
                compressed = compressed._replace(rule=dict(ranks))
            else:
                compressed = compressed._replace(inner=compressed.inner._replace(rule=dict(ranks)))
            return partition._replace(compressed=compressed)
        return stack._replace(inner=into_partition(stack.inner)) if self.steps > 0 else into_partition(stack)

    def theory(self, shapes):
        return self.stack.theory(shapes)

    # -- accounting --------------------------------------------------------------------------------------
    def bits_per_step(self, shapes, *, dtype=torch.float32):
        """Bits one worker sends on the first compressed step (its phase's rank; see ``bits_per_phase``)."""
        return self.stack.bits_per_step(shapes, dtype=dtype)

    def bits_per_phase(self, shapes, *, dtype=torch.float32) -> list[Phase]:
        """One ``Phase(first_step, rank, bits)`` per schedule phase (one phase for fixed ranks), steps counted in
        compressed steps. Adaptive rules decide at run time: ValueError (read the history's ``bits``)."""
        control = self.control
        if control.adaptive is not None or control.allocation is not None:
            raise ValueError("powersgd: bits_per_phase is invalid for adaptive or allocated ranks; allowed: a "
                             "rank_schedule or fixed ranks (adaptive ranks are decided at run time: read the bits "
                             "column of the history)")
        chosen, rest = self.partition.split(shapes)
        dense = Identity().bits_per_step(rest, dtype=dtype) if rest else 0
        schedule = control.schedule or ((0, control.kernel.rank),)
        return [Phase(first, rank, dense + (control.bits_at(chosen, {n: rank for n in chosen}, dtype)
                                            if control.schedule is not None else control.bits_at(chosen, None, dtype)))
                for first, rank in schedule]

    def average_bits_per_step(self, shapes, steps: int, *, dtype=torch.float32) -> float:
        """Mean bits per step over the first ``steps`` training steps (warm-up steps send the dense gradient)."""
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"powersgd: steps={steps!r} is invalid; allowed: an integer >= 1")
        warm = min(steps, self.steps)
        total = warm * Identity().bits_per_step(shapes, dtype=dtype)
        phases = self.bits_per_phase(shapes, dtype=dtype)
        schedule = tuple((p.first_step, p.rank) for p in phases)
        for phase, count in zip(phases, steps_in_phases(schedule, steps - warm)):
            total += count * phase.bits
        return total / steps

    def metrics(self, state) -> dict[str, float]:
        """The ``rank`` history column (``RankControl.metrics``); NaN during a dense warm-up."""
        if self.layer_rule is not None:
            state = state.stack
        if self.steps > 0:
            if state.step <= self.steps:  # the last step taken (state.step - 1) was a dense one
                return {"rank": math.nan}
            state = state.inner
        inner = state.compressed
        if self.error_feedback != "none":
            inner = inner.inner
        return self.control.metrics(inner)

    def __repr__(self):
        return (f"RankedPowerSGD({self.control!r}, error_feedback={self.error_feedback!r}, "
                f"min_compression_rate={self.min_compression_rate}, start_compressing_after_num_steps={self.steps})")
