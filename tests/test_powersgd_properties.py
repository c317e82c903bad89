"""Property tests of PowerSGD against the slow loop reference (tests/reference.py) and theory.lowrank."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import compressors
import theory
from compressors.policies import PartitionState
from compressors.powersgd import PowerSGDState, group_by_matrix_shape
from reference import ReferencePowerSGD, exact_mean, initial_factors, reference_orthogonalize, run_steps
from compressors.comm import VirtualCollective

F64 = torch.float64


# -- helpers ----------------------------------------------------------------------------------------------

def make(**options):
    options.setdefault("min_compression_rate", 0.0)  # compress every matrix, so the kernel is what we test
    options.setdefault("error_feedback", "none")
    # Gram-Schmidt divides by (norm + epsilon): a relative bias of epsilon/||P|| that float64 checks would see.
    options.setdefault("epsilon", 1e-15)
    return compressors.make("powersgd", **options)


def shapes_of(grads):
    return {n: tuple(g.shape[1:]) for n, g in grads.items()}


def random_grads(shapes, workers, seed, dtype=F64, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return {n: (scale * torch.randn((workers, *s), generator=gen, dtype=F64)).to(dtype) for n, s in shapes.items()}


def run(agg, grads_list, workers, seed=0, dtype=F64):
    return run_steps(agg, grads_list, shapes_of(grads_list[0]), workers, seed=seed, dtype=dtype)


def kernel_state(state) -> PowerSGDState:
    found = [s for s in compressors.iter_states(state) if isinstance(s, PowerSGDState)]
    assert len(found) == 1
    return found[0]


def compressed_names(state) -> tuple[str, ...]:
    found = [s for s in compressors.iter_states(state) if isinstance(s, PartitionState)]
    assert len(found) == 1
    return found[0].compressed_names


def factor(state, shapes, name, rank, which="p"):
    """The kernel's factor for one matrix (its slice of the batched group factor)."""
    ks = kernel_state(state)
    for gr in group_by_matrix_shape({n: shapes[n] for n in compressed_names(state)}, rank):
        if name in gr.names:
            return getattr(ks, which)[gr.key][gr.names.index(name)]
    raise KeyError(name)


def close(a, b, scale, tol=1e-9):
    return float((a.double() - b.double()).abs().max()) <= tol * max(1.0, float(scale))


dims = st.integers(min_value=1, max_value=6)
seeds = st.integers(min_value=0, max_value=2**16)
workers_st = st.integers(min_value=1, max_value=4)


# -- exactness and projection --------------------------------------------------------------------------------

@given(n=dims, m=dims, workers=workers_st, seed=seeds, iters=st.integers(1, 2),
       orth=st.sampled_from(["qr", "gram_schmidt"]))
def test_full_rank_paper_reproduces_the_mean(n, m, workers, seed, iters, orth):
    grads = random_grads({"w": (n, m)}, workers, seed)
    agg = make(rank=min(n, m), num_iters_per_step=iters, orthogonalization=orth)
    (update,), state, _ = run(agg, [grads], workers, seed)
    assert compressed_names(state) == ("w",)  # really compressed, not all-reduced as a fallback
    mean = exact_mean(grads)["w"]
    assert close(update["w"], mean, mean.abs().max(), 1e-8)


@given(n=dims, m=dims, workers=workers_st, seed=seeds)
def test_full_rank_alternating_reproduces_the_mean_in_two_iterations(n, m, workers, seed):
    # Iteration 1 projects the rows onto span(Q^) (m x r); iteration 2 projects what is left onto span(P^) = R^n.
    grads = random_grads({"w": (n, m)}, workers, seed)
    agg = make(rank=min(n, m), num_iters_per_step=2, variant="alternating")
    (update,), _, _ = run(agg, [grads], workers, seed)
    mean = exact_mean(grads)["w"]
    assert close(update["w"], mean, mean.abs().max(), 1e-8)


@given(n=dims, m=dims, rank=st.integers(1, 3), workers=workers_st, seed=seeds, iters=st.integers(1, 3),
       orth=st.sampled_from(["qr", "gram_schmidt"]))
def test_paper_update_is_the_projection_of_the_mean(n, m, rank, workers, seed, iters, orth):
    grads = random_grads({"w": (n, m)}, workers, seed)
    agg = make(rank=rank, num_iters_per_step=iters, orthogonalization=orth)
    (update,), state, _ = run(agg, [grads], workers, seed)
    mean, u = exact_mean(grads)["w"], update["w"]
    p_hat = factor(state, {"w": (n, m)}, "w", rank, "p")  # the orthonormal P^ every worker shares
    norm2 = float(mean.pow(2).sum())
    r = min(rank, n, m)
    assert close(p_hat.T @ p_hat, torch.eye(r, dtype=F64), 1.0, 1e-9)
    assert close(u, theory.lowrank.powersgd_update(p_hat, mean), mean.abs().max(), 1e-9)
    assert abs(theory.lowrank.projection_inner_product(p_hat, mean)) <= 1e-9 * max(norm2, 1.0)
    assert abs(float((u * (mean - u)).sum())) <= 1e-9 * max(norm2, 1.0)  # update orthogonal to the residual
    assert abs(theory.lowrank.pythagoras_gap(mean, u)) <= 1e-9 * max(norm2, 1.0)
    s = torch.linalg.svdvals(u)
    assert float(s[r:].sum()) <= 1e-9 * max(float(s[0]) if s.numel() else 0.0, 1.0)  # rank <= r


@given(n=dims, m=dims, workers=workers_st, seed=seeds)
def test_alternating_update_projects_rows_onto_the_shared_right_factor(n, m, workers, seed):
    grads = random_grads({"w": (n, m)}, workers, seed)
    agg = make(rank=1, variant="alternating")
    (update,), state, _ = run(agg, [grads], workers, seed)
    q_hat = factor(state, {"w": (n, m)}, "w", 1, "q")  # step 0 is a left step: Q^ in, P out
    mean = exact_mean(grads)["w"]
    assert close(update["w"], mean @ q_hat @ q_hat.T, mean.abs().max(), 1e-9)


@given(n=dims, m=dims, rank=st.integers(1, 3), workers=workers_st, seed=seeds,
       variant=st.sampled_from(["paper", "alternating"]), iters=st.integers(1, 2), warm=st.booleans())
def test_error_is_at_least_the_eckart_young_optimum(n, m, rank, workers, seed, variant, iters, warm):
    grads = random_grads({"w": (n, m)}, workers, seed)
    agg = make(rank=rank, variant=variant, num_iters_per_step=iters, warm_start=warm)
    updates, _, _ = run(agg, [grads, grads], workers, seed)
    mean = exact_mean(grads)["w"]
    optimum = theory.lowrank.eckart_young_error(torch.linalg.svdvals(mean), rank)
    best = theory.lowrank.best_rank_r(mean, rank)
    assert abs(float((mean - best).pow(2).sum()) - optimum) <= 1e-9 * max(float(mean.pow(2).sum()), 1.0)
    for u in updates:
        if variant == "paper" or iters == 1:  # the alternating update has rank <= iters * r
            assert float((mean - u["w"]).pow(2).sum()) >= optimum * (1 - 1e-9) - 1e-12


@given(n=dims, m=dims, k=st.integers(1, 3), extra=st.integers(0, 1), workers=workers_st, seed=seeds,
       iters=st.integers(1, 2), orth=st.sampled_from(["qr", "gram_schmidt"]))
def test_exact_recovery_of_low_rank_inputs(n, m, k, extra, workers, seed, iters, orth):
    k = min(k, n, m)
    rank = k + extra
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, k, generator=gen, dtype=F64)  # shared column space: the mean has rank <= k
    grads = {"w": torch.stack([a @ torch.randn(m, k, generator=gen, dtype=F64).T for _ in range(workers)])}
    # The default epsilon: with k < r, P has rank k and Gram-Schmidt's extra columns are rounding noise, which
    # (norm + epsilon) keeps tiny; a vanishing epsilon would blow that noise up to a unit column.
    agg = make(rank=rank, num_iters_per_step=iters, orthogonalization=orth, epsilon=1e-8)
    (update,), _, _ = run(agg, [grads], workers, seed)
    mean = exact_mean(grads)["w"]
    # Gram-Schmidt's (norm + epsilon) biases each column by epsilon / ||residual column||: loose, not exact
    assert close(update["w"], mean, mean.abs().max(), 1e-9 if orth == "qr" else 1e-4)


@given(n=dims, m=dims, rank=st.integers(1, 3), workers=st.integers(2, 4), seed=seeds,
       variant=st.sampled_from(["paper", "alternating"]), ef=st.sampled_from(["none", "local", "averaged"]))
def test_w_workers_equal_one_worker_fed_the_mean(n, m, rank, workers, seed, variant, ef):
    grads = random_grads({"w": (n, m), "b": (n,)}, workers, seed)
    mean = {k: v[None] for k, v in exact_mean(grads).items()}  # (1, *shape)
    agg = make(rank=rank, variant=variant, error_feedback=ef)
    (many,), _, _ = run(agg, [grads], workers, seed)
    (one,), _, _ = run(agg, [mean], 1, seed)
    for name in grads:
        assert close(many[name], one[name], mean[name].abs().max(), 1e-9)


# -- the batched kernel against the loop reference ------------------------------------------------------------

# 2 r <= min(n, m) for the compressed matrices: otherwise the alternating variant's warm-started factor spans
# the (m - r)-dimensional complement of the previous one, is rank-deficient, and orthogonalization completes it
# with rounding noise, where any two correct implementations part ways.
CASE_SHAPES = {"a": (5, 4), "b": (5, 4), "conv": (4, 2, 2, 2), "tall": (7, 4), "bias": (5,)}


@pytest.mark.parametrize("variant", ["paper", "alternating"])
@pytest.mark.parametrize("ef", ["none", "local", "averaged"])
@pytest.mark.parametrize("orth", ["qr", "gram_schmidt"])
@pytest.mark.parametrize("iters", [1, 2])
def test_batched_kernel_equals_loop_reference(variant, ef, orth, iters):
    workers, rank, steps = 3, 2, 4
    agg = make(rank=rank, variant=variant, error_feedback=ef, orthogonalization=orth, num_iters_per_step=iters)
    state = agg.init(CASE_SHAPES, workers=workers, seed=7, dtype=F64)
    chosen = compressed_names(state)
    assert set(chosen) == {"a", "b", "conv", "tall"}
    ref = ReferencePowerSGD(initial_factors(state, {n: CASE_SHAPES[n] for n in chosen}, rank), workers,
                            variant=variant, num_iters_per_step=iters, error_feedback=ef, orthogonalization=orth,
                            epsilon=1e-15)
    comm = VirtualCollective(workers)
    for step in range(steps):
        grads = random_grads(CASE_SHAPES, workers, seed=100 + step)
        update, state = agg.aggregate(grads, state, comm)
        expected = ref(grads)
        for name in CASE_SHAPES:
            assert update[name].shape == CASE_SHAPES[name]
            assert close(update[name], expected[name], expected[name].abs().max(), 1e-8), (step, name)
    if ef != "none":
        ef_state = next(s for s in compressors.iter_states(state) if isinstance(s, compressors.ErrorFeedbackState))
        for name in chosen:
            mine = ef_state.memory[name].reshape(workers, CASE_SHAPES[name][0], -1)
            for i in range(workers):
                assert close(mine[i], ref.memory[name][i], 1.0, 1e-8), (name, i, float((mine[i] - ref.memory[name][i]).abs().max()))


@pytest.mark.parametrize("variant", ["paper", "alternating"])
def test_warm_up_steps_are_exact_then_compression_matches_reference(variant):
    workers, rank, warmup = 2, 1, 2
    agg = make(rank=rank, variant=variant, error_feedback="local", start_compressing_after_num_steps=warmup)
    state = agg.init(CASE_SHAPES, workers=workers, seed=3, dtype=F64)
    chosen = compressed_names(state)
    ref = ReferencePowerSGD(initial_factors(state, {n: CASE_SHAPES[n] for n in chosen}, rank), workers,
                            variant=variant, error_feedback="local", warmup_steps=warmup, epsilon=1e-15)
    comm = VirtualCollective(workers)
    for step in range(warmup + 3):
        grads = random_grads(CASE_SHAPES, workers, seed=step)
        before = len(comm.ledger)
        update, state = agg.aggregate(grads, state, comm)
        expected = ref(grads)
        tags = {r.tag for r in comm.ledger.records[before:]}
        if step < warmup:
            assert tags == {"warmup"}
            mean = exact_mean(grads)
            for name in CASE_SHAPES:
                assert torch.allclose(update[name], mean[name], rtol=1e-12, atol=1e-12)
            assert compressors.memory_norm(state) == 0.0
        else:
            assert any(t.startswith("powersgd.") for t in tags)
        for name in CASE_SHAPES:
            assert close(update[name], expected[name], expected[name].abs().max(), 1e-8), (step, name)
    # Compression really happened after warm-up: a rank-1 update of a full-rank 5x4 mean is not the mean.
    assert not torch.allclose(update["a"], exact_mean(grads)["a"], atol=1e-3)


# -- iterations, warm start, theory of subspace iteration -------------------------------------------------------

def spectrum_matrix(n, m, singular_values, seed):
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, len(singular_values), generator=gen, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(m, len(singular_values), generator=gen, dtype=F64)).Q
    return u @ torch.diag(torch.tensor(singular_values, dtype=F64)) @ v.T, v


@given(seed=seeds, ratio=st.floats(0.2, 0.9), rank=st.integers(1, 2))
def test_warm_started_power_iteration_meets_the_subspace_bound(seed, ratio, rank):
    # sigma = (4, ..., 4 [rank times], 4 ratio, 4 ratio^2, ...): a gap sigma_{r+1}/sigma_r = ratio.
    values = [4.0] * rank + [4.0 * ratio ** (i + 1) for i in range(5 - rank)]
    m_mat, v = spectrum_matrix(8, 6, values, seed)
    grads = {"w": m_mat[None]}  # one worker, the same matrix every step: the bound's "fixed M"
    agg = make(rank=rank)
    state = agg.init({"w": (8, 6)}, workers=1, seed=seed, dtype=F64)
    tan0 = theory.lowrank.largest_principal_angle_tan(factor(state, {"w": (8, 6)}, "w", rank, "q"), v[:, :rank])
    optimum = theory.lowrank.eckart_young_error(values, rank)
    comm = VirtualCollective(1)
    errors = []
    for t in range(1, 7):
        update, state = agg.aggregate(grads, state, comm)
        excess = float((m_mat - update["w"]).pow(2).sum()) - optimum
        bound = theory.lowrank.subspace_iteration_excess_error(values, rank, tan0, t)
        assert excess >= -1e-9
        assert excess <= bound + 1e-9, (t, excess, bound)
        errors.append(excess)
    assert errors[-1] <= errors[0] + 1e-12  # warm start converges


@given(seed=seeds, iters=st.integers(2, 3), variant=st.sampled_from(["paper", "alternating"]))
def test_t_iterations_in_one_step_equal_t_warm_started_steps(seed, iters, variant):
    # On a fixed matrix, one step of T iterations is T one-iteration steps (the warm-started factor carries over);
    # the alternating variant's update is the sum of every iteration's approximation, so only "paper" compares
    # the last update; for "alternating" compare the total sent mass instead: the ledgers must agree.
    grads = random_grads({"w": (6, 5)}, 2, seed)
    (one_step,), _, comm_one = run(make(rank=1, num_iters_per_step=iters, variant=variant), [grads], 2, seed)
    many, _, comm_many = run(make(rank=1, variant=variant), [grads] * iters, 2, seed)
    assert [r.bits for r in comm_one.ledger] == [r.bits for r in comm_many.ledger]
    if variant == "paper":
        assert close(one_step["w"], many[-1]["w"], 1.0, 1e-9)


def test_warm_start_off_draws_fresh_factors_each_step():
    grads = random_grads({"w": (6, 5)}, 2, 0)
    for variant in ("paper", "alternating"):
        agg = make(rank=1, warm_start=False, variant=variant)
        (u1, u2), state, _ = run(agg, [grads, grads], 2, 0)
        assert not torch.allclose(u1["w"], u2["w"])  # a new random start each step
        warm = make(rank=1, warm_start=True, variant=variant)
        (w1, w2), _, _ = run(warm, [grads, grads], 2, 0)
        assert not torch.allclose(u2["w"], w2["w"])
    # paper without warm start keeps the initial Q in the state (nothing to reuse)
    agg = make(rank=1, warm_start=False)
    state0 = agg.init({"w": (6, 5)}, workers=2, seed=0, dtype=F64)
    _, state1 = agg.aggregate(grads, state0, VirtualCollective(2))
    assert torch.equal(kernel_state(state1).q["6x5"], kernel_state(state0).q["6x5"])


# -- dtypes, zeros, the batch trap, the matrix view --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["paper", "alternating"])
@pytest.mark.parametrize("orth", ["qr", "gram_schmidt"])
def test_dtypes_keep_factor_dtype_and_stay_finite(dtype, variant, orth):
    shapes = {"w": (8, 6), "conv": (4, 2, 3, 3), "b": (8,)}
    agg = compressors.make("powersgd", rank=2, variant=variant, orthogonalization=orth, error_feedback="local")
    grads_list = [random_grads(shapes, 2, s, dtype=dtype) for s in range(3)]
    updates, state, _ = run(agg, grads_list, 2, 0, dtype=dtype)
    ks = kernel_state(state)
    for f in (*ks.p.values(), *ks.q.values()):
        assert f.dtype == dtype
        assert torch.isfinite(f).all()
    for u in updates:
        for name, s in shapes.items():
            assert u[name].dtype == dtype and u[name].shape == s
            assert torch.isfinite(u[name]).all()
    # the first update is a projection of the mean: never longer than it (loosely, for half precision)
    mean = exact_mean({n: g.double() for n, g in grads_list[0].items()})
    for name in ("w", "conv"):
        assert float(updates[0][name].double().norm()) <= 1.05 * float(mean[name].norm()) + 1e-3


@pytest.mark.parametrize("variant", ["paper", "alternating"])
@pytest.mark.parametrize("orth", ["qr", "gram_schmidt"])
@pytest.mark.parametrize("ef", ["none", "local", "averaged"])
def test_zero_gradients_give_zero_update_and_no_nan(variant, orth, ef):
    shapes = {"w": (5, 4), "conv": (3, 2, 2, 2), "b": (5,)}
    zeros = {n: torch.zeros((3, *s)) for n, s in shapes.items()}
    agg = make(rank=2, variant=variant, orthogonalization=orth, error_feedback=ef)
    (u1, u2), state, _ = run(agg, [zeros, zeros], 3, 0, dtype=torch.float32)
    for u in (u1, u2):
        for name in shapes:
            assert torch.isfinite(u[name]).all() and torch.count_nonzero(u[name]) == 0
    for s in compressors.iter_states(state):
        for v in s:
            if isinstance(v, dict):
                assert all(torch.isfinite(t).all() for t in v.values())


@pytest.mark.parametrize("orth", ["qr", "gram_schmidt"])
@pytest.mark.parametrize("variant", ["paper", "alternating"])
def test_compression_recovers_after_a_zero_gradient(orth, variant):
    # A layer whose first gradient is zero (frozen at first, a dead branch) must still be compressed later:
    # a warm-started factor of zeros would otherwise keep every later update at zero.
    shapes = {"w": (6, 5)}
    zeros = {"w": torch.zeros((2, 6, 5), dtype=F64)}
    grads = random_grads(shapes, 2, 1)
    agg = make(rank=1, variant=variant, orthogonalization=orth)
    updates, _, _ = run(agg, [zeros, grads, grads], 2, 0)
    mean = exact_mean(grads)["w"]
    for u in updates[1:]:
        captured = 1.0 - float((mean - u["w"]).pow(2).sum() / mean.pow(2).sum())
        assert captured > 1e-3, captured


@given(batch=st.integers(1, 4), n=dims, r=st.integers(1, 3), seed=seeds, orth=st.sampled_from(["qr", "gram_schmidt"]))
def test_orthogonalize_batch_equals_each_matrix_alone(batch, n, r, seed, orth):
    r = min(r, n)
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([10.0 ** (3 * i) for i in range(batch)], dtype=F64)  # wildly different norms
    x = torch.randn(batch, n, r, generator=gen, dtype=F64) * scales[:, None, None]  # (B, n, r)
    out = compressors.orthogonalize(x, orth, 1e-8)  # (B, n, r)
    for b in range(batch):
        alone = compressors.orthogonalize(x[b], orth, 1e-8)
        assert torch.allclose(out[b], alone, atol=1e-10)
        assert torch.allclose(out[b], reference_orthogonalize(x[b], orth, 1e-8), atol=1e-8)
        # QR is orthonormal to rounding; Gram-Schmidt's (norm + epsilon) leaves an epsilon-sized bias
        assert torch.allclose(out[b].T @ out[b], torch.eye(r, dtype=F64), atol=1e-10 if orth == "qr" else 1e-5)


def test_compression_is_decided_on_the_matrix_view():
    # conv (8, 4, 3, 3) is the matrix 8 x 36: rank 1 sends 44 of 288 numbers (6.5x > 5). Judged on the raw
    # trailing 3x3 it would look like 6 of 9 (1.5x) and stay uncompressed.
    conv, column = (8, 4, 3, 3), (64, 1, 1, 1)  # column: matrix 64 x 1, rank 1 sends 65 > 64: not worth it
    shapes = {"conv": conv, "column": column}
    agg = compressors.make("powersgd", rank=1, min_compression_rate=5.0, error_feedback="none")
    grads = random_grads(shapes, 2, 0, dtype=torch.float32)
    (update,), state, comm = run(agg, [grads], 2, 0, dtype=torch.float32)
    assert compressed_names(state) == ("conv",)
    assert agg.bits_per_step(shapes) == (8 + 36) * 32 + 64 * 32
    assert sum(r.bits for r in comm.ledger) == agg.bits_per_step(shapes)
    assert torch.equal(update["column"], exact_mean(grads)["column"])
    ref = ReferencePowerSGD(initial_factors(agg.init(shapes, workers=2, seed=0), {"conv": conv}, 1), 2)
    expected = ref({"conv": grads["conv"].double()})["conv"]
    assert close(update["conv"], expected, 1.0, 1e-5), float((update["conv"].double() - expected).abs().max())


# -- determinism, purity, accounting -----------------------------------------------------------------------------

def clone_tree(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: clone_tree(v) for k, v in x.items()}
    if isinstance(x, tuple):
        items = [clone_tree(v) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    return x


def equal_tree(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal_tree(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(equal_tree(x, y) for x, y in zip(a, b))
    return a == b


OPTION_CASES = [
    {"variant": "paper"}, {"variant": "alternating"}, {"warm_start": False},
    {"warm_start": False, "variant": "alternating"}, {"num_iters_per_step": 3},
    {"orthogonalization": "gram_schmidt", "error_feedback": "averaged"}, {"error_feedback": "local"},
    {"error_feedback": "ef21"}, {"start_compressing_after_num_steps": 1},
]


@pytest.mark.parametrize("options", OPTION_CASES)
def test_determinism_and_inputs_never_mutated(options):
    shapes = {"w": (6, 5), "conv": (3, 2, 2, 2), "b": (6,)}
    agg = make(rank=2, **options)
    grads_list = [random_grads(shapes, 3, s, dtype=torch.float32) for s in range(3)]
    saved = clone_tree(grads_list)
    runs = []
    for _ in range(2):
        state = agg.init(shapes, workers=3, seed=11)
        comm = VirtualCollective(3)
        out = []
        for grads in grads_list:
            update, state = agg.aggregate(grads, state, comm)
            out.append(update)
        runs.append((out, state))
    assert equal_tree(grads_list, saved)  # gradients untouched
    assert equal_tree(runs[0][0], runs[1][0])  # bitwise same updates
    assert equal_tree(runs[0][1], runs[1][1])  # and bitwise same final state
    other = agg.init(shapes, workers=3, seed=12)
    update, _ = agg.aggregate(grads_list[0], other, VirtualCollective(3))
    if options.get("start_compressing_after_num_steps", 0) == 0:
        assert not torch.equal(update["w"], runs[0][0][0]["w"])  # the seed matters


def test_state_passed_in_is_not_mutated():
    shapes = {"w": (6, 5), "b": (6,)}
    for options in OPTION_CASES:
        agg = make(rank=2, **options)
        state = agg.init(shapes, workers=2, seed=0)
        comm = VirtualCollective(2)
        for s in range(3):
            saved = clone_tree(state)
            _, new_state = agg.aggregate(random_grads(shapes, 2, s, dtype=torch.float32), state, comm)
            assert equal_tree(state, saved), options
            state = new_state


def test_seed_option_overrides_init_seed():
    shapes = {"w": (6, 5)}
    grads = random_grads(shapes, 2, 0, dtype=torch.float32)
    agg = make(rank=1, seed=5)
    (a,), _, _ = run(agg, [grads], 2, seed=0, dtype=torch.float32)
    (b,), _, _ = run(agg, [grads], 2, seed=1, dtype=torch.float32)
    assert torch.equal(a["w"], b["w"])


@pytest.mark.parametrize("variant", ["paper", "alternating"])
@pytest.mark.parametrize("iters", [1, 2, 3])
@pytest.mark.parametrize("warmup", [0, 2])
def test_ledger_bits_equal_bits_per_step(variant, iters, warmup):
    shapes = {"w": (16, 12), "w2": (16, 12), "conv": (8, 4, 3, 3), "b": (16,), "s": ()}
    agg = compressors.make("powersgd", rank=2, variant=variant, num_iters_per_step=iters, min_compression_rate=0.0,
                           start_compressing_after_num_steps=warmup)
    state = agg.init(shapes, workers=2, seed=0)
    comm = VirtualCollective(2)
    for s in range(warmup):  # warm-up steps send the dense gradient
        before = comm.ledger.total_bits
        _, state = agg.aggregate(random_grads(shapes, 2, s, dtype=torch.float32), state, comm)
        assert comm.ledger.total_bits - before == sum(max(1, torch.Size(v).numel()) for v in shapes.values()) * 32
    before = comm.ledger.total_bits
    for s in range(2):  # averaged over two steps: the alternating variant sends P, then Q
        _, state = agg.aggregate(random_grads(shapes, 2, 10 + s, dtype=torch.float32), state, comm)
    assert comm.ledger.total_bits - before == 2 * agg.bits_per_step(shapes)
    expected = (2 * 2 * (16 + 12) + 2 * (8 + 36)) * iters * 32 / (1 if variant == "paper" else 2) + (16 + 1) * 32
    assert agg.bits_per_step(shapes) == expected
    assert all(r.op == "all_reduce" for r in comm.ledger)


def test_model_with_nothing_to_compress():
    shapes = {"bias": (7,), "scale": (), "tiny": (2, 1)}  # (2, 1): rank 1 sends 3 > 2 numbers
    agg = compressors.make("powersgd", rank=1)
    grads_list = [random_grads(shapes, 3, s, dtype=torch.float32) for s in range(2)]
    updates, state, comm = run(agg, grads_list, 3, 0, dtype=torch.float32)
    assert compressed_names(state) == ()
    for u, g in zip(updates, grads_list):
        for name in shapes:
            assert torch.allclose(u[name], exact_mean(g)[name], atol=1e-6)
    assert agg.bits_per_step(shapes) == (7 + 1 + 2) * 32
    assert comm.ledger.total_bits == 2 * agg.bits_per_step(shapes)
    assert agg.theory(shapes).kind == "exact"


@pytest.mark.parametrize("field, value", [
    ("rank", 0), ("rank", 1.5), ("num_iters_per_step", 0), ("warm_start", "yes"), ("variant", "papr"),
    ("orthogonalization", "svd"), ("epsilon", -1.0), ("min_compression_rate", -1.0),
    ("start_compressing_after_num_steps", -1), ("error_feedback", "lokal"), ("seed", -3),
])
def test_bad_options_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        compressors.make("powersgd", **{field: value})


def test_unknown_option_suggests_the_closest():
    with pytest.raises(ValueError, match="rank"):
        compressors.make("powersgd", rnak=2)
