"""The default engine ("auto"): a static rule on the model, the same engine every run, results unchanged."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

import sim
from sim.engine import LoopEngine, VmapEngine, make_engine, resolve_engine
from sim.tasks import TASK_REGISTRY


def test_default_is_auto():
    assert sim.Experiment().engine == "auto"
    with pytest.raises(ValueError, match=r"engine='fast' is invalid; allowed: one of 'auto', 'vmap', 'loop'"):
        sim.Experiment(engine="fast")


@pytest.mark.parametrize("model,expected", [
    (nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), "vmap"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), "loop"),
    (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), "loop"),
    (nn.Sequential(nn.Conv1d(1, 2, 3)), "loop"),
    (nn.LSTM(4, 4), "loop"),
    (nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 2)), "loop"),
    (nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)), "vmap"),
])
def test_static_rule_on_the_model(model, expected):
    assert resolve_engine("auto", model) == expected
    engine = make_engine("auto", model, nn.functional.cross_entropy)
    assert isinstance(engine, LoopEngine if expected == "loop" else VmapEngine)
    for explicit in ("vmap", "loop"):  # an explicit choice is never overridden
        assert resolve_engine(explicit, model) == explicit


def test_built_in_tasks_resolve_as_documented():
    expected = {"digits-mlp": "vmap", "digits-cnn": "loop", "synthetic-lowrank": "vmap", "charlm-lstm": "loop",
                "fashion-mnist-mlp": "vmap", "fashion-mnist-cnn": "loop"}
    for task, engine in expected.items():
        assert task in TASK_REGISTRY
        s = sim.Simulation(sim.Experiment(task=task, workers=2, batch_size=4))
        assert isinstance(s.engine, LoopEngine if engine == "loop" else VmapEngine), task


@pytest.mark.parametrize("task,resolved", [("digits-cnn", "loop"), ("digits-mlp", "vmap")])
def test_auto_run_is_bitwise_the_resolved_engine_run_and_repeatable(task, resolved):
    base = sim.Experiment(task=task, workers=3, steps=4, batch_size=4, eval_every=2, seed=5,
                          compressor={"name": "powersgd", "rank": 2})
    auto, again, explicit = sim.run(base), sim.run(base), sim.run(base.replace(engine=resolved))
    pd.testing.assert_frame_equal(auto.history, again.history, check_exact=True)
    pd.testing.assert_frame_equal(auto.history, explicit.history, check_exact=True)
    for name, p in auto.params.items():
        assert torch.equal(p, again.params[name]) and torch.equal(p, explicit.params[name])
