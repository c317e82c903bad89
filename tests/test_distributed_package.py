"""The original powersgd package's API: compressors.PowerSGD / Config / optimizer_step, alone and under gloo."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compressors
from compressors import Config, PowerSGD, optimizer_step
from compressors.ddp.package_kernel import PackagePowerSGDKernel
from compressors.comm import VirtualCollective
from sim.real.distributed import spawn

pytestmark = pytest.mark.distributed

README = dict(rank=1, min_compression_rate=10, num_iters_per_step=2, start_compressing_after_num_steps=0)


def _model(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _loss(model, worker: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + worker)
    x = torch.randn(16, 20, generator=g)
    y = (x @ torch.randn(20, 5, generator=torch.Generator().manual_seed(7))).argmax(1)
    return F.cross_entropy(model(x), y)


def _readme_loop(worker: int, steps: int, zero_grad: bool, momentum: float = 0.9, config=README):
    """The package's README loop, as written (plus an optional zero_grad)."""
    model = _model()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=momentum)
    powersgd = PowerSGD(params, config=Config(**config))
    losses = []
    for step in range(steps):
        if zero_grad:
            optimizer.zero_grad()
        loss = _loss(model, worker, step)
        loss.backward()
        optimizer_step(optimizer, powersgd)
        losses.append(float(loss.detach()))
    return model, powersgd, losses


def _reference(workers: int, steps: int, momentum: float = 0.9):
    """The same training with the simulator's aggregator over W virtual workers (one process).

    tests/test_package_reference.py holds the drop-in against the package's own algorithm; this holds the real
    processes against the one-process simulation of the same kernel."""
    model = _model()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=momentum)
    # The drop-in's stack, run by the simulator's machinery: W virtual workers, per-worker residuals.
    agg = compressors.compose(PackagePowerSGDKernel(rank=1, num_iters_per_step=2), error_feedback="local",
                              min_compression_rate=10.0, compress_vectors=True)
    names = [str(i) for i in range(len(params))]
    state = agg.init({n: tuple(p.shape) for n, p in zip(names, params)}, workers=workers, seed=0)
    for step in range(steps):
        grads = []
        for w in range(workers):
            model.zero_grad()
            _loss(model, w, step).backward()
            grads.append([p.grad.clone() for p in params])
        stacked = {n: torch.stack([g[i] for g in grads]) for i, n in enumerate(names)}  # (W, *shape)
        update, state = agg.aggregate(stacked, state, VirtualCollective(workers))
        for p, n in zip(params, names):
            p.grad = update[n]
        optimizer.step()
    return model


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_readme_loop_runs_in_one_process_and_learns():
    model, powersgd, losses = _readme_loop(0, 40, zero_grad=False)
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters())  # memory is not in p.grad
    assert compressors.memory_norm(powersgd.state) > 0  # it is in the object's state
    assert isinstance(powersgd.comm, VirtualCollective)  # no process group: a world of one


def test_with_or_without_zero_grad_is_the_same_run():
    assert _same(_readme_loop(0, 8, zero_grad=True)[0], _readme_loop(0, 8, zero_grad=False)[0])


def test_one_process_equals_the_simulators_aggregator():
    assert _same(_readme_loop(0, 8, zero_grad=True)[0], _reference(1, 8))


def test_only_the_big_matrix_is_compressed_and_config_defaults_are_the_packages():
    _, powersgd, _ = _readme_loop(0, 1, zero_grad=True)
    # 32x20: 640 / (0.5 * 2 * 1 * 52) = 12.3 > 10 -> compressed; 5x32: 160 / 37 = 4.3 -> all-reduced exactly.
    assert powersgd.state.compressed_names == ("0",)
    config = Config(rank=4)
    assert (config.min_compression_rate, config.num_iters_per_step, config.start_compressing_after_num_steps,
            config.orthogonalization) == (2, 1, 100, "qr")
    assert Config(rank=1, orthogonalization="gram-schmidt").orthogonalization == "gram_schmidt"
    with pytest.raises(ValueError, match="rank"):
        Config(rank=0)
    with pytest.raises(ValueError, match="orthogonalization"):
        Config(rank=1, orthogonalization="svd")
    with pytest.raises(ValueError, match="optimizer"):
        optimizer_step(torch.optim.SGD(_model().parameters(), lr=0.1), powersgd)


def test_state_dict_resumes_exactly():
    straight, _, _ = _readme_loop(0, 6, zero_grad=True, momentum=0.0)  # plain SGD: the optimizer has no state
    model, powersgd, _ = _readme_loop(0, 3, zero_grad=True, momentum=0.0)
    fresh_model = copy.deepcopy(model)
    resumed = PowerSGD(list(model.parameters()), config=Config(**README))
    resumed.load_state_dict(_roundtrip(powersgd.state_dict()))  # weights_only: plain containers
    fresh = PowerSGD(list(fresh_model.parameters()), config=Config(**README))  # memory and factors lost
    for m, agg in ((model, resumed), (fresh_model, fresh)):
        optimizer = torch.optim.SGD(list(m.parameters()), lr=0.1)
        for step in range(3, 6):
            _loss(m, 0, step).backward()
            optimizer_step(optimizer, agg)
    assert _same(model, straight)
    assert not _same(fresh_model, straight)


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _distributed_loop(rank: int, world: int) -> dict:
    with_zero, powersgd, _ = _readme_loop(rank, 8, zero_grad=True)
    without_zero, _, _ = _readme_loop(rank, 8, zero_grad=False)
    return {"params": [p.detach() for p in with_zero.parameters()], "zero_grad_irrelevant": _same(with_zero, without_zero),
            "comm": type(powersgd.comm).__name__, "workers": powersgd.comm.workers}


def test_readme_loop_under_torch_distributed_equals_the_simulator():
    out = spawn(_distributed_loop, 2, timeout=240)
    reference = _reference(2, 8)
    for rank_out in out:
        assert rank_out["zero_grad_irrelevant"]
        assert (rank_out["comm"], rank_out["workers"]) == ("DistributedCollective", 2)
        # W = 2: sums commute exactly; what remains is the batched matmul over (2, ...) rows in the simulator
        # vs (1, ...) rows per process (different kernel blocking: last-bit differences, measured 6e-8).
        for a, b in zip(rank_out["params"], reference.parameters()):
            assert float((a - b.detach()).abs().max()) <= 1e-6 * float(b.detach().abs().max())
