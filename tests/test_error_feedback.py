"""Error feedback: conservation, EF21's invariant, memory_norm, and theory.error_feedback's memory bound."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compressors
import theory
from compressors.base import Aggregator, Reduced, TheoryClaim, dtype_bits, numel
from compressors.error_feedback import ErrorFeedback, ErrorFeedbackState
from reference import exact_mean, run_steps
from compressors.comm import VirtualCollective

F64 = torch.float64
SHAPES = {"w": (6, 5), "conv": (4, 2, 3, 3), "b": (6,)}


class TopK(Aggregator):
    """Deterministic per-worker top-k of each tensor (k largest magnitudes, ties by index), averaged.

    A delta-contractive compressor with delta = k/d on every input (||x - topk(x)||^2 <= (1 - k/d) ||x||^2),
    written here so the memory-bound test does not depend on the zoo. The mean of the sparse messages goes
    through one all-reduce (a test double: the bits are not what a real top-k would send).
    """

    name = "test-topk"

    def __init__(self, k: int):
        self.k = k

    def init(self, shapes, workers, seed=0, dtype=torch.float32, device="cpu"):
        return ()

    def reduce(self, grads, state, comm, want_local=False):
        local = {}
        for name, g in grads.items():
            flat = g.reshape(g.shape[0], -1)  # (W, d)
            index = flat.abs().topk(min(self.k, flat.shape[1]), dim=1, sorted=True).indices  # (W, k)
            local[name] = torch.zeros_like(flat).scatter(1, index, flat.gather(1, index)).reshape(g.shape)
        update = {n: comm.all_reduce_mean(v, tag="topk") for n, v in local.items()}
        return Reduced(update, local if want_local else None), state

    def bits_per_step(self, shapes, dtype=torch.float32):
        return sum(min(self.k, numel(s)) for s in shapes.values()) * dtype_bits(dtype)

    def theory(self, shapes):
        return TheoryClaim(kind="contractive", delta=min(self.k / numel(s) for s in shapes.values()))


def ef_state(state) -> ErrorFeedbackState:
    found = [s for s in compressors.iter_states(state) if isinstance(s, ErrorFeedbackState)]
    assert len(found) == 1
    return found[0]


def stream(shapes, workers, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [{n: torch.randn((workers, *s), generator=gen, dtype=F64) for n, s in shapes.items()} for _ in range(steps)]


AGGREGATORS = {
    "powersgd-paper": lambda ef: compressors.make("powersgd", rank=1, error_feedback=ef),
    "powersgd-alternating": lambda ef: compressors.make("powersgd", rank=2, variant="alternating", error_feedback=ef),
    "topk": lambda ef: ErrorFeedback(TopK(3), ef),
}


@pytest.mark.parametrize("kind", sorted(AGGREGATORS))
@pytest.mark.parametrize("ef", ["local", "averaged"])
@settings(max_examples=5)  # each example is several steps; keep the suite fast
@given(workers=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_conservation(kind, ef, workers, seed):
    # sum_t update_t + mean_i e_i == sum_t mean_i g_i, for every tensor (uncompressed ones have no memory).
    agg = AGGREGATORS[kind](ef)
    grads_list = stream(SHAPES, workers, 5, seed)
    updates, state, _ = run_steps(agg, grads_list, SHAPES, workers, seed=seed, dtype=F64)
    memory = ef_state(state).memory
    assert memory, "error feedback keeps a memory for the compressed tensors"
    for name in SHAPES:
        mean_memory = exact_mean({name: memory[name]})[name] if name in memory else torch.zeros(SHAPES[name], dtype=F64)
        gap = theory.error_feedback.conservation_gap([u[name] for u in updates], mean_memory,
                                                     [exact_mean(g)[name] for g in grads_list])
        scale = sum(float(exact_mean(g)[name].abs().max()) for g in grads_list)
        assert float(gap.abs().max()) <= 1e-10 * scale, (name, float(gap.abs().max()))
    # and the memory is not trivially zero: something was delayed
    assert compressors.memory_norm(state) > 0


@pytest.mark.parametrize("kind", sorted(AGGREGATORS))
def test_ef21_invariant(kind):
    workers = 3
    agg = AGGREGATORS[kind]("ef21")
    state = agg.init(SHAPES, workers=workers, seed=0, dtype=F64)
    comm = VirtualCollective(workers)
    for grads in stream(SHAPES, workers, 6, seed=1):
        update, state = agg.aggregate(grads, state, comm)
        ef = ef_state(state)
        for name in ef.memory:
            g_mean = exact_mean({name: ef.memory[name]})[name]  # mean_i g_i
            assert torch.allclose(ef.estimate[name], g_mean, rtol=1e-10, atol=1e-10)  # g == mean_i g_i
            assert torch.allclose(update[name], ef.estimate[name], rtol=1e-12, atol=1e-12)  # the update is g
    assert compressors.memory_norm(state) == 0.0  # ef21 keeps estimates, not residuals


def test_ef21_estimate_converges_on_a_constant_gradient():
    # EF21 with a contractive compressor: g_i -> grad_i geometrically when the gradient stands still.
    agg = ErrorFeedback(TopK(8), "ef21")
    grads = stream({"w": (4, 4)}, 2, 1, seed=3)[0]
    state = agg.init({"w": (4, 4)}, workers=2, dtype=F64)
    comm = VirtualCollective(2)
    for _ in range(4):  # top-8 of 16 entries: exact after 2 steps
        update, state = agg.aggregate(grads, state, comm)
    assert torch.allclose(update["w"], exact_mean(grads)["w"], atol=1e-12)


@pytest.mark.parametrize("ef", ["local", "averaged", "none", "ef21"])
def test_memory_norm_is_root_mean_worker_squared_norm(ef):
    workers = 3
    agg = compressors.make("powersgd", rank=1, error_feedback=ef)
    state = agg.init(SHAPES, workers=workers, seed=0, dtype=F64)
    comm = VirtualCollective(workers)
    for grads in stream(SHAPES, workers, 3, seed=2):
        _, state = agg.aggregate(grads, state, comm)
    if ef in ("local", "averaged"):
        memory = ef_state(state).memory
        expected = math.sqrt(sum(float(m[i].pow(2).sum()) for m in memory.values() for i in range(workers)) / workers)
        assert compressors.memory_norm(state) == pytest.approx(expected, rel=1e-12)
        assert expected > 0
    else:
        assert compressors.memory_norm(state) == 0.0


@given(seed=st.integers(0, 2**16), k=st.integers(1, 20), constant=st.booleans(), workers=st.integers(1, 3))
def test_memory_bound_holds_on_bounded_gradient_streams(seed, k, constant, workers):
    # Local EF with a deterministic delta-contractive compressor: every worker's ||e_i||^2 stays below
    # 4 (1 - delta) G^2 / delta^2 (gamma = 1: the memory is kept in gradient units), G = max ||g_i||.
    d, G, steps = 24, 2.0, 40
    agg = ErrorFeedback(TopK(k), "local")
    delta = agg.theory({"x": (d,)}).delta
    assert delta == k / d
    bound = theory.error_feedback.memory_bound(delta, 1.0, G)
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(workers, d, generator=gen, dtype=F64)
    state = agg.init({"x": (d,)}, workers=workers, dtype=F64)
    comm = VirtualCollective(workers)
    worst = 0.0
    for _ in range(steps):
        g = direction if constant else torch.randn(workers, d, generator=gen, dtype=F64)  # (W, d)
        radius = G * torch.rand(workers, 1, generator=gen, dtype=F64) if not constant else G
        g = g / g.norm(dim=1, keepdim=True) * radius  # ||g_i|| <= G
        corrected = g + ef_state(state).memory["x"]
        _, state = agg.aggregate({"x": g}, state, comm)
        e = ef_state(state).memory["x"]  # (W, d)
        # the compressor really is delta-contractive on what it was given
        assert bool(((e.pow(2).sum(1)) <= (1 - delta) * corrected.pow(2).sum(1) + 1e-12).all())
        worst = max(worst, float(e.pow(2).sum(1).max()))
        assert worst <= bound + 1e-12, (worst, bound)
    if k == d:
        assert worst == 0.0


def test_memory_bound_formula():
    mb = theory.error_feedback.memory_bound
    assert mb(1.0, 0.1, 5.0) == 0.0  # exact compressor: no memory
    assert mb(0.5, 1.0, 1.0) == pytest.approx(4 * 0.5 / 0.25)
    assert mb(0.1, 1.0, 1.0) > mb(0.2, 1.0, 1.0)  # weaker compression, larger memory
    assert mb(0.5, 0.2, 3.0) == pytest.approx(0.2 ** 2 * 3.0 ** 2 * mb(0.5, 1.0, 1.0))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="delta"):
            mb(bad, 1.0, 1.0)


# -- "local_scaled": error feedback around an unbiased operator made contractive ------------------------------


def _bare(name: str, **options) -> Aggregator:
    """The compressor on every tensor (vectors too), so the error-feedback wrapper sees all of them."""
    return compressors.make(name, min_compression_rate=0.0, compress_vectors=True, **options)


def test_local_scaled_around_scaled_randomk_is_local_around_plain_randomk():
    """randomk(scaled=True) is (d/k) x the kept coordinates (unbiased, omega = d/k - 1): scaled by 1/(1+omega)
    = k/d it is plain random-k, so the two runs are the same trajectory up to rounding (same shared seed)."""
    grads_of = lambda step: {n: torch.randn(3, *s, generator=torch.Generator().manual_seed(step), dtype=F64)  # noqa: E731
                             for n, s in SHAPES.items()}
    scaled = _bare("randomk", ratio=0.3, scaled=True, error_feedback="local_scaled", seed=7)
    plain = _bare("randomk", ratio=0.3, scaled=False, error_feedback="local", seed=7)
    assert scaled.theory({"w": (6, 5)}).kind == "contractive"
    states = [a.init(SHAPES, workers=3, dtype=F64) for a in (scaled, plain)]
    comm = VirtualCollective(3)
    for step in range(5):
        grads = grads_of(step)
        (u1, states[0]), (u2, states[1]) = (a.aggregate(grads, s, comm) for a, s in zip((scaled, plain), states))
        for n in SHAPES:
            torch.testing.assert_close(u1[n], u2[n], rtol=1e-12, atol=1e-12)
    assert compressors.memory_norm(states[0]) == pytest.approx(compressors.memory_norm(states[1]), rel=1e-10)


@pytest.mark.parametrize("name,options", [("qsgd", {"levels": 2}), ("terngrad", {}), ("randomk", {"ratio": 0.25,
                                                                                                 "scaled": True})])
def test_local_scaled_operator_contracts_as_declared(name, options):
    """The one-step operator C(x)/(1+omega) (zero memory) satisfies E||C'(x) - x||^2 <= (1 - delta)||x||^2 with
    the declared delta = 1/(1+omega), over 400 independent draws (mean within 3 standard errors)."""
    x = torch.randn(1, 40, generator=torch.Generator().manual_seed(1), dtype=F64)
    agg = _bare(name, error_feedback="local_scaled", **options)
    claim = agg.theory({"x": (40,)})
    omega = _bare(name, error_feedback="none", **options).theory({"x": (40,)}).omega
    assert claim.kind == "contractive" and claim.delta == pytest.approx(1 / (1 + omega)) and not claim.deterministic
    errors = []
    for seed in range(400):
        state = agg.init({"x": (40,)}, workers=1, seed=seed, dtype=F64)
        reduced, _ = agg.reduce({"x": x}, state, VirtualCollective(1), want_local=True)
        errors.append(float((reduced.local["x"] - x).pow(2).sum()))
    errors = torch.tensor(errors, dtype=F64)
    bound = (1 - claim.delta) * float(x.pow(2).sum())
    assert float(errors.mean()) <= bound + 3 * float(errors.std()) / math.sqrt(len(errors))


def test_local_scaled_keeps_error_feedback_bounded_where_local_diverges():
    """QSGD with 2 levels on 64 coordinates has omega ~ 4: plain local error feedback's memory explodes in a
    least-squares loop, the scaled variant's stays bounded and the loss falls."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 32, 64, generator=g, dtype=F64)
    b = a @ torch.randn(64, 1, generator=g, dtype=F64)
    norms, losses = {}, {}
    for mode in ("local", "local_scaled"):
        agg = _bare("qsgd", levels=2, error_feedback=mode, seed=0)
        w, state, comm = torch.zeros(64, 1, dtype=F64), agg.init({"w": (64, 1)}, workers=4, dtype=F64), VirtualCollective(4)
        start = float(((a @ w - b) ** 2).mean())
        for _ in range(40):
            update, state = agg.aggregate({"w": 2 * a.transpose(1, 2) @ (a @ w - b) / 32}, state, comm)
            w = w - 0.01 * update["w"]
        norms[mode], losses[mode] = compressors.memory_norm(state), float(((a @ w - b) ** 2).mean()) / start
    assert _bare("qsgd", levels=2).theory({"w": (64, 1)}).omega >= 1
    assert norms["local"] > 100 * norms["local_scaled"]  # measured: 64,000 vs 60
    assert losses["local_scaled"] < 0.5
