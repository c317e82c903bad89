"""compressors.PowerSGD + optimizer_step reproduce the ``powersgd`` package's README loop (float64, to rounding).

The reference (tests/powersgd_package_reference.py) is a plain, slow model of the package written from its code;
W workers run in one process there, and as 1 or 2 real gloo processes here. Each deliberate deviation of the
project is shown to matter only where the package's bug bites: with the bug's switch on the reference differs
(or fails), with it off the reference matches again.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressors import Config, ErrorFeedbackState, PowerSGD, iter_states, optimizer_step
from sim.real.distributed import spawn
from powersgd_package_reference import PACKAGE_BUGS, PackageConfig, PackageReference, should_compress

STEPS = 50
ATOL = 1e-12  # float64: rounding only (batched vs one-at-a-time matmuls, summation order)
README = dict(rank=1, min_compression_rate=10, num_iters_per_step=2, start_compressing_after_num_steps=0)
# rank 2 (QR), an odd number of iterations (the parity moves across steps), a warm-up, a same-shape pair.
WIDER = dict(rank=2, min_compression_rate=3, num_iters_per_step=3, start_compressing_after_num_steps=5)


def make_model(same_shape_pair: bool, dtype=torch.float64) -> nn.Module:
    """A conv (16 x 27 matrix view), linear layers, biases; optionally two 24 x 24 layers (one shape group)."""
    # modules initialise from the global RNG (leave no trace on it), in the default dtype (fix it: same draws)
    with torch.random.fork_rng(), default_dtype(torch.float32):
        torch.manual_seed(0)
        widths = (24, 24) if same_shape_pair else (20, 24)
        hidden = [nn.Linear(24, widths[0]), nn.Tanh(), nn.Linear(widths[0], widths[1]), nn.Tanh()]
        model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 24), nn.Tanh(),
                              *hidden, nn.Linear(24, 5))
    return model.to(dtype)


def batch_loss(model: nn.Module, worker: int, step: int) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(10_000 * step + worker)
    x = torch.randn(8, 3, 5, 5, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 5, (8,), generator=g)
    return F.cross_entropy(model(x), y)


def make_optimizer(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)


def readme_loop(worker: int, config: dict, same_shape_pair: bool, steps: int = STEPS, dtype=torch.float64,
                with_residuals: bool = False):
    """The package's README loop with this project's names: no zero_grad, optimizer_step after backward.

    Returns the parameters after every step (and, ``with_residuals``, this worker's final residuals)."""
    model = make_model(same_shape_pair, dtype)
    params = list(model.parameters())
    optimizer = make_optimizer(params)
    powersgd = PowerSGD(params, config=Config(**config))
    trajectory = []
    for step in range(steps):
        batch_loss(model, worker, step).backward()
        optimizer_step(optimizer, powersgd)
        trajectory.append([p.detach().clone() for p in params])
    return (trajectory, residuals(powersgd)) if with_residuals else trajectory


def residuals(powersgd: PowerSGD) -> dict[int, torch.Tensor]:
    """{parameter index: this process's residual} of the compressed parameters (the others keep none)."""
    memories = [s.memory for s in iter_states(powersgd.state) if isinstance(s, ErrorFeedbackState)]
    assert len(memories) == 1
    return {int(name): m[0] for name, m in memories[0].items()}  # (1, *shape) -> (*shape)


def reference_loop(workers: int, config: dict, same_shape_pair: bool, bugs=PACKAGE_BUGS, steps: int = STEPS,
                   dtype=torch.float64, residual: str = "local", with_residuals: bool = False):
    """The same training, W workers in one process, aggregated by the package's reference algorithm.

    Returns the parameters after every step (and, ``with_residuals``, every worker's final residuals)."""
    model = make_model(same_shape_pair, dtype)
    params = list(model.parameters())
    optimizer = make_optimizer(params)
    reference = PackageReference(params, PackageConfig(**config), workers, bugs=bugs, residual=residual)
    trajectory = []
    for step in range(steps):
        grads = []
        for w in range(workers):
            model.zero_grad()
            batch_loss(model, w, step).backward()
            grads.append([p.grad.clone() for p in params])
        for p, g in zip(params, reference.aggregate(grads)):
            p.grad = g
        optimizer.step()
        trajectory.append([p.detach().clone() for p in params])
    return (trajectory, reference.residual) if with_residuals else trajectory


@contextlib.contextmanager
def default_dtype(dtype):
    """The package draws its factors in torch's default dtype: it runs a float64 model only under float64."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def gap(a, b) -> float:
    """Largest |difference| over every step and parameter of two trajectories."""
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for sa, sb in zip(a, b) for x, y in zip(sa, sb))


def selections_agree(config: dict, same_shape_pair: bool) -> bool:
    shapes = [tuple(p.shape) for p in make_model(same_shape_pair).parameters()]
    c = PackageConfig(**config)
    return [should_compress(s, c, True) for s in shapes] == [should_compress(s, c, False) for s in shapes]


CASES = {"readme": (README, False), "wider": (WIDER, True)}


def both_cases(rank: int, world: int) -> dict:
    return {name: readme_loop(rank, config, pair, with_residuals=True) for name, (config, pair) in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_one_process_reproduces_the_package(name):
    config, pair = CASES[name]
    assert selections_agree(config, pair)  # premise: no bug of the package bites in this case
    with default_dtype(torch.float64):
        reference = reference_loop(1, config, pair)
    ours = readme_loop(0, config, pair)
    assert gap(ours, reference) <= ATOL
    assert gap(reference, reference_loop(1, config, pair, bugs=())) <= ATOL  # the bugs' switches are inert here
    assert gap(ours, [[p.detach() for p in make_model(pair).parameters()]] * STEPS) > 1e-2  # it trained


@pytest.mark.distributed
def test_two_gloo_processes_reproduce_the_package():
    results = spawn(both_cases, 2, timeout=240)
    for name, (config, pair) in CASES.items():
        with default_dtype(torch.float64):
            reference, reference_residuals = reference_loop(2, config, pair, with_residuals=True)
            one_worker = reference_loop(1, config, pair, steps=5)
            before_july_2022 = reference_loop(2, config, pair, residual="averaged", with_residuals=True)
        for rank, (trajectory, ours) in enumerate(result[name] for result in results):
            assert gap(trajectory, reference) <= ATOL, name
            assert ours.keys() == {i for i, r in enumerate(reference_residuals[rank]) if r.abs().max() > 0}
            assert max(float((r - reference_residuals[rank][i]).abs().max()) for i, r in ours.items()) <= ATOL
            # the residual is this worker's own: the package's earlier residual against the average is another
            assert max(float((r - before_july_2022[1][rank][i]).abs().max()) for i, r in ours.items()) > 1e-4
        assert gap(reference[:5], one_worker) > 1e-3  # the two workers' data both count
        # ... yet the updates depend only on the workers' mean residual, the same for both: one trajectory up to
        # rounding, which warm start with error feedback amplifies (measured 8e-11 by step 50, 4e-15 by 25)
        assert gap(before_july_2022[0][:25], reference[:25]) <= ATOL


def assert_deviates_only_by(config, same_shape_pair: bool, bug: str) -> None:
    """Ours equals the package's reference with ``bug`` switched off, and differs from it with the bug on."""
    ours = readme_loop(0, config, same_shape_pair, steps=20)
    with default_dtype(torch.float64):
        package = reference_loop(1, config, same_shape_pair, steps=20)
        fixed = reference_loop(1, config, same_shape_pair, steps=20, bugs=tuple(b for b in PACKAGE_BUGS if b != bug))
    assert gap(ours, fixed) <= ATOL
    assert gap(ours, package) > 1e-4


def test_rank1_batch_normalization_deviates_only_for_same_shape_groups():
    config = dict(README, min_compression_rate=3)  # the two 24 x 24 layers are compressed, at rank 1
    assert_deviates_only_by(config, True, "whole_batch_rank1_norm")


@pytest.mark.parametrize("config", [dict(README, min_compression_rate=12),  # conv: raw 17.3, matrix view 10.05
                                    dict(rank=1, min_compression_rate=1.95, num_iters_per_step=1,
                                         start_compressing_after_num_steps=0)])  # bias: raw 2, view 2n/(n+1)
def test_selection_on_the_matrix_view_deviates_only_where_the_raw_shape_differs(config):
    assert not selections_agree(config, False)
    assert_deviates_only_by(config, False, "raw_shape_selection")


def test_factor_dtype_deviates_only_where_the_package_fails():
    with default_dtype(torch.float32):  # a float64 model under the default float32: the package's matmul fails
        with pytest.raises(RuntimeError, match="same dtype"):
            reference_loop(1, README, False, steps=1)
        ours = readme_loop(0, README, False, steps=10)
    with default_dtype(torch.float64):
        assert gap(ours, reference_loop(1, README, False, steps=10)) <= ATOL
    # float32 model under the default float32: the package runs, and we agree with it to float32 rounding
    ours32 = readme_loop(0, README, False, steps=10, dtype=torch.float32)
    package32 = reference_loop(1, README, False, steps=10, dtype=torch.float32)
    assert ours32[0][0].dtype == torch.float32
    assert gap(ours32, package32) <= 1e-5


def test_nothing_compressible_is_plain_sgd_where_the_package_fails():
    config = dict(README, min_compression_rate=1e9)
    with default_dtype(torch.float64), pytest.raises(IndexError):
        reference_loop(1, config, False, steps=1)
    ours = readme_loop(0, config, False, steps=5)
    model = make_model(False)
    optimizer = make_optimizer(list(model.parameters()))
    for step in range(5):
        optimizer.zero_grad()
        batch_loss(model, 0, step).backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(ours[-1], model.parameters()))


def test_a_zero_first_gradient_does_not_freeze_a_rank1_layer():
    """A layer whose first gradient is all zero (switched on after step 0): its factors come out zero."""
    config = dict(README)

    def loop(run_reference, bugs=PACKAGE_BUGS):
        model = make_model(False)
        params = list(model.parameters())
        optimizer = torch.optim.SGD(params, lr=0.05)
        aggregator = (PackageReference(params, PackageConfig(**config), 1, bugs=bugs) if run_reference
                      else PowerSGD(params, config=Config(**config)))
        weight = model[5].weight  # the 20 x 24 layer, compressed at rank 1
        start = weight.detach().clone()
        for step in range(6):
            model.zero_grad()
            loss = batch_loss(model, 0, step)
            loss.backward()
            if step == 0:  # only this layer's gradient zeroed: the others train as usual
                weight.grad.zero_()
            if run_reference:
                for p, g in zip(params, aggregator.aggregate([[p.grad.clone() for p in params]])):
                    p.grad = g
                optimizer.step()
            else:
                optimizer_step(optimizer, aggregator)
        return float((weight.detach() - start).abs().max()), [p.detach().clone() for p in params]

    with default_dtype(torch.float64):
        stuck, _ = loop(True)
        moved_ref, fixed = loop(True, bugs=tuple(b for b in PACKAGE_BUGS if b != "zero_factor_kept"))
    moved, ours = loop(False)
    assert stuck == 0.0  # the package: zero factors, this layer never moves again
    assert moved > 1e-3 and moved == pytest.approx(moved_ref, abs=ATOL)
    assert gap([ours], [fixed]) <= ATOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_where_the_package_fails(dtype):
    with pytest.raises(RuntimeError, match="same dtype"):  # factors in the default float32, gradients in half
        reference_loop(1, README, False, steps=1, dtype=dtype)
    model = make_model(False, dtype)
    params = list(model.parameters())
    powersgd = PowerSGD(params, config=Config(**README))
    optimizer = make_optimizer(params)
    for step in range(5):
        batch_loss(model, 0, step).backward()
        optimizer_step(optimizer, powersgd)
    kernel_state = powersgd.state.compressed.inner
    assert {f.dtype for f in (*kernel_state.p.values(), *kernel_state.q.values())} == {dtype}
    assert all(bool(torch.isfinite(p).all()) for p in params)
    start = [p.detach() for p in make_model(False, dtype).parameters()]
    assert gap([[p.detach() for p in params]], [start]) > 1e-3  # it trained


def test_a_scalar_parameter_is_a_one_by_one_matrix_where_the_package_fails():
    config = dict(README, min_compression_rate=0.4)  # 1 x 1 at 2 iterations: rate 1 / (0.5 * 2 * 1 * 2) = 0.5
    scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError):  # the package's selection takes min() of the empty shape
        PackageReference([scale], PackageConfig(**config), 1)
    powersgd = PowerSGD([scale], config=Config(**config))
    assert powersgd.state.compressed_names == ("0",)
    optimizer = torch.optim.SGD([scale], lr=0.1)
    (scale * 2.0).backward()
    optimizer_step(optimizer, powersgd)
    assert float(scale.detach()) == pytest.approx(1.5 - 0.1 * 2.0, abs=1e-15)  # rank 1 of a 1 x 1 matrix is exact
