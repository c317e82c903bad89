"""Experiment.validation_fraction: a fixed split held out of the training set, evaluated like the test split."""
from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

import sim
from sim.simulation import Simulation
from sim.tasks import SPLIT_SEED, TASK_REGISTRY, custom_task, register_task
from sim.tasks import TASK_VALIDATORS

MLP = dict(task="digits-mlp", task_options={"hidden": (8,)}, workers=2, batch_size=4)
LOWRANK = dict(task="synthetic-lowrank", task_options={"dim_in": 12, "dim_out": 10, "samples": 64, "test_samples": 8},
               workers=2, batch_size=4)


def rows(t: torch.Tensor) -> set[bytes]:
    return {bytes(r.numpy().tobytes()) for r in t.reshape(len(t), -1)}


def test_the_split_partitions_the_training_set_and_keeps_the_test_set():
    whole = Simulation(sim.Experiment(**MLP)).task
    split = Simulation(sim.Experiment(**MLP, validation_fraction=0.25)).task
    n = len(whole.train_x)
    held_out = math.floor(0.25 * n)
    assert (len(split.val_x), len(split.train_x)) == (held_out, n - held_out)
    # the rows of the two parts are exactly the original training rows, and the pairs (x, y) stay together
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    assert torch.equal(split.val_x, whole.train_x[order[:held_out]])
    assert torch.equal(split.val_y, whole.train_y[order[:held_out]])
    kept = order[held_out:].sort().values
    assert torch.equal(split.train_x, whole.train_x[kept]) and torch.equal(split.train_y, whole.train_y[kept])
    assert torch.equal(split.labels, split.train_y)  # label-skew sharding sees the training part only
    assert torch.equal(split.test_x, whole.test_x) and torch.equal(split.test_y, whole.test_y)
    assert whole.val_x is None


def test_the_split_is_the_same_for_every_seed_and_method():
    a = Simulation(sim.Experiment(**MLP, validation_fraction=0.1, seed=0)).task
    b = Simulation(sim.Experiment(**MLP, validation_fraction=0.1, seed=7,
                                  compressor={"name": "powersgd", "rank": 1})).task
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_x, b.train_x)


def test_history_gains_validation_columns_evaluated_like_the_test_split():
    e = sim.Experiment(**MLP, steps=6, eval_every=3, validation_fraction=0.2)
    result = sim.run(e)
    evaluated = result.history.dropna(subset=["test_loss"])
    assert evaluated["step"].tolist() == [3, 6]
    assert evaluated[["val_loss", "val_accuracy"]].notna().all().all()
    assert result.history.dropna(subset=["val_loss"])["step"].tolist() == [3, 6]
    # a slow reference: the model on the held-out samples, by hand
    simulation = Simulation(e)
    model = simulation.model
    out = functional_call(model, ({**result.params}, {}), (simulation.task.val_x,))
    last = evaluated.iloc[-1]
    assert last["val_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(out, simulation.task.val_y)),
                                             rel=1e-5)
    assert last["val_accuracy"] == float((out.argmax(-1) == simulation.task.val_y).double().mean())
    assert "val_loss" not in sim.run(e.replace(validation_fraction=0.0)).history


def test_a_regression_task_reports_validation_loss_and_nan_accuracy():
    history = sim.run(sim.Experiment(**LOWRANK, steps=4, eval_every=2, validation_fraction=0.25)).history
    evaluated = history.dropna(subset=["val_loss"])
    assert len(evaluated) == 2 and evaluated["val_accuracy"].isna().all()


def test_a_registered_custom_task_is_split_too():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=g), torch.randint(0, 2, (40,), generator=g)

    def tiny(*, dtype):
        return custom_task("split-tiny", model=lambda: torch.nn.Linear(3, 2), train=(x, y), test=(x[:5], y[:5]),
                           dtype=dtype)

    register_task("split-tiny", tiny)
    try:
        e = sim.Experiment(task="split-tiny", workers=2, steps=2, batch_size=4, validation_fraction=0.5)
        task = Simulation(e).task
        assert len(task.val_x) == 20 and rows(task.val_x) | rows(task.train_x) == rows(x)
        assert sim.run(e).history["val_accuracy"].notna().any()
    finally:
        TASK_REGISTRY.pop("split-tiny")
        TASK_VALIDATORS.pop("split-tiny")


def test_a_fraction_too_small_for_one_sample_is_refused_naming_the_field():
    e = sim.Experiment(**LOWRANK, validation_fraction=0.01)  # 64 samples: floor(0.64) = 0 held out
    with pytest.raises(ValueError, match="Experiment: validation_fraction=0.01 is invalid.*64 training samples"):
        Simulation(e)


def test_too_few_training_samples_left_for_the_workers_is_refused():
    e = sim.Experiment(**{**LOWRANK, "workers": 40}, validation_fraction=0.5)
    with pytest.raises(ValueError, match="workers=40 is invalid"):
        Simulation(e)


def test_evaluating_a_missing_validation_split_is_refused():
    simulation = Simulation(sim.Experiment(**LOWRANK))
    state = simulation.initial_state()
    with pytest.raises(ValueError, match="split='validation' is invalid"):
        simulation.evaluate(state, "validation")
    with pytest.raises(ValueError, match="split='train' is invalid"):
        simulation.evaluate(state, "train")


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5, math.nan, "0.1", None])
def test_invalid_fractions_are_refused_naming_the_field(value):
    with pytest.raises(ValueError, match="Experiment: validation_fraction="):
        sim.Experiment(validation_fraction=value)
