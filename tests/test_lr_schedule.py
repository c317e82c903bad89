"""Learning-rate schedules (Experiment.lr_schedule) against torch.optim.lr_scheduler; their validation."""
from __future__ import annotations

import math

import pytest
import torch
from torch.optim import lr_scheduler

import sim
from sim.optim import learning_rate

BASE, STEPS = 0.3, 40


def torch_rates(make, steps: int = STEPS, base: float = BASE) -> list[float]:
    """The lr torch's scheduler sets for each of ``steps`` optimizer steps (read before each step)."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=base)
    scheduler = make(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def with_warmup(optimizer, warmup: int, after):
    """torch's linear warm-up from lr / warmup to lr over ``warmup`` steps, then ``after`` (built on the steps left)."""
    if warmup == 0:
        return after(optimizer, STEPS)
    return lr_scheduler.SequentialLR(optimizer, [lr_scheduler.LinearLR(optimizer, 1 / warmup, 1.0, warmup - 1),
                                                 after(optimizer, STEPS - warmup)], milestones=[warmup])


def ours(schedule: str, warmup: int, **options) -> list[float]:
    e = sim.Experiment(steps=STEPS, lr=BASE, lr_schedule=schedule, lr_warmup_steps=warmup, **options)
    return [e.learning_rate(step) for step in range(STEPS)]


@pytest.mark.parametrize("warmup", [0, 2, 7])
def test_cosine_is_torch_cosine_annealing_after_a_linear_warmup(warmup):
    expected = torch_rates(lambda o: with_warmup(o, warmup, lambda o, t: lr_scheduler.CosineAnnealingLR(o, t)))
    got = ours("cosine", warmup)
    assert got == pytest.approx(expected, rel=1e-12, abs=0)
    assert got[warmup] == BASE and 0 < got[-1] < 0.01 * BASE  # starts at lr after the warm-up, ends near 0


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("warmup", [0, 5])
def test_poly_is_torch_polynomial_lr_after_a_linear_warmup(warmup, power):
    expected = torch_rates(lambda o: with_warmup(o, warmup, lambda o, t: lr_scheduler.PolynomialLR(o, t, power)))
    got = ours("poly", warmup, lr_poly_power=power)
    assert got == pytest.approx(expected, rel=1e-12, abs=0)
    assert got[-1] == pytest.approx(BASE * (1 / (STEPS - warmup)) ** power, rel=1e-12)


@pytest.mark.parametrize("warmup", [0, 4])
def test_step_is_torch_multistep_times_the_warmup(warmup):
    milestones, decay = (3, 15, 30), 0.3
    def make(o):
        decays = lr_scheduler.MultiStepLR(o, list(milestones), decay)
        if warmup == 0:
            return decays
        return lr_scheduler.ChainedScheduler([lr_scheduler.LinearLR(o, 1 / warmup, 1.0, warmup - 1), decays])
    expected = torch_rates(make)
    assert ours("step", warmup, lr_milestones=milestones, lr_decay=decay) == pytest.approx(expected, rel=1e-12, abs=0)


def test_the_default_schedule_is_the_step_schedule_unchanged():
    e = sim.Experiment(steps=STEPS, lr=BASE, lr_warmup_steps=3, lr_milestones=(10, 20), lr_decay=0.5)
    assert e.lr_schedule == "step"
    assert [e.learning_rate(s) for s in range(STEPS)] == [learning_rate(s, BASE, 3, (10, 20), 0.5)
                                                          for s in range(STEPS)]


@pytest.mark.parametrize("schedule", ["cosine", "poly"])
def test_a_run_logs_and_applies_the_schedule(schedule):
    e = sim.Experiment(task="digits-mlp", task_options={"hidden": (8,)}, workers=2, steps=12, batch_size=4,
                       lr_schedule=schedule, lr_warmup_steps=3, eval_every=0)
    history = sim.run(e).history
    assert history["lr"].tolist() == [e.learning_rate(s) for s in range(e.steps)]
    assert history["lr"].iloc[3] == e.lr and history["lr"].is_monotonic_decreasing is False  # warm-up, then down
    assert list(history["lr"].iloc[3:]) == sorted(history["lr"].iloc[3:], reverse=True)


def test_a_warmup_as_long_as_the_run_only_warms_up():
    e = sim.Experiment(steps=5, lr=1.0, lr_schedule="cosine", lr_warmup_steps=10)
    assert [e.learning_rate(s) for s in range(5)] == [(s + 1) / 10 for s in range(5)]


@pytest.mark.parametrize("fields, named", [
    ({"lr_schedule": "linear"}, "lr_schedule"),
    ({"lr_schedule": None}, "lr_schedule"),
    ({"lr_schedule": "cosine", "lr_milestones": (10,)}, "lr_milestones"),
    ({"lr_schedule": "poly", "lr_decay": 0.5}, "lr_decay"),
    ({"lr_schedule": "cosine", "lr_poly_power": 2.0}, "lr_poly_power"),
    ({"lr_poly_power": 2.0}, "lr_poly_power"),  # the default schedule is "step"
    ({"lr_schedule": "poly", "lr_poly_power": 0.0}, "lr_poly_power"),
    ({"lr_schedule": "poly", "lr_poly_power": math.inf}, "lr_poly_power"),
    ({"lr_schedule": "poly", "lr_poly_power": True}, "lr_poly_power"),
])
def test_invalid_schedule_fields_are_refused_naming_the_field(fields, named):
    with pytest.raises(ValueError, match=f"Experiment: {named}="):
        sim.Experiment(**fields)


def test_the_step_schedule_keeps_its_fields():
    e = sim.Experiment(lr_schedule="step", lr_milestones=[20, 10], lr_decay=0.5)
    assert e.lr_milestones == (10, 20)
