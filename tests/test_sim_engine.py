"""The simulator against slow obvious references: a loop over workers, and single-process big-batch SGD."""
import pytest
import torch

import sim
from sim.engine import LoopEngine, VmapEngine
from sim.models import build, digits_cnn
from sim.simulation import Simulation


def test_vmap_engine_equals_loop_engine_with_batchnorm():
    model = build(digits_cnn, torch.Generator().manual_seed(0), dtype=torch.float64)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.unsqueeze(0).repeat(3, *([1] * b.dim())) for n, b in model.named_buffers()}
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 5, 64, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (3, 5), generator=g)
    loss = torch.nn.functional.cross_entropy
    fast = VmapEngine(model, loss).gradients(params, buffers, x, y)
    slow = LoopEngine(model, loss).gradients(params, buffers, x, y)
    for name in params:
        torch.testing.assert_close(fast[0][name], slow[0][name], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast[1], slow[1])
    for name in buffers:  # each worker's running statistics come from its own batch
        torch.testing.assert_close(fast[2][name], slow[2][name])
    assert not torch.equal(fast[2]["2.running_mean"][0], fast[2]["2.running_mean"][1])
    assert torch.equal(buffers["2.running_mean"][0], torch.zeros(32, dtype=torch.float64))  # inputs untouched


@pytest.mark.parametrize("compressor", [{"name": "identity"}, {"name": "powersgd", "rank": 2},
                                        {"name": "powersgd", "rank": 1, "variant": "alternating"}])
def test_whole_runs_vmap_equal_loop(compressor):
    base = sim.Experiment(task="digits-cnn", workers=3, steps=3, batch_size=4, eval_every=3,
                          compressor=compressor, dtype="float64")
    fast = sim.run(base.replace(engine="vmap"))  # the default ("auto") picks the loop for this conv net
    slow = sim.run(base.replace(engine="loop"))
    for name in fast.params:
        torch.testing.assert_close(fast.params[name], slow.params[name], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(torch.tensor(fast.history["train_loss"].values),
                               torch.tensor(slow.history["train_loss"].values))


def test_identity_with_w_workers_equals_single_process_big_batch_sgd():
    e = sim.Experiment(task="digits-mlp", workers=4, steps=50, batch_size=8, lr=0.05, momentum=0.9,
                       task_options={"hidden": (32, 32)}, eval_every=0,
                       nesterov=True, weight_decay=1e-3, dtype="float64", compressor={"name": "identity"})
    result = sim.run(e)

    simulation = Simulation(e)
    model = build(simulation.task.model, torch.Generator().manual_seed(e.seed), dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=e.lr, momentum=e.momentum, nesterov=True,
                          weight_decay=e.weight_decay)
    for step in range(e.steps):
        indices = simulation.sampler.batch(range(e.workers), step).reshape(-1)  # the concatenated 4 x 8 batch
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(simulation.task.train_x[indices]),
                                                 simulation.task.train_y[indices])
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(result.params[name], p.detach(), rtol=1e-9, atol=1e-11)


def test_same_seed_gives_bitwise_identical_history_and_other_seed_differs():
    e = sim.Experiment(task="digits-mlp", workers=4, steps=4, batch_size=8, eval_every=2,
                       task_options={"hidden": (32,)}, compressor={"name": "powersgd", "rank": 2, "warm_start": False})
    a, b = sim.run(e), sim.run(e)
    assert a.history.equals(b.history)
    assert all(torch.equal(a.params[n], b.params[n]) for n in a.params)
    c = sim.run(e.replace(seed=1))
    assert not c.history["train_loss"].equals(a.history["train_loss"])


def test_history_columns_and_bits_match_declaration():
    e = sim.Experiment(task="digits-mlp", workers=2, steps=5, batch_size=4, eval_every=0,
                       compressor={"name": "powersgd", "rank": 2})
    result = sim.run(e)
    h = result.history
    for column in ["step", "train_loss", "test_accuracy", "bits", "compression_error", "memory_norm"]:
        assert column in h
    assert list(h["step"]) == [1, 2, 3, 4, 5]
    assert h["test_accuracy"].notna().sum() == 1  # eval_every=0: the last step only
    assert h["bits"].iloc[-1] == 5 * result.bits_per_step
    assert result.compression_ratio > 5


def test_synthetic_lowrank_gradient_spectrum_follows_the_decay():
    e = sim.Experiment(task="synthetic-lowrank", workers=2, steps=1, batch_size=4096,
                       task_options={"spectrum_decay": 0.5, "noise": 0.0, "dim_in": 16, "dim_out": 8})
    simulation = Simulation(e)
    state = simulation.initial_state()
    x, y = simulation.task.train_x, simulation.task.train_y
    grads, _, _ = simulation.engine.gradients(state.params, state.buffers, x[None], y[None])
    sigma = torch.linalg.svdvals(grads["weight"][0].double())
    ratios = sigma[1:4] / sigma[:3]
    torch.testing.assert_close(ratios, torch.full_like(ratios, 0.5), rtol=0.15, atol=0)
    assert simulation.evaluate(state)[1] != simulation.evaluate(state)[1]  # regression: accuracy is NaN


def test_any_worker_count_runs_even_with_shards_smaller_than_a_batch():
    result = sim.run(sim.Experiment(task="digits-mlp", workers=200, steps=2, batch_size=16, eval_every=0))
    assert result.history["train_loss"].notna().all()


def test_compression_error_is_measured_every_nth_step_or_never():
    e = sim.Experiment(task="digits-mlp", workers=2, steps=6, batch_size=4, eval_every=0,
                       task_options={"hidden": (16,)}, compressor={"name": "powersgd", "rank": 1})
    every_step = sim.run(e).history
    third = sim.run(e.replace(compression_error_every=3)).history
    never = sim.run(e.replace(compression_error_every=0)).history
    assert every_step["compression_error"].notna().all()
    assert list(third["compression_error"].notna()) == [False, False, True, False, False, True]
    assert third["compression_error"].iloc[2] == every_step["compression_error"].iloc[2]
    assert never["compression_error"].isna().all()
    assert never["train_loss"].equals(every_step["train_loss"])  # a measurement, not part of the algorithm
