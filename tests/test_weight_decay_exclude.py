"""Experiment.weight_decay_exclude: the excluded parameters get no weight decay, as torch.optim's second
parameter group with weight_decay 0; validation and the pattern-matches-nothing warning."""
from __future__ import annotations

import warnings

import pytest
import torch

import sim
from sim.optim import decay_excluded, make_optimizer
from sim.simulation import Simulation

SHAPES = {"layer.weight": (6, 4), "layer.bias": (6,), "norm.weight": (6,), "norm.bias": (6,), "head.weight": (3, 6)}
EXCLUDE = ("*bias", "norm*")
WEIGHT_DECAY = 0.1


def torch_optimizer(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, foreach=False)
    kind = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return kind(groups, lr=0.1, foreach=False)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_matches_torch_with_a_no_decay_parameter_group(name):
    g = torch.Generator().manual_seed(0)
    start = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()}
    no_decay = decay_excluded(SHAPES, EXCLUDE)
    assert no_decay == {"layer.bias", "norm.weight", "norm.bias"}
    ours = make_optimizer(name, {}, momentum=0.9, nesterov=name == "sgd", weight_decay=WEIGHT_DECAY,
                          no_decay=no_decay)
    params, state = dict(start), ours.init(start)
    leaves = {n: torch.nn.Parameter(p.clone()) for n, p in start.items()}
    oracle = torch_optimizer(name, [
        {"params": [p for n, p in leaves.items() if n not in no_decay], "weight_decay": WEIGHT_DECAY},
        {"params": [p for n, p in leaves.items() if n in no_decay], "weight_decay": 0.0}])
    for step in range(20):
        update = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()}
        lr = 0.1 / (1 + step)
        params, state = ours.step(params, update, state, lr)
        for group in oracle.param_groups:
            group["lr"] = lr
        for n, p in leaves.items():
            p.grad = update[n].clone()
        oracle.step()
    for n, p in leaves.items():  # the same operations in the same order: equal, not merely close
        assert torch.equal(params[n], p.detach()), n


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_excluded_parameters_are_not_decayed_and_the_others_are(name):
    """With a zero update, only weight decay moves a parameter."""
    params = {n: torch.ones(s) for n, s in SHAPES.items()}
    zero = {n: torch.zeros(s) for n, s in SHAPES.items()}
    optimizer = make_optimizer(name, {}, momentum=0.0, nesterov=False, weight_decay=WEIGHT_DECAY,
                               no_decay=decay_excluded(SHAPES, EXCLUDE))
    moved, _ = optimizer.step(params, zero, optimizer.init(params), lr=0.5)
    changed = {n for n in SHAPES if not torch.equal(moved[n], params[n])}
    assert changed == {"layer.weight", "head.weight"}


def test_a_run_excludes_the_matching_parameters():
    e = sim.Experiment(task="digits-mlp", task_options={"hidden": (8,)}, workers=2, steps=6, batch_size=4,
                       weight_decay=0.5, weight_decay_exclude=["*bias"], eval_every=0)
    simulation = Simulation(e)
    assert simulation.optimizer.no_decay == {"0.bias", "2.bias"}
    excluded, decayed = sim.run(e), sim.run(e.replace(weight_decay_exclude=()))
    assert not torch.equal(excluded.params["0.bias"], decayed.params["0.bias"])
    # the exclusion travels in the experiment dict: configs, manifests and checkpoints carry it
    assert e.to_dict()["weight_decay_exclude"] == ["*bias"]
    assert sim.Experiment.from_dict(e.to_dict()) == e


def test_a_pattern_matching_no_parameter_warns_naming_it_and_the_parameters():
    e = sim.Experiment(task="digits-mlp", task_options={"hidden": (8,)}, weight_decay=0.1,
                       weight_decay_exclude=["*bias", "*norm*"])
    with pytest.warns(UserWarning, match=r"weight_decay_exclude: pattern '\*norm\*' matches no parameter.*0\.weight"):
        simulation = Simulation(e)
    assert simulation.optimizer.no_decay == {"0.bias", "2.bias"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every pattern matches: no warning
        Simulation(e.replace(weight_decay_exclude=["*bias"]))


def test_patterns_are_case_sensitive_on_every_platform():
    assert decay_excluded(["Norm.weight", "norm.weight"], ["norm*"]) == {"norm.weight"}


@pytest.mark.parametrize("value", ["*bias", [""], ["*bias", 3], None, {"*bias": 1}])
def test_invalid_patterns_are_refused_naming_the_field(value):
    with pytest.raises(ValueError, match="Experiment: weight_decay_exclude="):
        sim.Experiment(weight_decay_exclude=value)
