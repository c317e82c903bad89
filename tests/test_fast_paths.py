"""The simulator's fast paths against their slow obvious forms (issue 7's optimizations).

- PowerSGD's fused residual (``reduce_residual``: x_i - P^ Q_i^T by one ``baddbmm_`` into x) against
  ``reduce(want_local=True)`` then x - local, for both variants, groups stacked or kept as members.
- Local error feedback through that path against the generic wrapper path (a kernel without the method).
- The one-read finiteness probes against ``torch.isfinite(t).all()``, the float32 memory norm against float64.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compressors
from compressors import powersgd
from compressors.error_feedback import ErrorFeedback
from compressors.powersgd import PowerSGDKernel
from compressors.state_tree import memory_norm, squared_norm
from compressors.comm import VirtualCollective
from sim.simulation import all_finite, nonfinite
from compressors.state_tree import float_leaves

F64 = torch.float64
SHAPES = {"a": (6, 5), "b": (6, 5), "c": (4, 2, 3), "d": (7, 3)}  # a, b: one group of two members


def _grads(workers: int, seed: int, dtype=F64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn((workers, *s), generator=g, dtype=dtype) for n, s in SHAPES.items()}


@pytest.mark.parametrize("variant", ["paper", "alternating"])
@pytest.mark.parametrize("stack_below", [1 << 16, 1])  # members stacked; members kept separate
@given(seed=st.integers(0, 1000), workers=st.integers(1, 4), rank=st.integers(1, 3))
@settings(max_examples=8, deadline=None)
def test_fused_residual_equals_x_minus_local(variant, stack_below, seed, workers, rank):
    kernel = PowerSGDKernel(rank=rank, variant=variant)
    state = kernel.init(SHAPES, workers, seed=seed, dtype=F64)
    x = _grads(workers, seed)
    old = powersgd.STACK_BELOW_ELEMENTS
    powersgd.STACK_BELOW_ELEMENTS = stack_below
    try:
        slow, slow_state = kernel.reduce(x, state, VirtualCollective(workers), want_local=True)
        x_fast = {n: t.clone() for n, t in x.items()}
        fast, fast_state, residuals = kernel.reduce_residual(x_fast, state, VirtualCollective(workers))
    finally:
        powersgd.STACK_BELOW_ELEMENTS = old
    assert fast.local is None
    for name in SHAPES:
        torch.testing.assert_close(fast.update[name], slow.update[name], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(residuals[name], x[name] - slow.local[name], rtol=1e-12, atol=1e-12)
        assert residuals[name].data_ptr() == x_fast[name].data_ptr()  # written in place, no new W copy
    for key in slow_state.q:
        torch.testing.assert_close(fast_state.q[key], slow_state.q[key], rtol=1e-12, atol=1e-12)
    assert torch.equal(fast_state.rng, slow_state.rng)


def test_local_error_feedback_fused_path_equals_generic_path():
    workers, steps = 3, 4
    fast = ErrorFeedback(PowerSGDKernel(rank=2), "local")
    slow = ErrorFeedback(_Generic(PowerSGDKernel(rank=2)), "local")
    slow_state = fast_state = fast.init(SHAPES, workers, seed=0, dtype=F64)
    for step in range(steps):
        grads = _grads(workers, 10 + step)
        before = {n: g.clone() for n, g in grads.items()}
        a, fast_state = fast.aggregate(grads, fast_state, VirtualCollective(workers))
        b, slow_state = slow.aggregate(grads, slow_state, VirtualCollective(workers))
        assert all(torch.equal(grads[n], before[n]) for n in grads)  # the caller's gradients are untouched
        for name in SHAPES:
            torch.testing.assert_close(a[name], b[name], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(fast_state.memory[name], slow_state.memory[name], rtol=1e-10, atol=1e-12)


class _Generic:
    """Delegates to a kernel but has no ``reduce_residual``: error feedback takes its generic x - C(x) path."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.name = kernel.name
        self.all_reducible = kernel.all_reducible

    def init(self, *args, **kwargs):
        return self.kernel.init(*args, **kwargs)

    def reduce(self, *args, **kwargs):
        return self.kernel.reduce(*args, **kwargs)


@given(shape=st.lists(st.integers(1, 5), min_size=0, max_size=3), bad=st.sampled_from([None, "nan", "inf", "-inf", "huge"]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
@settings(max_examples=60, deadline=None)
def test_finiteness_probe_equals_isfinite_all(shape, bad, dtype):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))).to(dtype)
    if bad is not None and t.numel() > 0:
        flat = t.view(-1)
        if bad == "huge":  # every element finite, but the sum overflows: the exact fallback must say finite
            flat.fill_(torch.finfo(dtype).max)
        else:
            flat[-1] = float(bad)
    expected = bool(torch.isfinite(t).all())
    assert all_finite(t) == expected
    assert (nonfinite({"t": t}, {"t": squared_norm(t)}) == []) == expected
    assert (nonfinite({"t": t.unsqueeze(0)}, {"t": t.unsqueeze(0).sum(0).sum()}) == []) == expected
    assert (nonfinite(dict(float_leaves({"s": (t, {"u": t})}))) == []) == expected  # as Simulation.step


def test_memory_norm_float32_matches_float64_reference():
    agg = compressors.make("powersgd", rank=1, error_feedback="local")
    workers = 4
    state = agg.init(SHAPES, workers, seed=0)
    for step in range(3):
        _, state = agg.aggregate(_grads(workers, step, torch.float32), state, VirtualCollective(workers))
    ef = next(s for s in compressors.iter_states(state) if isinstance(s, compressors.error_feedback.ErrorFeedbackState))
    exact = math.sqrt(sum(float(m.double().pow(2).sum()) / workers for m in ef.memory.values()))
    assert exact > 0
    assert math.isclose(memory_norm(state), exact, rel_tol=1e-7)


@pytest.mark.parametrize("shape", [(), (0,), (7,), (4096,), (3, 5000), (2, 4096, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_squared_norm_matches_float64_sum(shape, dtype):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3 + 1).to(dtype)
    exact = float(x.double().pow(2).sum())
    assert math.isclose(float(squared_norm(x)), exact, rel_tol=1e-6, abs_tol=1e-12)
    assert math.isclose(float(squared_norm(x.transpose(0, -1) if x.dim() > 1 else x)), exact, rel_tol=1e-6, abs_tol=1e-12)
