"""theory.operators and theory.bits against brute force, worst cases and the compressors themselves."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import compressors
from theory import bits as tbits
from theory import operators

# -- operators ------------------------------------------------------------------------------------------------


@given(omega=st.floats(0, 100), seed=st.integers(0, 2 ** 16))
def test_delta_from_omega_is_the_contraction_of_the_rescaled_operator(omega, seed):
    """Scaled random-k with omega = d/k - 1: E||C/(1+w) - x||^2 = (1 - 1/(1+w)) ||x||^2 over every outcome."""
    d, k = 6, 2
    x = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = operators.randomk_omega(d, k)
    import itertools
    errors = []
    for chosen in itertools.combinations(range(d), k):
        c = torch.zeros(d, dtype=torch.float64)
        c[list(chosen)] = x[list(chosen)] * d / k
        errors.append(float((c / (1 + w) - x).pow(2).sum()))
    assert sum(errors) / len(errors) <= (1 - operators.delta_from_omega(w)) * float(x.pow(2).sum()) * (1 + 1e-12)
    assert operators.delta_from_omega(omega) == pytest.approx(1 / (1 + omega))


def test_contraction_and_bad_input():
    assert operators.contraction("exact") == 1.0
    assert operators.contraction("contractive", delta=0.25) == 0.25
    assert operators.contraction("unbiased", omega=3.0) == 0.25
    with pytest.raises(ValueError, match="delta"):
        operators.contraction("biased", owner="sign")
    with pytest.raises(ValueError, match="omega"):
        operators.delta_from_omega(-1.0)
    with pytest.raises(ValueError, match="budget"):
        operators.atomo_probabilities(torch.ones(3), 4)
    with pytest.raises(ValueError, match="dtype"):
        operators.unit_roundoff(torch.int32)


def test_delta_of_and_combiners():
    x = torch.tensor([3.0, 4.0])
    assert operators.delta_of(x, torch.tensor([3.0, 0.0])) == pytest.approx(9 / 25)
    assert operators.delta_of(torch.zeros(2), torch.zeros(2)) == 1.0
    assert operators.combine_delta([0.5, 0.25]) == 0.25 and operators.combine_delta([]) == 1.0
    assert operators.combine_omega([0.5, 2.0]) == 2.0 and operators.combine_omega([]) == 0.0


@given(d=st.integers(1, 50), seed=st.integers(0, 2 ** 16))
def test_topk_bound_holds_and_is_tight_on_constant_vectors(d, seed):
    x = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for k in range(1, d + 1):
        kept = torch.zeros_like(x)
        index = x.abs().topk(k).indices
        kept[index] = x[index]
        assert operators.delta_of(x, kept) >= operators.topk_delta(d, k) - 1e-12
    ones = torch.ones(d, dtype=torch.float64)
    assert operators.delta_of(ones, torch.cat([ones[:1], torch.zeros(d - 1, dtype=torch.float64)])) == \
        pytest.approx(operators.topk_delta(d, 1))


@given(d=st.integers(1, 64))
def test_terngrad_omega_is_attained_at_the_extremal_input(d):
    """x = (1, t, ..., t), t = 1/(sqrt d + 1), attains omega = (sqrt d - 1)/2; random x stay below."""
    t = 1 / (math.sqrt(d) + 1)
    x = torch.full((d,), t, dtype=torch.float64)
    x[0] = 1.0
    ratio = operators.terngrad_variance_of(x) / float(x.pow(2).sum())
    assert ratio == pytest.approx(operators.terngrad_omega(d), rel=1e-9, abs=1e-12)
    y = torch.randn(d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    assert operators.terngrad_variance_of(y) <= operators.terngrad_omega(d) * float(y.pow(2).sum()) + 1e-12


@given(d=st.integers(1, 64), levels=st.integers(1, 20), seed=st.integers(0, 2 ** 16))
def test_qsgd_variance_below_omega(d, levels, seed):
    x = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert operators.qsgd_variance_of(x, levels) <= operators.qsgd_omega(d, levels) * float(x.pow(2).sum()) + 1e-12


def test_natural_variance_worst_case_is_one_eighth():
    x = torch.tensor([4.0 / 3.0, 4.0 / 3.0 * 2 ** -5, 1.0, 1.5])
    per = [operators.natural_variance_of(v.reshape(1)) / float(v) ** 2 for v in x]
    assert per[0] == pytest.approx(1 / 8) and per[1] == pytest.approx(1 / 8)
    assert per[2] == 0.0 and per[3] < 1 / 8
    assert operators.natural_omega() == 1 / 8


def test_sketch_omega_matches_the_wishart_second_moment():
    """E[(Omega Omega^T)^2] = r (m + r + 1) I, checked by Monte Carlo with a fixed seed (4000 draws)."""
    m, r = 5, 2
    g = torch.Generator().manual_seed(0)
    omega = torch.randn(4000, m, r, generator=g, dtype=torch.float64)
    gram = omega @ omega.transpose(1, 2)  # (N, m, m)
    second = (gram @ gram).mean(0)
    torch.testing.assert_close(second, r * (m + r + 1) * torch.eye(m, dtype=torch.float64), atol=1.0, rtol=0.05)
    assert operators.sketch_omega(m, r) == (m + 1) / r


@given(seed=st.integers(0, 2 ** 16), count=st.integers(1, 8), zeros=st.integers(0, 3))
def test_atomo_probabilities_are_feasible_and_optimal(seed, count, zeros):
    sigma = torch.rand(count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    sigma[:min(zeros, count)] = 0.0
    for budget in range(1, count + 1):
        p = operators.atomo_probabilities(sigma, budget)
        assert float(p.sum()) == pytest.approx(budget) and ((p >= 0) & (p <= 1 + 1e-12)).all()
        assert (p[sigma > 0] > 0).all()
        # KKT: unsaturated probabilities are proportional to sigma (one constant c), saturated ones have
        # c sigma >= 1.
        free = (p < 1 - 1e-12) & (sigma > 0)
        if free.any():
            c = (p[free] / sigma[free])
            torch.testing.assert_close(c, c[:1].expand_as(c))
            assert (c[0] * sigma[p >= 1 - 1e-12] >= 1 - 1e-9).all()
        # never worse than the uniform feasible choice
        uniform = torch.full_like(sigma, budget / count)
        assert operators.atomo_variance(sigma, p) <= operators.atomo_variance(sigma, uniform) + 1e-9


@given(n=st.integers(1, 6), m=st.integers(1, 6), seed=st.integers(0, 2 ** 16))
def test_svd_error_and_delta(n, m, seed):
    x = torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    for r in range(1, min(n, m) + 1):
        best = (u[:, :r] * s[:r]) @ vh[:r]
        assert float((x - best).pow(2).sum()) == pytest.approx(operators.svd_error(s, r), abs=1e-10)
        assert operators.delta_of(x, best) >= operators.svd_delta(n, m, r) - 1e-12


def test_cast_delta_values():
    assert operators.cast_delta(torch.float16) == 1 - 2.0 ** -22
    assert operators.cast_delta(torch.bfloat16) == 1 - 2.0 ** -16


# -- bits -----------------------------------------------------------------------------------------------------


def test_closed_forms_by_hand():
    assert tbits.topk_bits(100, 10) == 640
    assert tbits.sign_bits(9) == 16 + 8 and tbits.scaled_sign_bits(16) == 16 + 32
    assert tbits.qsgd_bits(10, 127) == 80 + 32 and tbits.qsgd_bits(10, 128) == 160 + 32
    assert tbits.terngrad_bits(5) == 16 + 32 and tbits.natural_bits(8) == 64 + 8
    assert tbits.svd_bits(4, 6, 10) == 4 * 10 * 32 and tbits.atomo_bits(4, 6, 2, 16) == 2 * 10 * 16
    assert tbits.sketch_bits(4, 6, 3) == 12 * 32
    assert tbits.powersgd_bits(4, 6, 2) == 2 * 10 * 32 and tbits.powersgd_bits(4, 6, 2, variant="alternating") == 320
    assert tbits.level_int_bits(127) == 8 and tbits.level_int_bits(32767) == 16 and tbits.level_int_bits(32768) == 32
    assert tbits.sparsity_k(10, ratio=0.25) == 2 and tbits.sparsity_k(10, ratio=0.01) == 1
    assert tbits.sparsity_k(10, k=10) == 10
    with pytest.raises(ValueError, match="k=11"):
        tbits.sparsity_k(10, k=11)


def test_scheme_bits_policy_and_errors():
    shapes = {"w": (10, 10), "b": (10,)}
    # rank 9 on 10x10 sends 9*20*32 > dense: the policy sends it dense (rate <= 2)
    assert tbits.scheme_bits("powersgd", shapes, rank=9) == 110 * 32
    assert tbits.scheme_bits("powersgd", shapes, rank=1) == 20 * 32 + 10 * 32
    assert tbits.scheme_ratio("identity", shapes) == 1.0
    with pytest.raises(ValueError, match="scheme"):
        tbits.scheme_bits("nope", shapes)
    with pytest.raises(ValueError, match="rank"):
        tbits.scheme_bits("sign", shapes, rank=2)


SCHEME_OPTIONS = {"powersgd": [{"rank": 2}, {"rank": 3, "variant": "alternating", "num_iters_per_step": 2}],
                  "topk": [{"ratio": 0.1}, {"k": 2}], "randomk": [{}, {"k": 1}], "random_block": [{"ratio": 0.5}],
                  "qsgd": [{}, {"levels": 300}], "svd": [{"rank": 3}], "lowrank_sketch": [{"rank": 2}],
                  "atomo": [{"rank": 2}], "sign": [{"compress_vectors": True}], "fp16": [{"min_compression_rate": 3.0}]}


@pytest.mark.parametrize("name", sorted(compressors.REGISTRY))
def test_scheme_bits_agrees_with_every_registered_compressor(name):
    shapes = {"conv": (16, 8, 3, 3), "fc": (10, 64), "bias": (64,), "tiny": (2, 1), "empty": (0, 3)}
    for options in [{}] + SCHEME_OPTIONS.get(name, []):
        agg = compressors.make(name, **options)
        for dtype, value_bits in ((torch.float32, 32), (torch.float16, 16)):
            assert agg.bits_per_step(shapes, dtype=dtype) == tbits.scheme_bits(name, shapes, value_bits, **options)
        assert tbits.scheme_ratio(name, shapes, **options) >= 1 or name == "powersgd"


def test_epoch_volume():
    assert tbits.steps_per_epoch(50000, 16, 128) == 24
    assert tbits.steps_per_epoch(50000, 16, 128, drop_last=False) == 25
    assert tbits.epoch_megabytes(8 * 2 ** 20, 100, 1, 10) == 10.0
