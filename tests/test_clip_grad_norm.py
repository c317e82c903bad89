"""Experiment.clip_grad_norm: the aggregated update is clipped by its global norm, as
torch.nn.utils.clip_grad_norm_ clips gradients; validation."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import sim
from sim.optim import clip_by_global_norm

SHAPES = {"w": (5, 3), "b": (5,), "scale": (), "conv": (2, 3, 3, 3)}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), max_norm=st.floats(1e-3, 1e3), magnitude=st.floats(1e-4, 1e4),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_equals_torch_clip_grad_norm_on_the_same_tensors(seed, max_norm, magnitude, dtype):
    g = torch.Generator().manual_seed(seed)
    update = {n: torch.randn(s, generator=g, dtype=dtype) * magnitude for n, s in SHAPES.items()}
    before = {n: u.clone() for n, u in update.items()}
    clipped, norm = clip_by_global_norm(update, max_norm)

    leaves = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in SHAPES.values()]
    for p, u in zip(leaves, update.values()):
        p.grad = u.clone()
    total = torch.nn.utils.clip_grad_norm_(leaves, max_norm)
    assert float(norm) == float(total)
    for (name, u), p in zip(clipped.items(), leaves):
        assert torch.equal(u, p.grad), name  # the same arithmetic: bitwise
        assert torch.equal(update[name], before[name])  # out of place: the aggregator's tensors are untouched
    assert math.sqrt(sum(float(u.double().pow(2).sum()) for u in clipped.values())) <= max_norm * (1 + 1e-5)


def test_an_update_below_the_threshold_is_unchanged_bitwise():
    update = {"w": torch.full((4, 4), 0.1)}
    clipped, norm = clip_by_global_norm(update, 10.0)
    assert float(norm) == pytest.approx(0.4) and torch.equal(clipped["w"], update["w"])


def test_a_run_clips_the_update_every_worker_applies():
    """SGD without momentum: the parameter step is lr * the clipped update, whose norm is at most clip_grad_norm,
    and the history's update_norm is the norm before clipping."""
    e = sim.Experiment(task="digits-mlp", task_options={"hidden": (8,)}, workers=4, steps=5, batch_size=8,
                       lr=0.5, momentum=0.0, clip_grad_norm=0.05, eval_every=0, dtype="float64")
    simulation = sim.simulation.Simulation(e)
    state = simulation.initial_state()
    for _ in range(e.steps):
        new, metrics = simulation.step(state)
        moved = math.sqrt(sum(float((new.params[n] - state.params[n]).pow(2).sum()) for n in state.params))
        assert metrics["update_norm"] > e.clip_grad_norm  # clipping is active in this test...
        norm = metrics["update_norm"]  # torch's scale: max_norm / (norm + 1e-6)
        assert moved == pytest.approx(e.lr * e.clip_grad_norm * norm / (norm + 1e-6), rel=1e-9)  # ...bounds the step
        state = new
    history = sim.run(e).history
    assert "update_norm" in history and "update_norm" not in sim.run(e.replace(clip_grad_norm=None)).history


@pytest.mark.parametrize("value", [0, 0.0, -1.0, math.inf, math.nan, "1", True])
def test_invalid_values_are_refused_naming_the_field(value):
    with pytest.raises(ValueError, match="Experiment: clip_grad_norm="):
        sim.Experiment(clip_grad_norm=value)
