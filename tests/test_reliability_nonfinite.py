"""Numerical faults: NaN/Inf gradients never reach the compressor's state, overflow inside a compressor is
reported instead of written into the parameters, and orthogonalization never turns finite input into NaN."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import compressors
import sim
from compressors.orthogonalize import ORTHOGONALIZATIONS, orthogonalize

TINY = {"dim_in": 12, "dim_out": 10, "samples": 64, "test_samples": 8}


def tiny(**changes) -> sim.Experiment:
    base = dict(task="synthetic-lowrank", task_options=TINY, workers=2, steps=6, batch_size=4, eval_every=0,
                compressor={"name": "powersgd", "rank": 2}, seed=0)
    base.update(changes)
    return sim.Experiment(**base)


def poison(simulation: sim.Simulation, at_steps: set[int], value: float, name: str | None = None,
           dtype: torch.dtype | None = None, entries: int = 1) -> None:
    """Make the engine return gradients with ``value`` in worker 1's first ``entries`` entries of ``name`` at
    1-based steps ``at_steps`` (and cast every gradient to ``dtype`` if given): a fault injected where real
    ones appear."""
    engine = simulation.engine
    real = engine.gradients
    step = {"n": 0}

    def gradients(params, buffers, x, y):
        grads, losses, new_buffers = real(params, buffers, x, y)
        step["n"] += 1
        if dtype is not None:
            grads = {k: g.to(dtype) for k, g in grads.items()}
        if step["n"] in at_steps:
            target = name or next(iter(grads))
            grads = dict(grads)
            g = grads[target].clone()
            g.view(g.shape[0], -1)[1, :entries] = value
            grads[target] = g
        return grads, losses, new_buffers

    engine.gradients = gradients  # an instance attribute: this simulation only


def flat(tree) -> list[torch.Tensor]:
    """Every tensor of a nested state, in a fixed order (to compare states exactly)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree) for t in flat(tree[k])]
    if isinstance(tree, (tuple, list)):
        return [t for item in tree for t in flat(item)]
    return []


def same_state(a, b) -> bool:
    ta, tb = flat(a), flat(b)
    return len(ta) == len(tb) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(ta, tb))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_raise_names_the_step_and_the_tensor(value):
    e = tiny()
    simulation = sim.Simulation(e)
    poison(simulation, {3}, value, name="weight")
    with pytest.raises(sim.NonFiniteGradientError, match=r"step 3: non-finite gradient in \['weight'\]"):
        sim.run(e, simulation=simulation)


@pytest.mark.parametrize("compressor", [{"name": "powersgd", "rank": 2}, {"name": "powersgd", "rank": 1,
                                        "variant": "alternating", "error_feedback": "averaged"},
                                        {"name": "topk", "k": 5}])
def test_skip_step_leaves_every_state_untouched_and_counts_it(compressor):
    e = tiny(nonfinite="skip_step", compressor=compressor, momentum=0.9, steps=5)
    simulation = sim.Simulation(e)
    poison(simulation, {2, 4}, math.nan)
    states = [simulation.initial_state()]
    sim.run(e, simulation=simulation, on_step=lambda s, state: states.append(state))
    for skipped in (2, 4):
        before, after = states[skipped - 1], states[skipped]
        assert after.step == before.step + 1
        for field in ("params", "buffers", "optimizer", "aggregator"):
            assert same_state(getattr(before, field), getattr(after, field)), field
        assert after.bits == before.bits
    # the steps in between did change the state (so the comparison above could fail)
    assert not same_state(states[2].params, states[3].params)
    assert not same_state(states[2].aggregator, states[3].aggregator)
    assert [s.skipped_steps for s in states] == [0, 0, 1, 1, 2, 2]
    for s in states:
        assert all(bool(torch.isfinite(t).all()) for t in flat(s) if t.is_floating_point())


def test_skipped_steps_column_in_history():
    e = tiny(nonfinite="skip_step", steps=5)
    simulation = sim.Simulation(e)
    poison(simulation, {2, 3}, math.inf)
    history = sim.run(e, simulation=simulation).history
    assert history["skipped_steps"].tolist() == [0, 1, 2, 2, 2]
    assert history["compression_error"].isna().tolist() == [False, True, True, False, False]
    assert history.loc[history["step"] == 5, "train_loss"].notna().all()


def test_fp16_cast_overflow_is_reported_not_propagated():
    """Gradients beyond fp16's range are finite in float32 but overflow in the fp16 compressor's cast."""
    e = tiny(compressor={"name": "fp16"})
    simulation = sim.Simulation(e)
    poison(simulation, {2}, 1e6)  # > 65504
    with pytest.raises(sim.NonFiniteGradientError, match=r"step 2: non-finite compressor output in .*weight.*overflow"):
        sim.run(e, simulation=simulation)

    e = e.replace(nonfinite="skip_step")
    simulation = sim.Simulation(e)
    poison(simulation, {2}, 1e6)
    result = sim.run(e, simulation=simulation)
    assert result.history["skipped_steps"].tolist() == [0, 1, 1, 1, 1, 1]
    assert all(bool(torch.isfinite(p).all()) for p in result.params.values())


@pytest.mark.parametrize("variant", ["paper", "alternating"])
def test_powersgd_factor_overflow_in_half_precision_is_reported(variant):
    """fp16 gradients whose factors P = M Q overflow 65504: finite input, non-finite factors. The run must
    refuse the step and keep the error-feedback memory and warm-start factors clean."""
    e = tiny(compressor={"name": "powersgd", "rank": 2, "variant": variant}, nonfinite="skip_step")
    simulation = sim.Simulation(e)
    poison(simulation, {3}, 6e4, dtype=torch.float16, entries=120)  # all near fp16's max: M Q overflows
    states = [simulation.initial_state()]
    result = sim.run(e, simulation=simulation, on_step=lambda s, state: states.append(state))
    assert result.history["skipped_steps"].tolist() == [0, 0, 1, 1, 1, 1]
    assert same_state(states[2], states[3]._replace(step=2, skipped_steps=0))
    for s in states:
        assert all(bool(torch.isfinite(t).all()) for t in flat(s) if t.is_floating_point())

    simulation = sim.Simulation(e.replace(nonfinite="raise"))
    poison(simulation, {3}, 6e4, dtype=torch.float16, entries=120)
    with pytest.raises(sim.NonFiniteGradientError, match="step 3: non-finite compressor output"):
        sim.run(e.replace(nonfinite="raise"), simulation=simulation)


def test_the_injected_overflow_really_breaks_the_kernel():
    """The fault the test above injects does turn PowerSGD's output non-finite (so that test is not vacuous)."""
    agg = compressors.make("powersgd", rank=2)
    shapes = {"weight": (10, 12)}
    state = agg.init(shapes, workers=2, seed=0, dtype=torch.float16)
    g = torch.randn(2, 10, 12, generator=torch.Generator().manual_seed(0)).half()
    g[1] = 6e4
    update, _ = agg.aggregate({"weight": g}, state, sim.VirtualCollective(2))
    assert not bool(torch.isfinite(update["weight"]).all())


# -- orthogonalization ---------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def hostile_factors(kind: str, dtype: torch.dtype, n: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(3, n, r, generator=g, dtype=torch.float64) * 2 - 1)
    big = torch.finfo(dtype).max
    if kind == "zero":
        x = torch.zeros_like(x)
    elif kind == "rank_deficient":  # repeated and zero columns
        x = torch.cat([x[..., :1]] * (r - 1) + [torch.zeros_like(x[..., :1])], dim=-1) if r > 1 else x * 0
    elif kind == "huge":  # entries near the dtype's max: squared norms overflow
        x = x * big
    elif kind == "max":
        x = torch.full_like(x, big)
    elif kind == "tiny":  # subnormal-scale entries
        x = x * torch.finfo(dtype).tiny
    elif kind == "mixed":  # one huge, one ordinary, one zero matrix in the same batch
        x = torch.stack([x[0] * big, x[1], x[2] * 0])
    return x.to(dtype)


@given(kind=st.sampled_from(["zero", "rank_deficient", "huge", "max", "tiny", "mixed"]),
       method=st.sampled_from(ORTHOGONALIZATIONS), dtype=st.sampled_from(DTYPES),
       n=st.integers(1, 9), r=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_orthogonalize_never_produces_nan(kind, method, dtype, n, r, seed):
    r = min(r, n)
    x = hostile_factors(kind, dtype, n, r, seed)
    assert bool(torch.isfinite(x).all())
    y = orthogonalize(x, method)
    assert y.dtype == dtype and y.shape == x.shape
    assert bool(torch.isfinite(y).all())
    # every column is unit or (Gram-Schmidt on a null direction) zero: never longer than 1
    norms = torch.linalg.vector_norm(y.double(), dim=-2)
    assert bool((norms <= 1 + 1e-2).all())


@pytest.mark.parametrize("method", ORTHOGONALIZATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_full_rank_input_is_still_orthonormalized(method, dtype):
    """Rescaling must not just avoid NaN but give the right answer: orthonormal columns spanning x."""
    g = torch.Generator().manual_seed(1)
    base = torch.linalg.qr(torch.randn(2, 8, 3, generator=g, dtype=torch.float64)).Q  # well conditioned
    x = (base * torch.finfo(dtype).max / 2).to(dtype)
    y = orthogonalize(x, method).double()
    tol = {torch.float32: 1e-5, torch.float64: 1e-7, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    assert torch.allclose(y.transpose(-1, -2) @ y, torch.eye(3, dtype=torch.float64).expand(2, 3, 3), atol=tol)
    projector = y @ y.transpose(-1, -2)
    assert torch.allclose(projector @ base, base, atol=4 * tol)  # same column space


@pytest.mark.parametrize("method", ORTHOGONALIZATIONS)
def test_ordinary_inputs_are_not_changed_by_the_rescaling(method):
    """Matrices with max |x| < 1 skip the rescaling entirely, and power-of-two scaling is exact for QR."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 7, 2, generator=g) * 0.9
    from compressors.orthogonalize import gram_schmidt
    expected = torch.linalg.qr(x).Q if method == "qr" else gram_schmidt(x, 1e-8)
    assert torch.equal(orthogonalize(x, method), expected)
