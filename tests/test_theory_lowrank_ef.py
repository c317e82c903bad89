"""theory.lowrank and theory.error_feedback against direct computation (SVD, a plain orthogonal iteration)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from theory import error_feedback as ef
from theory import lowrank

F64 = torch.float64
dims = st.integers(1, 7)
seeds = st.integers(0, 2**16)


def rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def orthonormal(n, r, seed):
    return torch.linalg.qr(rand((n, r), seed)).Q


@given(n=dims, m=dims, r=st.integers(0, 8), seed=seeds)
def test_eckart_young_matches_the_truncated_svd(n, m, r, seed):
    mat = rand((n, m), seed)
    s = torch.linalg.svdvals(mat)
    best = lowrank.best_rank_r(mat, r)
    err = float((mat - best).pow(2).sum())
    assert err == pytest.approx(lowrank.eckart_young_error(s, r), rel=1e-9, abs=1e-12)
    assert int(torch.linalg.matrix_rank(best)) <= r
    rel = lowrank.relative_eckart_young_error(s, r)
    assert 0.0 <= rel <= 1.0 and rel == pytest.approx(err / float(mat.pow(2).sum()), rel=1e-9, abs=1e-12)
    assert lowrank.eckart_young_error(s.flip(0), r) == lowrank.eckart_young_error(s, r)  # order-free
    if r >= min(n, m):
        assert lowrank.eckart_young_error(s, r) == 0.0


@given(n=st.integers(2, 7), m=st.integers(2, 7), seed=seeds)
def test_any_rank_r_projection_is_no_better_than_eckart_young(n, m, seed):
    mat = rand((n, m), seed)
    r = min(n, m) - 1
    p_hat = orthonormal(n, r, seed + 1)
    assert lowrank.projection_error(p_hat, mat) >= lowrank.eckart_young_error(torch.linalg.svdvals(mat), r) - 1e-12


@given(n=dims, m=dims, r=st.integers(1, 4), seed=seeds)
def test_projection_identities(n, m, r, seed):
    r = min(r, n)
    mat, p_hat = rand((n, m), seed), orthonormal(n, r, seed + 1)
    update = lowrank.powersgd_update(p_hat, mat)
    norm2 = float(mat.pow(2).sum())
    assert abs(lowrank.projection_inner_product(p_hat, mat)) <= 1e-12 * norm2
    assert abs(lowrank.pythagoras_gap(mat, update)) <= 1e-12 * norm2
    assert torch.allclose(update + lowrank.projection_residual(p_hat, mat), mat)
    assert int(torch.linalg.matrix_rank(update)) <= r


def test_identities_fail_for_a_non_orthonormal_basis():
    # The checks are not vacuous: a scaled basis is not a projection.
    mat, p = rand((5, 4), 0), 1.5 * orthonormal(5, 2, 1)
    update = lowrank.powersgd_update(p, mat)
    assert abs(lowrank.pythagoras_gap(mat, update)) > 1e-3
    assert abs(lowrank.projection_inner_product(p, mat)) > 1e-3


def test_principal_angle_tan():
    theta = 0.3
    e1 = torch.tensor([[1.0], [0.0]], dtype=F64)
    v = torch.tensor([[math.cos(theta)], [math.sin(theta)]], dtype=F64)
    assert lowrank.largest_principal_angle_tan(v, e1) == pytest.approx(math.tan(theta))
    assert lowrank.largest_principal_angle_tan(e1, e1) == pytest.approx(0.0, abs=1e-12)
    assert lowrank.largest_principal_angle_tan(torch.tensor([[0.0], [1.0]], dtype=F64), e1) == math.inf


def with_spectrum(n, m, values, seed):
    u, v = orthonormal(n, len(values), seed), orthonormal(m, len(values), seed + 1)
    return u @ torch.diag(torch.tensor(values, dtype=F64)) @ v.T, u, v


@settings(max_examples=5)  # each example is several steps; keep the suite fast
@given(seed=seeds, ratio=st.floats(0.1, 0.95), r=st.integers(1, 3))
def test_plain_orthogonal_iteration_meets_the_subspace_bounds(seed, ratio, r):
    values = [5.0 - 0.1 * i for i in range(r)] + [(5.0 - 0.1 * (r - 1)) * ratio ** (i + 1) for i in range(6 - r)]
    mat, u, v = with_spectrum(9, 7, values, seed)
    q = rand((7, r), seed + 2)
    tan0 = lowrank.largest_principal_angle_tan(q, v[:, :r])
    optimum = lowrank.eckart_young_error(values, r)
    previous = math.inf
    for t in range(1, 6):
        p_hat = torch.linalg.qr(mat @ q).Q  # P^_t spans M (M^T M)^(t-1) Q_0
        q = mat.T @ p_hat
        tan_t = lowrank.largest_principal_angle_tan(p_hat, u[:, :r])
        # +1e-7: tan is measured through cos = sqrt(1 - sin^2), which has no resolution below ~sqrt(eps)
        assert tan_t <= lowrank.subspace_iteration_tan(values[r] / values[r - 1], tan0, t) * (1 + 1e-8) + 1e-7
        excess = lowrank.projection_error(p_hat, mat) - optimum
        bound = lowrank.subspace_iteration_excess_error(values, r, tan0, t)
        assert -1e-10 <= excess <= bound + 1e-10
        assert bound <= previous
        previous = bound


def test_subspace_bound_bad_inputs():
    with pytest.raises(ValueError, match="gap"):
        lowrank.subspace_iteration_excess_error([2.0, 2.0, 1.0], 1, 1.0, 1)
    with pytest.raises(ValueError, match="t="):
        lowrank.subspace_iteration_tan(0.5, 1.0, 0)
    with pytest.raises(ValueError, match="r="):
        lowrank.eckart_young_error([1.0], -1)
    assert lowrank.subspace_iteration_excess_error([2.0, 1.0], 2, 1.0, 1) == 0.0  # full rank: no error


def test_conservation_gap_of_a_hand_run():
    # Local EF with C(x) = x/2 on one worker: e' = x/2, update = x/2.
    grads = [rand((3,), s) for s in range(4)]
    memory, updates = torch.zeros(3, dtype=F64), []
    for g in grads:
        x = g + memory
        updates.append(x / 2)
        memory = x - x / 2
    assert float(ef.conservation_gap(updates, memory, grads).abs().max()) < 1e-12
    assert float(ef.conservation_gap(updates[:-1], memory, grads).abs().max()) > 1e-3


def test_ef_sgd_rate():
    kwargs = dict(L=2.0, sigma2=3.0, f_gap=5.0)
    T = 99
    sgd_like = 2 * 5.0 / math.sqrt(T + 1) + 2.0 * 3.0 / math.sqrt(T + 1)
    assert ef.ef_sgd_rate(1.0, T=T, **kwargs) == pytest.approx(sgd_like)  # delta = 1: no compression term
    assert ef.ef_sgd_rate(0.1, T=T, **kwargs) > ef.ef_sgd_rate(0.5, T=T, **kwargs)
    assert ef.ef_sgd_rate(0.1, T=10_000, **kwargs) < ef.ef_sgd_rate(0.1, T=100, **kwargs)
    # the compression term is O(1/T): its share vanishes as T grows
    extra = [ef.ef_sgd_rate(0.1, T=t, **kwargs) - ef.ef_sgd_rate(1.0, T=t, **kwargs) for t in (99, 9999)]
    assert extra[1] == pytest.approx(extra[0] / 100, rel=1e-9)
    with pytest.raises(ValueError, match="delta"):
        ef.ef_sgd_rate(0.0, T=T, **kwargs)


def test_ef21_rate():
    theta, beta = ef.ef21_constants(1.0)
    assert (theta, beta) == (1.0, 0.0)
    theta, beta = ef.ef21_constants(0.19)
    assert theta == pytest.approx(0.1) and beta == pytest.approx(0.81 / 0.1)
    assert ef.ef21_max_stepsize(1.0, 2.0, 3.0) == pytest.approx(0.5)  # no compression: 1/L
    assert ef.ef21_max_stepsize(0.1, 2.0, 3.0) < ef.ef21_max_stepsize(0.5, 2.0, 3.0)
    r100 = ef.ef21_rate(0.5, 1.0, 1.0, f_gap=2.0, g0=1.0, T=100)
    assert ef.ef21_rate(0.5, 1.0, 1.0, f_gap=2.0, g0=1.0, T=200) == pytest.approx(r100 / 2)  # O(1/T)
    with pytest.raises(ValueError, match="gamma"):
        ef.ef21_rate(0.5, 1.0, 1.0, f_gap=2.0, g0=1.0, T=100, gamma=10.0)
