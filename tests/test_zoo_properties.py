"""Property suite of the compressor zoo: each compressor held to its declared theory class and its bits.

Sizes are tiny; hypothesis runs are bounded by conftest's profile. Random compressors are checked twice:
exactly (enumerate every outcome with its probability, the expectation must equal x) and statistically
(derandomized: fixed seeds, a Markov constant large enough that a fresh seed would fail with prob <= 1/C).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import compressors
from compressors.lowrank_baselines import systematic_sample
from compressors.comm import VirtualCollective
from theory import bits as tbits
from theory import operators

ZOO = ["fp16", "bf16", "topk", "randomk", "random_block", "sign", "scaled_sign", "signum", "qsgd", "terngrad",
       "natural", "svd", "lowrank_sketch", "atomo"]
RANDOM = ["randomk", "random_block", "qsgd", "terngrad", "natural", "lowrank_sketch", "atomo"]
# Options that make every compressor non-trivial on tiny tensors.
SMALL = {"topk": {"ratio": 0.3}, "randomk": {"ratio": 0.3}, "random_block": {"ratio": 0.3},
         "svd": {"rank": 1}, "lowrank_sketch": {"rank": 2}, "atomo": {"rank": 1}, "qsgd": {"levels": 4}}
UNBIASED_OPTIONS = {"randomk": {"scaled": True}, "random_block": {"scaled": True}}
# C(a x) = a^degree C(x) for a > 0 (given the same randomness); fp16/natural exactly only for powers of two.
HOMOGENEITY_DEGREE = {name: 1 for name in ZOO} | {"sign": 0, "signum": 0}


def everything(name, **options):
    """The compressor applied to every tensor (vectors too), no error feedback: the bare operator."""
    return compressors.make(name, **{"error_feedback": "none", "min_compression_rate": 0.0,
                                     "compress_vectors": True, **SMALL.get(name, {}), **options})


def run_once(agg, grads, seed=0, state=None, want_local=True):
    workers = next(iter(grads.values())).shape[0]
    shapes = {n: tuple(g.shape[1:]) for n, g in grads.items()}
    state = agg.init(shapes, workers, seed=seed, dtype=next(iter(grads.values())).dtype) if state is None else state
    comm = VirtualCollective(workers)
    reduced, state = agg.reduce(grads, state, comm, want_local=want_local)
    return reduced, state, comm


shapes_strategy = st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=3)


def random_grads(shapes, workers, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn((workers, *s), generator=g, dtype=torch.float64).to(dtype)
            for i, s in enumerate(shapes)}


# -- structure ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO)
@given(shapes=shapes_strategy, workers=st.integers(1, 3), seed=st.integers(0, 2 ** 16),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
def test_shape_dtype_kept_and_finite(name, shapes, workers, seed, dtype):
    grads = random_grads(shapes, workers, seed, dtype)
    reduced, _, _ = run_once(everything(name), grads, seed)
    for n, g in grads.items():
        assert reduced.update[n].shape == g.shape[1:] and reduced.update[n].dtype == dtype
        assert reduced.local[n].shape == g.shape and reduced.local[n].dtype == dtype
        assert torch.isfinite(reduced.update[n]).all() and torch.isfinite(reduced.local[n]).all()


@pytest.mark.parametrize("name", ZOO)
def test_zero_maps_to_zero(name):
    grads = {"w": torch.zeros(3, 4, 5), "b": torch.zeros(3, 5), "s": torch.zeros(3, 1, 1)}
    reduced, _, _ = run_once(everything(name), grads)
    for n in grads:
        assert torch.equal(reduced.update[n], torch.zeros_like(reduced.update[n]))
        assert torch.equal(reduced.local[n], torch.zeros_like(reduced.local[n]))


@pytest.mark.parametrize("name", ZOO)
@given(seed=st.integers(0, 2 ** 16), power=st.sampled_from([-3, -1, 1, 2]))
def test_positive_homogeneity(name, seed, power):
    """Same seed, so the same randomness: C(a x) = a^deg C(x) with a = 2^power (exact in binary floats)."""
    grads = random_grads([(4, 5), (6,)], 2, seed, torch.float64)
    a = 2.0 ** power
    scaled = {n: g * a for n, g in grads.items()}
    base, _, _ = run_once(everything(name), grads, seed)
    other, _, _ = run_once(everything(name), scaled, seed)
    factor = a ** HOMOGENEITY_DEGREE[name]
    for n in grads:
        torch.testing.assert_close(other.local[n], base.local[n] * factor, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(other.update[n], base.update[n] * factor, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ZOO)
def test_deterministic_per_seed_over_steps(name):
    grads = random_grads([(5, 6), (7,)], 3, 1)
    outputs = []
    for _ in range(2):
        agg, state, steps = everything(name), None, []
        for _ in range(3):
            reduced, state, _ = run_once(agg, grads, seed=11, state=state)
            steps.append(reduced.update)
        outputs.append(steps)
    for a, b in zip(*outputs):
        for n in a:
            assert torch.equal(a[n], b[n])


@pytest.mark.parametrize("name", RANDOM)
def test_randomness_depends_on_seed_and_step_only_where_declared(name):
    grads = random_grads([(8, 9)], 2, 3)
    agg = everything(name)
    first, state, _ = run_once(agg, grads, seed=0)
    second, _, _ = run_once(agg, grads, seed=0, state=state)
    other_seed, _, _ = run_once(agg, grads, seed=1)
    assert not torch.equal(first.update["t0"], second.update["t0"])  # fresh randomness every step
    assert not torch.equal(first.update["t0"], other_seed.update["t0"])


@pytest.mark.parametrize("name", ["qsgd", "terngrad", "natural", "atomo"])
def test_private_randomness_differs_between_workers(name):
    x = torch.randn(1, 8, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reduced, _, _ = run_once(everything(name), {"w": x.expand(2, 8, 9).clone()})
    assert not torch.equal(reduced.local["w"][0], reduced.local["w"][1])


@pytest.mark.parametrize("name", ["randomk", "random_block", "lowrank_sketch"])
def test_shared_randomness_is_identical_on_workers(name):
    x = torch.randn(1, 8, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reduced, _, _ = run_once(everything(name), {"w": x.expand(2, 8, 9).clone()})
    assert torch.equal(reduced.local["w"][0], reduced.local["w"][1])


# -- bits: ledger == bits_per_step == theory.bits --------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO)
@given(shapes=st.lists(st.sampled_from([(6, 5), (3, 2, 2, 2), (16,), (9, 1), (1, 4), (2, 3, 4)]), min_size=1,
                       max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]))
def test_ledger_equals_bits_per_step_equals_theory(name, shapes, dtype):
    grads = random_grads(shapes, 2, 0, dtype)
    named = {n: tuple(g.shape[1:]) for n, g in grads.items()}
    options = SMALL.get(name, {})
    agg = compressors.make(name, **options)  # default policies: vectors dense, rate > 1 only
    _, _, comm = run_once(agg, grads)
    ledger = sum(r.bits for r in comm.ledger)
    value_bits = torch.finfo(dtype).bits
    assert ledger == agg.bits_per_step(named, dtype=dtype) == tbits.scheme_bits(name, named, value_bits, **options)
    dense = sum(math.prod(s) for s in named.values()) * 32
    assert dense / agg.bits_per_step(named) >= 1  # compression ratio >= 1 under the default policy
    assert all(r.op == ("all_reduce" if agg.all_reducible else "all_gather") or r.tag == "uncompressed"
               for r in comm.ledger)


@pytest.mark.parametrize("name,options", [("topk", {"k": 3}), ("randomk", {"k": 2}), ("qsgd", {"levels": 200}),
                                          ("svd", {"rank": 3}), ("atomo", {"rank": 2}), ("lowrank_sketch", {"rank": 3}),
                                          ("signum", {"momentum": 0.5})])
def test_bits_with_options_and_all_error_feedback_modes(name, options):
    grads = random_grads([(12, 10), (4, 3, 3), (10,)], 3, 0)
    named = {n: tuple(g.shape[1:]) for n, g in grads.items()}
    for mode in compressors.ERROR_FEEDBACK_MODES:
        agg = compressors.make(name, error_feedback=mode, **options)
        _, _, comm = run_once(agg, grads)
        assert sum(r.bits for r in comm.ledger) == agg.bits_per_step(named) == tbits.scheme_bits(name, named, **options)


# -- deterministic contraction bounds -------------------------------------------------------------------------


@given(d=st.integers(1, 40), k_frac=st.floats(0.01, 1.0), seed=st.integers(0, 2 ** 16))
def test_topk_contraction_bound(d, k_frac, seed):
    k = max(1, min(d, round(k_frac * d)))
    x = torch.randn(2, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    reduced, _, _ = run_once(everything("topk", ratio=None, k=k), {"x": x})
    for i in range(2):
        assert operators.delta_of(x[i], reduced.local["x"][i]) >= operators.topk_delta(d, k) - 1e-12
        # the kept coordinates are the k largest magnitudes
        kept = reduced.local["x"][i] != 0
        if kept.sum() == k and k < d:
            assert x[i].abs()[kept].min() >= x[i].abs()[~kept].max()


@given(d=st.integers(1, 40), seed=st.integers(0, 2 ** 16), zeros=st.integers(0, 5))
def test_scaled_sign_contraction_equality(d, seed, zeros):
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[0, :min(zeros, d - 1)] = 0.0
    reduced, _, _ = run_once(everything("scaled_sign"), {"x": x})
    measured = operators.delta_of(x[0], reduced.local["x"][0])
    # 1-bit signs decode a zero as +1, so ||C(x)-x||^2 = ||x||^2 - ||x||_1^2/d holds with or without zeros.
    assert measured == pytest.approx(operators.scaled_sign_delta_of(x[0]), rel=1e-9, abs=1e-12)
    assert measured >= operators.scaled_sign_delta(d) - 1e-12


@pytest.mark.parametrize("name,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
@given(seed=st.integers(0, 2 ** 16), exponent=st.integers(-10, 10))
def test_cast_contraction_in_normal_range(name, dtype, seed, exponent):
    x = torch.randn(1, 30, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2.0 ** exponent
    x = x.sign() * x.abs().clamp(min=1e-3) if name == "fp16" else x  # keep fp16 in its normal range
    x = x.float()
    reduced, _, _ = run_once(everything(name), {"x": x})
    assert operators.delta_of(x[0], reduced.local["x"][0]) >= operators.cast_delta(dtype)
    assert torch.equal(reduced.local["x"][0], x[0].to(dtype).float())


@given(n=st.integers(1, 7), m=st.integers(1, 7), rank=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_svd_error_is_the_tail_sum(n, m, rank, seed):
    x = torch.randn(2, n, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    reduced, _, _ = run_once(everything("svd", rank=rank), {"x": x})
    for i in range(2):
        error = float((reduced.local["x"][i] - x[i]).pow(2).sum())
        assert error == pytest.approx(operators.svd_error(torch.linalg.svdvals(x[i]), rank), rel=1e-9, abs=1e-10)
        assert operators.delta_of(x[i], reduced.local["x"][i]) >= operators.svd_delta(n, m, rank) - 1e-12
    torch.testing.assert_close(reduced.update["x"], reduced.local["x"].mean(0))


@pytest.mark.parametrize("name", ZOO)
def test_declared_theory_class(name):
    """Every compressor declares a class; contractive/unbiased ones carry their constant from theory."""
    shapes = {"a": (6, 5), "b": (4, 3, 2)}
    claim = everything(name).theory(shapes)
    assert claim.kind in ("exact", "unbiased", "contractive", "biased")
    if claim.kind == "contractive":
        assert 0 < claim.delta <= 1
    if claim.kind == "unbiased":
        assert claim.omega >= 0 and not claim.deterministic
    if claim.kind == "biased":
        with pytest.raises(ValueError, match="delta"):
            operators.contraction(claim.kind, claim.delta, claim.omega, owner=name)
    unbiased = everything(name, **UNBIASED_OPTIONS.get(name, {})).theory(shapes)
    expected = {"randomk": "unbiased", "random_block": "unbiased", "qsgd": "unbiased", "terngrad": "unbiased",
                "natural": "unbiased", "lowrank_sketch": "unbiased", "atomo": "unbiased", "sign": "biased",
                "signum": "biased"}.get(name, "contractive")
    assert unbiased.kind == expected


# -- unbiasedness, exactly ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qsgd", "terngrad", "natural"])
@given(seed=st.integers(0, 2 ** 16), d=st.integers(1, 12), levels=st.integers(1, 9))
def test_quantizer_expectation_is_exact(name, seed, d, levels):
    """Both outcomes of every coordinate with their probabilities: sum p_o C_o(x) = x, and the variance is
    the theory's exact per-input variance (<= omega ||x||^2)."""
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    kernel = {"qsgd": compressors.quantize.QSGD(levels), "terngrad": compressors.quantize.TernGrad(),
              "natural": compressors.quantize.Natural()}[name]
    torch.testing.assert_close(kernel.expectation(x), x, rtol=1e-12, atol=1e-15)
    low, p, aux = kernel.outcomes(x)
    assert ((p >= 0) & (p <= 1)).all()
    lo, hi = kernel.magnitude(low, aux), kernel.magnitude(low + 1, aux)
    variance = float(((1 - p) * (lo - x.abs()) ** 2 + p * (hi - x.abs()) ** 2).sum())
    exact = {"qsgd": lambda: operators.qsgd_variance_of(x, levels), "terngrad": lambda: operators.terngrad_variance_of(x),
             "natural": lambda: operators.natural_variance_of(x)}[name]()
    assert variance == pytest.approx(exact, rel=1e-9, abs=1e-15)
    omega = {"qsgd": operators.qsgd_omega(d, levels), "terngrad": operators.terngrad_omega(d),
             "natural": operators.natural_omega()}[name]
    assert variance <= omega * float(x.pow(2).sum()) * (1 + 1e-9) + 1e-15


@pytest.mark.parametrize("levels", [1, 2, 3, 7, 8, 127, 128])
def test_qsgd_packs_few_levels_and_decodes_what_the_int_codes_decode(levels):
    """s <= 7 sends s + level in packed 2- or 4-bit fields: the ledger, bits_per_step and theory.bits agree, and
    the aggregate equals the same draw sent as plain int codes (same seed, so the same samples)."""
    grads = random_grads([(12, 10), (4, 3, 3), (10,)], 3, 1, dtype=torch.float64)
    named = {n: tuple(g.shape[1:]) for n, g in grads.items()}
    packed = everything("qsgd", levels=levels, seed=5)
    reduced, _, comm = run_once(packed, grads)
    assert sum(r.bits for r in comm.ledger) == packed.bits_per_step(named, dtype=torch.float64) == tbits.scheme_bits(
        "qsgd", named, value_bits=64, levels=levels, min_compression_rate=0.0, compress_vectors=True)
    d = sum(math.prod(s) for s in named.values())
    code_bits = (sum(r.bits for r in comm.ledger) - 64 * len(named)) / d  # minus one float64 norm per tensor
    assert code_bits <= {1: 2.2, 2: 4.4, 3: 4.4, 7: 4.4}.get(levels, 64)
    plain = everything("qsgd", levels=levels, seed=5)
    plain.compressed.packed_bits = None  # the same kernel sending int codes
    expected, _, plain_comm = run_once(plain, grads)
    for n in grads:
        assert torch.equal(reduced.update[n], expected.update[n]) and torch.equal(reduced.local[n], expected.local[n])
    assert (levels <= 7) == (sum(r.bits for r in comm.ledger) < sum(r.bits for r in plain_comm.ledger))


@pytest.mark.parametrize("name", ["qsgd", "terngrad", "natural"])
def test_quantizer_samples_only_the_two_outcomes(name):
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    agg = everything(name)
    kernel = {"qsgd": compressors.quantize.QSGD(4), "terngrad": compressors.quantize.TernGrad(),
              "natural": compressors.quantize.Natural()}[name]
    low, p, aux = kernel.outcomes(x)
    lo, hi = x.sign() * kernel.magnitude(low, aux), x.sign() * kernel.magnitude(low + 1, aux)
    reduced, _, _ = run_once(agg, {"x": x})
    c = reduced.local["x"]
    assert (torch.isclose(c, lo, rtol=1e-12, atol=0) | torch.isclose(c, hi, rtol=1e-12, atol=0)).all()
    assert torch.isclose(c, lo)[p == 0].all() and torch.isclose(c, hi)[p == 1].all()


@pytest.mark.parametrize("name", ["randomk", "random_block"])
@pytest.mark.parametrize("d,k", [(5, 2), (6, 3), (4, 1)])
def test_sparsifier_unbiased_over_every_outcome(name, d, k):
    """Every k-subset (random-k) or every start (random-block), equally likely: the scaled decoder's mean is x,
    and the unscaled error's mean is (1 - k/d)||x||^2."""
    x = torch.randn(2, d, generator=torch.Generator().manual_seed(d * 10 + k), dtype=torch.float64)
    if name == "randomk":
        outcomes = [torch.tensor(c) for c in itertools.combinations(range(d), k)]
    else:
        outcomes = [(s + torch.arange(k)) % d for s in range(d)]
    total, error = torch.zeros(d, dtype=torch.float64), 0.0
    for chosen in outcomes:
        for scaled in (True, False):
            agg = everything(name, scaled=scaled, ratio=None, k=k)
            kernel = agg.compressed  # Partition(kernel): no error feedback, no warm-up
            kernel.indices = lambda d_, k_, g, device="cpu", chosen=chosen: chosen  # this outcome, real decoder
            reduced, _, _ = run_once(agg, {"x": x})
            if scaled:
                total += reduced.update["x"]
            else:
                error += float((reduced.local["x"] - x).pow(2).sum())
    torch.testing.assert_close(total / len(outcomes), x.mean(0), rtol=1e-12, atol=1e-12)
    assert error / len(outcomes) == pytest.approx((1 - k / d) * float(x.pow(2).sum()), rel=1e-12)


@given(seed=st.integers(0, 2 ** 16), n=st.integers(2, 6), m=st.integers(2, 6), budget=st.integers(1, 5))
def test_atomo_unbiased_over_every_outcome(seed, n, m, budget):
    """Systematic sampling is piecewise constant in u: enumerate the pieces (weight = length), rebuild the
    estimator from the selected triplets, check E = M, marginals = p and the variance formula."""
    matrix = torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    budget = min(budget, n, m)
    u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    p = operators.atomo_probabilities(sigma, budget)
    cuts = sorted({0.0, 1.0, *[float(c) % 1.0 for c in p.cumsum(0)]})
    mean, second = torch.zeros_like(matrix), 0.0
    marginal = torch.zeros_like(p)
    for lo, hi in zip(cuts, cuts[1:]):
        if hi - lo <= 0:
            continue
        index = systematic_sample(p.unsqueeze(0), torch.tensor([(lo + hi) / 2]), budget)[0]
        assert len(set(index.tolist())) == budget
        estimate = (u[:, index] * (sigma[index] / p[index])) @ vh[index]
        mean += (hi - lo) * estimate
        second += (hi - lo) * float((estimate - matrix).pow(2).sum())
        marginal[index] += hi - lo
    torch.testing.assert_close(marginal, p, rtol=0, atol=1e-9)
    torch.testing.assert_close(mean, matrix, rtol=1e-9, atol=1e-9)
    assert second == pytest.approx(operators.atomo_variance(sigma, p), rel=1e-6, abs=1e-9)
    assert second <= operators.atomo_omega(n, m, budget) * float(matrix.pow(2).sum()) * (1 + 1e-9) + 1e-9


# -- unbiasedness and variance, statistically (derandomized) --------------------------------------------------


MARKOV = 200.0  # a fresh seed would fail with probability <= 1/200 per check; fixed seeds never do


@pytest.mark.parametrize("name", RANDOM)
def test_sampler_mean_and_variance_markov(name):
    """N steps of fresh randomness on the same x: ||mean - x||^2 has expectation <= omega ||x||^2 / N and the
    average squared error has expectation <= omega ||x||^2 (Markov on both)."""
    x = torch.randn(1, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    agg = everything(name, **UNBIASED_OPTIONS.get(name, {}))
    claim = agg.theory({"x": (6, 5)})
    assert claim.kind == "unbiased"
    norm2 = float(x.pow(2).sum())
    state, total, squared, steps = None, torch.zeros(6, 5, dtype=torch.float64), 0.0, 400
    for _ in range(steps):
        reduced, state, _ = run_once(agg, {"x": x}, seed=3, state=state)
        total += reduced.update["x"]
        squared += float((reduced.update["x"] - x[0]).pow(2).sum())
    assert float((total / steps - x[0]).pow(2).sum()) <= MARKOV * claim.omega * norm2 / steps
    assert squared / steps <= MARKOV ** 0.5 * claim.omega * norm2  # a tighter constant: it is an average
    assert squared / steps > 0  # the sampler is really random


def test_sketch_second_moment_matches_theory_statistically():
    """E||C(M) - M||^2 = (m+1)/r ||M||^2 exactly; the empirical mean over 2000 sketches is within 10%."""
    x = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    agg = everything("lowrank_sketch", rank=2)
    state, errors = None, []
    for _ in range(2000):
        reduced, state, _ = run_once(agg, {"x": x}, seed=4, state=state, want_local=False)
        errors.append(float((reduced.update["x"] - x[0]).pow(2).sum()))
    expected = operators.sketch_omega(6, 2) * float(x.pow(2).sum())
    assert sum(errors) / len(errors) == pytest.approx(expected, rel=0.1)


# -- majority vote, signum -------------------------------------------------------------------------------------


def test_sign_majority_vote_and_abstention():
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5], [2.0, 1.0, -1.0, -0.5], [-1.0, -1.0, -1.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    reduced, _, _ = run_once(everything("sign"), {"x": x})
    torch.testing.assert_close(reduced.update["x"], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    torch.testing.assert_close(reduced.local["x"][3], torch.zeros(4))  # a zero worker abstains


def test_signum_votes_with_its_momentum():
    agg = everything("signum", momentum=0.5)
    g1 = torch.tensor([[4.0, -4.0]])
    g2 = torch.tensor([[-1.0, 1.0]])
    first, state, _ = run_once(agg, {"x": g1})
    second, _, _ = run_once(agg, {"x": g2}, state=state)
    # m2 = 0.5 * (0.5 * g1) + 0.5 * g2 = (0.5, -0.5): the old direction still wins
    torch.testing.assert_close(second.update["x"], torch.tensor([1.0, -1.0]))


# -- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,options,field", [
    ("topk", {"ratio": 0.0}, "ratio"), ("topk", {"ratio": 1.5}, "ratio"), ("randomk", {"ratio": -0.1}, "ratio"),
    ("random_block", {"k": 0}, "k"), ("topk", {"ratio": 0.1, "k": 2}, "ratio"), ("qsgd", {"levels": 0}, "levels"),
    ("svd", {"rank": 0}, "rank"), ("atomo", {"rank": 0}, "rank"), ("lowrank_sketch", {"rank": -1}, "rank"),
    ("signum", {"momentum": 1.0}, "momentum"), ("fp16", {"error_feedback": "bogus"}, "error_feedback"),
    ("sign", {"min_compression_rate": -1.0}, "min_compression_rate"), ("qsgd", {"seed": -1}, "seed"),
    ("randomk", {"scaled": 1}, "scaled"), ("terngrad", {"compress_vectors": "yes"}, "compress_vectors"),
    ("natural", {"levels": 3}, "levels"),
])
def test_bad_options_name_the_field(name, options, field):
    with pytest.raises(ValueError, match=field):
        compressors.make(name, **options)


@pytest.mark.parametrize("name", ["topk", "randomk", "random_block"])
def test_k_larger_than_a_tensor_names_k(name):
    agg = compressors.make(name, k=50)
    with pytest.raises(ValueError, match="k=50"):
        agg.init({"w": (6, 5)}, workers=2)
    with pytest.raises(ValueError, match="k=50"):
        agg.bits_per_step({"w": (6, 5)})


# -- in a training loop -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("mode", compressors.ERROR_FEEDBACK_MODES)
def test_least_squares_loop_with_every_error_feedback(name, mode):
    """4 workers, one least-squares problem each: 15 SGD steps on the aggregated update lower the loss by 30%.

    Theory says error feedback needs a contraction: around an unbiased operator with omega >= 1 the residual
    grows like omega^t (E||x - C(x)||^2 = omega ||x||^2), so there the loop only has to run and stay finite
    for a few steps (rescale by 1/(1+omega), ``theory.operators.delta_from_omega``, to use EF with them)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 16, 8, generator=g, dtype=torch.float64)  # (W, samples, n)
    target = torch.randn(8, 6, generator=g, dtype=torch.float64)
    b = a @ target  # (W, samples, m)
    w = torch.zeros(8, 6, dtype=torch.float64)
    loss = lambda w: float(((a @ w - b) ** 2).mean())  # noqa: E731
    agg = compressors.make(name, error_feedback=mode, **SMALL.get(name, {}))
    claim = agg.theory({"w": (8, 6)})
    diverging = mode != "none" and claim.kind == "unbiased" and claim.omega >= 1
    state = agg.init({"w": (8, 6)}, workers=4, seed=0, dtype=torch.float64)
    comm = VirtualCollective(4)
    start = loss(w)
    lr = 0.05 if name in ("sign", "signum") else 0.03
    for _ in range(5 if diverging else 15):
        grads = {"w": 2 * a.transpose(1, 2) @ (a @ w - b) / a.shape[1]}  # (W, 8, 6)
        update, state = agg.aggregate(grads, state, comm)
        assert torch.isfinite(update["w"]).all()
        w = w - lr * update["w"]
    if not diverging:
        assert loss(w) < 0.7 * start


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("mode", ["none", "local"])
def test_runs_in_the_simulator(name, mode):
    import sim

    result = sim.run(sim.Experiment(task="digits-mlp", workers=4, steps=3, eval_every=0,
                                    compressor={"name": name, "error_feedback": mode, **SMALL.get(name, {})}))
    history = result.history
    assert len(history) == 3 and history["train_loss"].map(math.isfinite).all()
    assert (history["bits"] > 0).all()
