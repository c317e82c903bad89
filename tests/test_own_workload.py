"""Your own task: custom_task from tensors or a Dataset, register_task's checks, own initialisation kept, and the
vmap engine's messages for models it cannot batch (or batches slowly)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import sim
from sim.simulation import Simulation
from sim.tasks import BUILT_IN_TASKS, TASK_REGISTRY, custom_task, register_task, task_options


class FreeAttention(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.free = nn.Parameter(torch.randn(4, dim) * 0.5)  # drawn by the module itself
        self.attention = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):  # (B, 4, dim)
        h = x + self.free
        a, _ = self.attention(h, h, h, need_weights=False)
        return self.head(a.mean(1))


def data(samples: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 4, 8, generator=g, dtype=torch.float64)
    return x, (x[:, 0, :3].argmax(-1))


def free_attention_task(*, dtype, samples: int = 64):
    return custom_task("test-free-attention", model=FreeAttention, train=data(samples, 0), test=data(16, 1),
                       dtype=dtype)


register_task("test-free-attention", free_attention_task)


def test_tensors_and_a_dataset_give_the_same_task():
    x, y = data(32, 0)
    from_tensors = custom_task("t", model=FreeAttention, train=(x, y), test=(x[:4], y[:4]))
    from_dataset = custom_task("t", model=FreeAttention, train=TensorDataset(x, y), test=TensorDataset(x[:4], y[:4]))
    for a, b in [(from_tensors.train_x, from_dataset.train_x), (from_tensors.train_y, from_dataset.train_y),
                 (from_tensors.test_x, from_dataset.test_x)]:
        assert torch.equal(a, b)
    assert from_tensors.train_x.dtype == torch.float32  # floating inputs take the Experiment's dtype
    assert from_tensors.train_y.dtype == torch.long and from_tensors.classification  # labels keep theirs
    assert torch.equal(from_tensors.labels, y)  # label-skew sharding can use them


def test_float_targets_make_a_regression_task_with_the_named_loss():
    x = torch.linspace(0, 1, 20).unsqueeze(1)
    task = custom_task("r", model=lambda: nn.Linear(1, 1), train=(x, 2 * x), test=(x, 2 * x), loss="mse",
                       dtype=torch.float64)
    assert not task.classification and task.labels is None and task.train_y.dtype == torch.float64
    assert float(task.loss(torch.zeros(2, 1), torch.ones(2, 1))) == 1.0


@pytest.mark.parametrize("changes, named", [
    ({"model": FreeAttention()}, "model"),  # a module instead of a factory
    ({"loss": "hinge"}, "loss"),
    ({"loss": 3}, "loss"),
    ({"train": (torch.zeros(5, 4, 8), torch.zeros(4, dtype=torch.long))}, "train"),  # lengths differ
    ({"train": torch.zeros(5, 4, 8)}, "train"),  # no targets
    ({"test": (torch.zeros(5, 4, 7), torch.zeros(5, dtype=torch.long))}, "test"),  # other feature shape
    ({"test": TensorDataset(torch.zeros(0, 4, 8), torch.zeros(0, dtype=torch.long))}, "test"),  # empty
    ({"classification": "yes"}, "classification"),
    ({"name": ""}, "name"),
])
def test_custom_task_refuses_bad_input_naming_the_argument(changes, named):
    x, y = data(8, 0)
    arguments = dict(name="t", model=FreeAttention, train=(x, y), test=(x, y)) | changes
    with pytest.raises(ValueError, match=named):
        custom_task(arguments.pop("name"), **arguments)


def test_register_task_checks_the_loader():
    with pytest.raises(ValueError, match="built-in"):
        register_task(BUILT_IN_TASKS[0], free_attention_task)
    with pytest.raises(ValueError, match="dtype"):
        register_task("test-bad", lambda dtype: None)  # dtype not keyword-only
    with pytest.raises(ValueError, match="'hidden'"):
        register_task("test-bad", lambda *, dtype, hidden: None)  # an option without a default
    with pytest.raises(ValueError, match="name"):
        register_task(" spaced ", free_attention_task)
    assert "test-bad" not in TASK_REGISTRY
    register_task("test-free-attention", free_attention_task)  # registering again (a re-run cell) is fine
    assert task_options("test-free-attention") == {"samples": 64}
    with pytest.raises(ValueError, match="samplez"):
        sim.Experiment(task="test-free-attention", task_options={"samplez": 3})


def test_a_registered_model_starts_from_its_own_initialisation_and_trains():
    e = sim.Experiment(task="test-free-attention", workers=2, steps=4, batch_size=8, dtype="float64", eval_every=0,
                       optimizer="adam", lr=1e-2)
    params = Simulation(e).initial_state().params
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(e.seed)
        own = FreeAttention().to(torch.float64)
    for name, p in own.named_parameters():
        assert torch.equal(params[name], p.detach()), name
    assert params["free"].abs().sum() > 0 and params["attention.in_proj_weight"].abs().sum() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = sim.run(e)
    assert result.history.train_loss.notna().all() and result.history.test_accuracy.notna().iloc[-1]
    assert not torch.equal(result.params["free"], params["free"])


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x):
        out = self.linear(x)
        return out * 2 if out.sum() > 0 else out  # Python control flow on a tensor: vmap cannot batch it


def test_a_model_vmap_cannot_batch_gets_a_message_naming_engine_loop():
    x = torch.randn(16, 3)
    y = torch.randint(0, 2, (16,))
    register_task("test-data-dependent", lambda *, dtype: custom_task("dd", model=DataDependent, train=(x, y),
                                                                        test=(x, y), dtype=dtype))
    e = sim.Experiment(task="test-data-dependent", workers=2, steps=2, batch_size=4, eval_every=0)
    with pytest.raises(ValueError, match="engine='loop'") as error:
        sim.run(e)
    assert "data-dependent control flow" in str(error.value)
    assert sim.run(e.replace(engine="loop")).history.train_loss.notna().all()


def test_a_slow_vmap_fallback_is_reported_once_in_our_words():
    from sim import engine

    engine._REPORTED.clear()
    e = sim.Experiment(task="test-free-attention", workers=2, steps=3, batch_size=4, eval_every=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sim.run(e)
        sim.run(e.replace(seed=1))
    messages = [str(w.message) for w in caught]
    ours = [m for m in messages if "no batching rule" in m]
    assert len(ours) == 1 and "engine='vmap'" in ours[0] and "aten::" in ours[0]
    assert not any("performance drop" in m for m in messages)  # torch's own, per step, is replaced


@pytest.mark.distributed
def test_real_processes_know_a_task_registered_by_a_module():
    """Spawned processes start fresh: run_distributed has them import the module that registered the task."""
    from sim.experiment import registering_modules

    assert __name__ in registering_modules()
    e = sim.Experiment(task="test-free-attention", workers=2, steps=3, batch_size=4, eval_every=0,
                       dtype="float64", optimizer="adam", lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = sim.run_distributed(e, nproc=2, timeout=300)
        virtual = sim.run(e)
    for name, p in virtual.params.items():
        torch.testing.assert_close(real.params[name], p, rtol=1e-9, atol=1e-12)


def test_a_parallel_sweep_knows_a_task_registered_by_a_module():
    """sim.sweep(processes=2) starts fresh worker processes: they import the registering module too."""
    base = sim.Experiment(task="test-free-attention", workers=2, steps=2, batch_size=4, eval_every=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parallel = sim.sweep(base, grid={"lr": [0.1, 0.05]}, seeds=[0], progress=False, processes=2)
    assert parallel.train_loss.notna().all() and len(parallel) == 4


def test_registering_a_built_in_loader_under_another_name_keeps_the_built_in_validator():
    """A validator belongs to a name: reusing synthetic-lowrank's loader for a new name (without a validator)
    must not switch off synthetic-lowrank's own option checks."""
    register_task("test-reused-loader", sim.tasks.TASK_REGISTRY["synthetic-lowrank"])
    try:
        with pytest.raises(ValueError, match="noise"):
            sim.Experiment(task="synthetic-lowrank", task_options={"noise": 1e300})
    finally:
        sim.tasks.TASK_REGISTRY.pop("test-reused-loader")
        sim.tasks.TASK_VALIDATORS.pop("test-reused-loader")
