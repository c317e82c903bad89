"""Every registered compressor's declared ``TheoryClaim`` against adversarial inputs and input sequences.

Registry-driven: each name in ``compressors.REGISTRY`` is built as the bare operator (no error feedback,
everything compressed), once with its defaults and once per option listed in ``OPTION_VARIANTS`` that it
accepts, plus its "local_scaled" error-feedback wrapper; a new compressor is covered without editing this
file. Inputs are hostile on purpose: one-hot and sparse vectors, one huge entry, all-equal entries, rank-1,
flat spectra (every singular value equal: the worst case of the low-rank bounds), axis-aligned sequences
that leave a warm-started subspace stuck, near-zero and huge scales (clamped into the claim's
``magnitudes`` range where it declares one).

- Deterministic claims ("exact", deterministic "contractive", "nonexpansive") must hold on every input and
  at every step of a sequence, up to float64 rounding (``RTOL``).
- Claims "in expectation" are checked by Monte Carlo over ``DRAWS`` independent draws (fresh ``init``
  seeds, each a fresh first step): the sample mean of ||C(x) - x||^2 / ||x||^2 may exceed the declared
  bound by at most ``Z`` standard errors (one-sided; under the normal approximation a true claim fails a
  fresh seed with probability below 3e-7; the seeds are fixed, so runs are reproducible). Unbiasedness:
  ||sample mean - x||^2 <= ``MARKOV`` omega ||x||^2 / N (Markov: false alarm <= 1/1000), and exactly, from
  both outcomes of every coordinate, for kernels that expose ``expectation`` (the stochastic quantizers).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import compressors
import theory
from compressors.base import TheoryClaim
from compressors.comm import VirtualCollective

OPTION_VARIANTS = {"warm_start": [False], "variant": ["alternating"], "num_iters_per_step": [2],
                   "orthogonalization": ["gram_schmidt"], "scaled": [True],
                   # the policies: exact warm-up steps first; tensors below the rate all-reduced exactly
                   "start_compressing_after_num_steps": [2], "min_compression_rate": [2.0]}
# PowerSGD's cold start in combination with its other options (each changes which bound is provable).
COMBINATIONS = [{"warm_start": False, "variant": "alternating"},
                {"warm_start": False, "variant": "alternating", "num_iters_per_step": 2},
                {"warm_start": False, "num_iters_per_step": 3},
                {"warm_start": False, "orthogonalization": "gram_schmidt"}]
DRAWS = 200
Z = 5.0
RTOL = 1e-9
SHAPES = [(8, 6), (6, 8), (8, 2), (2, 8)]
INPUTS = ["gaussian", "one_hot", "sparse", "one_huge", "all_equal", "rank1", "flat", "axis_flat", "two_level",
          "alternating_signs"]
SCALES = [1e-100, 1e-12, 1.0, 1e12, 1e100]


def base_options(name: str) -> dict:
    """The bare operator: no memory, every tensor compressed, small-tensor choices for required options."""
    accepted = compressors.options_of(name)
    options = {"error_feedback": "none"}
    for option, value in (("min_compression_rate", 0.0), ("compress_vectors", True)):
        if option in accepted:
            options[option] = value
    if "ratio" in accepted and accepted["ratio"] is None and accepted.get("k") is None:
        options["ratio"] = 0.3
    for option, value in (("rank", 2), ("levels", 4)):
        if option in accepted:
            options[option] = value
    return options


def configurations() -> list[tuple[str, dict]]:
    out = []
    for name in sorted(compressors.REGISTRY):
        base = base_options(name)
        accepted = compressors.options_of(name)
        out.append((name, base))
        out += [(name, {**base, option: value}) for option, values in OPTION_VARIANTS.items() if option in accepted
                for value in values if accepted[option] != value]
        if all(option in accepted for combination in COMBINATIONS for option in combination):
            out += [(name, {**base, **combination}) for combination in COMBINATIONS]
        out.append((name, {**base, "error_feedback": "local_scaled"}))
    return out


CONFIGS = configurations()
IDS = [f"{name}-" + ",".join(f"{k}={v}" for k, v in options.items()
                             if k not in ("error_feedback", "min_compression_rate", "compress_vectors")
                             or (k == "error_feedback" and v != "none")) for name, options in CONFIGS]


def adversarial(kind: str, n: int, m: int, seed: int) -> torch.Tensor:
    """One hostile (n, m) float64 input of the named kind."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, m, dtype=torch.float64)
    k = min(n, m)
    if kind == "gaussian":
        x = torch.randn(n, m, generator=g, dtype=torch.float64)
    elif kind == "one_hot":
        x.view(-1)[int(torch.randint(n * m, (1,), generator=g))] = 1.0
    elif kind == "sparse":
        x.view(-1)[torch.randperm(n * m, generator=g)[:3]] = torch.randn(3, generator=g, dtype=torch.float64)
    elif kind == "one_huge":
        x = torch.randn(n, m, generator=g, dtype=torch.float64)
        x.view(-1)[int(torch.randint(n * m, (1,), generator=g))] = 1e8
    elif kind == "all_equal":
        x.fill_(0.37)
    elif kind == "rank1":
        x = torch.outer(torch.randn(n, generator=g, dtype=torch.float64),
                        torch.randn(m, generator=g, dtype=torch.float64))
    elif kind == "flat":  # every singular value equal: the case where r/min(n, m) is tight
        big = torch.linalg.qr(torch.randn(max(n, m), k, generator=g, dtype=torch.float64)).Q  # (max, k)
        x = big if n >= m else big.T
    elif kind == "axis_flat":  # flat and axis-aligned: products stay exactly sparse
        x[torch.arange(k), torch.arange(k)] = 1.0
    elif kind == "two_level":
        u, _, vh = torch.linalg.svd(torch.randn(n, m, generator=g, dtype=torch.float64), full_matrices=False)
        s = torch.where(torch.arange(k) < max(1, k // 2), 1.0, 1e-3).double()
        x = (u * s) @ vh
    elif kind == "alternating_signs":
        x = (-1.0) ** torch.arange(n * m, dtype=torch.float64).reshape(n, m)
    else:
        raise ValueError(kind)
    return x


def within_magnitudes(x: torch.Tensor, claim: TheoryClaim) -> torch.Tensor:
    """Clamp every nonzero |x_j| into the claim's range: inputs at the very edges of its premise."""
    if claim.magnitudes is None:
        return x
    low, high = claim.magnitudes
    return torch.where(x == 0, x, x.sign() * x.abs().clamp(low, high))


def build(name, options):
    return compressors.make(name, **options)


def one_step(agg, x, seed=0, state=None, workers=None):
    """One aggregation of x (W, n, m) -> (update (n, m), local (W, n, m), state)."""
    workers = x.shape[0]
    if state is None:
        state = agg.init({"x": tuple(x.shape[1:])}, workers, seed=seed, dtype=x.dtype)
    reduced, state = agg.reduce({"x": x}, state, VirtualCollective(workers), want_local=True)
    return reduced.update["x"], reduced.local["x"], state


def ratio(cx: torch.Tensor, x: torch.Tensor) -> float:
    """||C(x) - x||^2 / ||x||^2, scale-free (computed on x / max|x| so huge and tiny inputs do not over/underflow)."""
    s = x.abs().max()
    return float(((cx - x) / s).pow(2).sum() / (x / s).pow(2).sum())


def check_deterministic(claim: TheoryClaim, x: torch.Tensor, update: torch.Tensor, local: torch.Tensor, where: str,
                        rtol: float = RTOL):
    """The claim on this input: on each worker's message when per_worker, else on the update vs the mean."""
    pairs = [(local[i], x[i]) for i in range(x.shape[0])] if claim.per_worker else [(update, x.mean(0))]
    for cx, xi in pairs:
        if float(xi.abs().max()) == 0:
            assert float(cx.abs().max()) == 0, f"{where}: C(0) != 0"
            continue
        assert torch.isfinite(cx).all(), f"{where}: non-finite output"
        r = ratio(cx, xi)
        if claim.kind == "exact":
            assert r <= rtol, f"{where}: claims exact, relative squared error {r}"
        elif claim.kind == "contractive":
            assert r <= (1 - claim.delta) + rtol, f"{where}: ||C(x)-x||^2/||x||^2 = {r} > 1 - delta = {1 - claim.delta}"
        elif claim.kind == "nonexpansive":
            assert r <= 1 + rtol, f"{where}: claims nonexpansive, ratio {r}"


DETERMINISTIC = ("exact", "nonexpansive")


def is_deterministic(claim: TheoryClaim) -> bool:
    return claim.kind in DETERMINISTIC and claim.deterministic or claim.kind == "contractive" and claim.deterministic


def deterministic_configs(with_error_feedback: bool = True):
    """Configurations whose claim is deterministic on at least one of SHAPES."""
    return [pytest.param(name, options, id=ident) for (name, options), ident in zip(CONFIGS, IDS)
            if (with_error_feedback or options["error_feedback"] == "none")
            and any(is_deterministic(build(name, options).theory({"x": s})) for s in SHAPES)]


# -- the claims are well formed --------------------------------------------------------------------------------


@pytest.mark.parametrize("name,options", CONFIGS, ids=IDS)
def test_claim_is_well_formed(name, options):
    claim = build(name, options).theory({"x": (8, 6), "v": (6,)})
    assert claim.kind in ("exact", "unbiased", "contractive", "nonexpansive", "biased")
    if claim.kind == "contractive":
        assert claim.delta is not None and 0 < claim.delta <= 1
    if claim.kind == "unbiased":
        assert claim.omega is not None and math.isfinite(claim.omega) and claim.omega >= 0
    if claim.kind == "nonexpansive":
        assert claim.delta is None and claim.deterministic
    if claim.magnitudes is not None:
        assert 0 < claim.magnitudes[0] < claim.magnitudes[1]


# -- deterministic claims: every adversarial input, every step -----------------------------------------------


@pytest.mark.parametrize("name,options", deterministic_configs())
@settings(suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(INPUTS), shape=st.sampled_from(SHAPES), scale=st.sampled_from(SCALES),
       seed=st.integers(0, 2 ** 16), workers=st.sampled_from([1, 3]), single=st.booleans())
def test_deterministic_claim_on_adversarial_inputs(name, options, kind, shape, scale, seed, workers, single):
    """float64 at scales 1e-100..1e100, or float32 at 1e-15..1e15 (squares stay in its normal range), where the
    rounding tolerance is float32's."""
    agg = build(name, options)
    claim = agg.theory({"x": shape})
    if not is_deterministic(claim):
        return  # in expectation on this shape: the Monte Carlo tests check it
    x = torch.stack([adversarial(kind, *shape, seed + i) for i in range(workers)])  # (W, n, m)
    x = x * (min(max(scale, 1e-15), 1e15) if single else scale)
    x = within_magnitudes(x, claim)
    if single:
        x = x.float()
        assume(within_magnitudes(x.double(), claim).equal(x.double()))  # float32 rounding may leave the range
    update, local, _ = one_step(agg, x, seed=seed)
    check_deterministic(claim, x.double(), update.double(), local.double(),
                        f"{name} {options} on {kind} x {scale:g}, W={workers}, {x.dtype}",
                        rtol=1e-5 if single else RTOL)


def adversarial_sequence(n: int, m: int) -> list[torch.Tensor]:
    """A warm start's worst case: M1 on directions (e0, f0), (e1, f1); M2 mostly on the next ones with a
    trace of M1 (the subspace kept from M1 is invariant under M2: power iterations never leave it); then a
    rank-1 input (a rank-deficient factor for the next step) and a dense one."""
    k = min(n, m)

    def unit(i):
        e = torch.zeros(n, m, dtype=torch.float64)
        e[i % n, i % m] = 1.0
        return e

    half = max(1, k // 2)
    m1 = sum(unit(i) for i in range(half))
    m2 = 10 * sum(unit(i) for i in range(half, k)) + 0.01 * m1 if k > half else 0.01 * m1
    dense = torch.randn(n, m, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return [m1, m2, unit(0), dense, m2]


@pytest.mark.parametrize("name,options", deterministic_configs(with_error_feedback=False))
@pytest.mark.parametrize("shape", SHAPES)
def test_deterministic_claim_along_adversarial_sequences(name, options, shape):
    agg = build(name, options)
    claim = agg.theory({"x": shape})
    if not is_deterministic(claim):
        pytest.skip(f"{claim.kind} in expectation: the Monte Carlo tests check it")
    state = None
    for t, x in enumerate(adversarial_sequence(*shape)):
        x = within_magnitudes(x, claim)[None]  # (1, n, m)
        update, local, state = one_step(agg, x, state=state)
        check_deterministic(claim, x, update, local, f"{name} {options}, step {t} of the adversarial sequence")


def test_the_warm_start_sequence_defeats_any_positive_delta():
    """The input that made the old claim (delta = r/min(n, m) with warm start) false: after one step on an exactly
    rank-2 M1 = U12 V12^T, M2 = 10 U34 V34^T + 0.01 M1 keeps ~1e-6 of its energy (64 x 64, rank 2)."""
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64)).Q
    m1 = u[:, :2] @ v[:, :2].T
    m2 = 10 * u[:, 2:4] @ v[:, 2:4].T + 0.01 * m1
    for options in ({}, {"variant": "alternating"}, {"orthogonalization": "gram_schmidt"}):
        agg = build("powersgd", {**base_options("powersgd"), **options})
        _, _, state = one_step(agg, m1[None])
        update, _, _ = one_step(agg, m2[None], state=state)
        kept = 1 - ratio(update, m2)
        assert kept < 1e-5, (options, kept)
        claim = agg.theory({"x": (64, 64)})
        assert claim.kind == "nonexpansive" and claim.delta is None, claim  # no delta > kept can be declared
        assert theory.error_feedback.memory_bound_premise(claim, "local", 1).holds is False


# -- claims in expectation: Monte Carlo ------------------------------------------------------------------------


def monte_carlo(agg, x: torch.Tensor, draws: int = DRAWS):
    """(ratios (draws,), outputs (draws, n, m)): first steps with init seeds 0..draws-1 (independent draws)."""
    ratios, outputs = [], []
    for seed in range(draws):
        update, _, _ = one_step(agg, x[None], seed=seed)
        ratios.append(ratio(update, x))
        outputs.append(update / x.abs().max())
    return torch.tensor(ratios, dtype=torch.float64), torch.stack(outputs)


def check_in_expectation(claim: TheoryClaim, x: torch.Tensor, ratios: torch.Tensor, outputs: torch.Tensor, where: str):
    se = float(ratios.std()) / math.sqrt(len(ratios))
    bound = {"contractive": lambda: 1 - claim.delta, "unbiased": lambda: claim.omega,
             "exact": lambda: 0.0}[claim.kind]()
    mean = float(ratios.mean())
    assert mean <= bound + Z * se + RTOL, f"{where}: mean ratio {mean} > bound {bound} + {Z} x {se}"
    if claim.kind == "unbiased":
        # E||mean_N - x||^2 = E||C(x) - x||^2 / N <= omega ||x||^2 / N for an unbiased C: Markov's inequality
        # with MARKOV = 1000 (distribution-free; a per-coordinate z-test breaks on rare outcomes never drawn).
        scaled = x / x.abs().max()
        bias2 = float((outputs.mean(dim=0) - scaled).pow(2).sum())
        limit = MARKOV * claim.omega * float(scaled.pow(2).sum()) / len(ratios)
        assert bias2 <= limit + 1e-18, f"{where}: ||mean C(x) - x||^2 = {bias2} > {limit}"


MARKOV = 1000.0


RANDOM_INPUTS = ["gaussian", "one_hot", "one_huge", "flat", "two_level", "all_equal"]


def random_configs():
    out = []
    for (name, options), ident in zip(CONFIGS, IDS):
        claim = build(name, options).theory({"x": (8, 6)})
        if not is_deterministic(claim) and claim.kind in ("contractive", "unbiased", "exact"):
            out.append(pytest.param(name, options, id=ident))
    return out


RANDOM_CONFIGS = random_configs()


def test_some_claims_are_in_expectation():
    assert len(RANDOM_CONFIGS) >= 8  # randomk, random_block, qsgd, terngrad, natural, sketch, atomo, powersgd cold


@pytest.mark.parametrize("name,options", RANDOM_CONFIGS)
@pytest.mark.parametrize("kind", RANDOM_INPUTS)
def test_claim_in_expectation_on_adversarial_inputs(name, options, kind):
    agg = build(name, options)
    shape = (8, 6)
    claim = agg.theory({"x": shape})
    x = within_magnitudes(adversarial(kind, *shape, seed=1), claim)
    ratios, outputs = monte_carlo(agg, x, DRAWS // 2)
    check_in_expectation(claim, x, ratios, outputs, f"{name} {options} on {kind}")


@pytest.mark.parametrize("name,options", [p for p in RANDOM_CONFIGS if p.values[1]["error_feedback"] == "none"])
@pytest.mark.parametrize("shape", [(8, 6), pytest.param((6, 8), marks=pytest.mark.slow)])
def test_claim_in_expectation_after_an_adversarial_prefix(name, options, shape):
    """Stateful compressors (warm-start factors, a shared generator carried across steps): the claim must hold
    for the step after the adversarial sequence's prefix too; each draw runs the prefix from its own seed."""
    agg = build(name, options)
    claim = agg.theory({"x": shape})
    prefix = [within_magnitudes(x, claim)[None] for x in adversarial_sequence(*shape)[:2]]  # (M1, M2)
    last = prefix[-1]  # M2: the subspace M1 leaves behind is invariant under it
    ratios, outputs = [], []
    for seed in range(DRAWS // 2):
        state = None
        for x in prefix[:-1]:
            _, _, state = one_step(agg, x, seed=seed, state=state)
        update, _, _ = one_step(agg, last, seed=seed, state=state)
        ratios.append(ratio(update, last[0]))
        outputs.append(update / last.abs().max())
    check_in_expectation(claim, last[0], torch.tensor(ratios, dtype=torch.float64), torch.stack(outputs),
                         f"{name} {options} after an adversarial prefix")


@pytest.mark.slow
@pytest.mark.parametrize("name,options", [p for p in RANDOM_CONFIGS if p.values[1]["error_feedback"] == "none"])
@pytest.mark.parametrize("kind", RANDOM_INPUTS)
@pytest.mark.parametrize("shape,scale", [((16, 12), 1e-100), ((3, 24), 1e100)])
def test_claim_in_expectation_bigger_and_scaled(name, options, kind, shape, scale):
    agg = build(name, options)
    claim = agg.theory({"x": shape})
    x = within_magnitudes(adversarial(kind, *shape, seed=2) * scale, claim)
    ratios, outputs = monte_carlo(agg, x, DRAWS)
    check_in_expectation(claim, x, ratios, outputs, f"{name} {options} on {kind} x {scale:g} {shape}")


def kernel_of(agg):
    """The innermost operator under the policy and error-feedback wrappers."""
    while hasattr(agg, "inner") or hasattr(agg, "compressed"):
        agg = getattr(agg, "inner", None) or agg.compressed
    return agg


def has_outcomes(kernel) -> bool:
    try:
        kernel.outcomes(torch.ones(1, 2, dtype=torch.float64))
    except (NotImplementedError, AttributeError):
        return False
    return True


ORACLE_CONFIGS = [p for p in RANDOM_CONFIGS if p.values[1]["error_feedback"] == "none"
                  and has_outcomes(kernel_of(build(*p.values)))]


def test_some_quantizers_have_an_exact_oracle():
    assert {p.values[0] for p in ORACLE_CONFIGS} >= {"qsgd", "terngrad", "natural"}


@pytest.mark.parametrize("name,options", ORACLE_CONFIGS)
@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("scale", SCALES)
def test_exact_expectation_on_adversarial_inputs(name, options, kind, scale):
    """Stochastic quantizers: sum over both outcomes of every coordinate = x exactly, and the exact variance is
    <= omega ||x||^2, on hostile inputs and scales (clamped into the claim's magnitudes)."""
    agg = build(name, options)
    kernel = kernel_of(agg)
    claim = agg.theory({"x": (8, 6)})
    x = within_magnitudes(adversarial(kind, 8, 6, seed=5) * scale, claim).reshape(1, -1)
    torch.testing.assert_close(kernel.expectation(x), x, rtol=1e-12, atol=0)
    low, p, aux = kernel.outcomes(x)
    lo, hi = kernel.magnitude(low, aux), kernel.magnitude(low + 1, aux)
    s = x.abs().max()
    variance = float((((1 - p) * ((lo - x.abs()) / s) ** 2 + p * ((hi - x.abs()) / s) ** 2)).sum())
    if claim.kind == "unbiased":
        assert variance <= claim.omega * float((x / s).pow(2).sum()) * (1 + 1e-9), (kind, scale)


def test_cold_start_powersgd_is_tight_on_a_flat_spectrum():
    """E||C(M) - M||^2 = (1 - r/min(n, m)) ||M||^2 exactly when every singular value is equal: the declared delta
    is the largest one that holds, and the Monte Carlo test above meets it with equality."""
    for shape, options in (((8, 6), {}), ((6, 8), {"num_iters_per_step": 2}), ((8, 6), {"variant": "alternating",
                                                                                          "num_iters_per_step": 2})):
        agg = build("powersgd", {**base_options("powersgd"), "warm_start": False, **options})
        claim = agg.theory({"x": shape})
        ratios, _ = monte_carlo(agg, adversarial("flat", *shape, seed=3), 20)
        assert claim.delta == pytest.approx(theory.lowrank.range_finder_delta(*shape, 2))
        torch.testing.assert_close(ratios, torch.full_like(ratios, 1 - claim.delta), rtol=0, atol=1e-9)


def test_alternating_one_iteration_delta_is_r_over_max():
    """One cold "alternating" iteration projects onto a random subspace of R^m or R^n: on a flat 6 x 12 matrix the
    even steps keep r/12, not r/6, so only delta = r/max(n, m) holds."""
    agg = build("powersgd", {**base_options("powersgd"), "warm_start": False, "variant": "alternating"})
    x = adversarial("flat", 6, 12, seed=4)
    ratios, _ = monte_carlo(agg, x, DRAWS)  # every draw is a first (even) step: Q in, a subspace of R^12
    assert abs(float(1 - ratios.mean()) - 2 / 12) <= Z * float(ratios.std()) / math.sqrt(DRAWS)
    assert agg.theory({"x": (6, 12)}).delta == pytest.approx(2 / 12)


# -- per worker or on the mean ---------------------------------------------------------------------------------


def test_powersgd_contracts_the_mean_not_each_worker():
    """Cold-started PowerSGD projects every worker's matrix onto one subspace chosen from the mean: a worker whose
    matrix is orthogonal to the mean's column space keeps nothing, so its claim is per_worker=False."""
    agg = build("powersgd", {**base_options("powersgd"), "warm_start": False, "rank": 1})
    a = torch.zeros(6, 5, dtype=torch.float64)
    a[0, 0] = 1.0
    b = torch.zeros(6, 5, dtype=torch.float64)
    b[1, 1] = 1.0
    x = torch.stack([a + b, b - a])  # mean = b: the subspace is e1, worker 0's a-part is lost
    update, local, _ = one_step(agg, x)
    claim = agg.theory({"x": (6, 5)})
    assert claim.kind == "contractive" and not claim.per_worker
    assert ratio(update, x.mean(0)) <= 1 - claim.delta
    assert ratio(local[0], x[0]) == pytest.approx(0.5)  # worker 0 keeps only its b-part
    premise = theory.error_feedback.memory_bound_premise(claim, "local", workers=4)
    assert premise.holds and premise.scope == "the workers' mean" and premise.in_expectation


# -- which claims support the error-feedback memory bound -------------------------------------------------------


@pytest.mark.parametrize("name,options,mode,workers,holds,scope", [
    ("powersgd", {}, "local", 4, False, ""),  # warm start: nonexpansive
    ("powersgd", {"warm_start": False}, "local", 1, True, "each worker"),
    ("powersgd", {"warm_start": False}, "averaged", 4, True, "the workers' mean"),
    ("topk", {"ratio": 0.1}, "local", 4, True, "each worker"),
    ("topk", {"ratio": 0.1}, "averaged", 4, False, ""),
    ("topk", {"ratio": 0.1}, "ef21", 1, False, ""),
    ("scaled_sign", {}, "local", 4, True, "each worker"),
    ("sign", {}, "local", 1, False, ""),
    ("qsgd", {"levels": 2}, "local", 1, False, ""),  # omega >= 1: no contraction
    ("qsgd", {"levels": 2}, "local_scaled", 1, True, "each worker"),
    ("qsgd", {"levels": 64}, "local", 1, True, "each worker"),  # omega = min(d/s^2, sqrt(d)/s) < 1
    ("identity", {}, "averaged", 4, True, "the workers' mean"),
])
def test_memory_bound_premise(name, options, mode, workers, holds, scope):
    agg = compressors.make(name, **{**options, "error_feedback": mode})
    claim = agg.theory({"w": (16, 12)})
    premise = theory.error_feedback.memory_bound_premise(claim, mode, workers)
    assert premise.holds is holds and premise.scope == scope, premise
    if holds:
        assert 0 < premise.delta <= 1
        theory.error_feedback.memory_bound(premise.delta, 1.0, 1.0)  # a valid delta for the bound


@pytest.mark.parametrize("bad", [{"mode": "bogus"}, {"workers": 0}])
def test_memory_bound_premise_rejects_bad_input(bad):
    claim = TheoryClaim(kind="exact", omega=0.0, delta=1.0)
    with pytest.raises(ValueError, match=next(iter(bad))):
        theory.error_feedback.memory_bound_premise(claim, **{"mode": "local", "workers": 1, **bad})


@pytest.mark.parametrize("name,options", [("topk", {"ratio": 0.2}), ("scaled_sign", {}), ("svd", {"rank": 1})])
def test_memory_stays_below_the_bound_along_an_adversarial_sequence(name, options):
    """Deterministic contractions with local error feedback, one worker: ||e_t||^2 <= memory_bound(delta, 1, G)
    at every step of a sequence alternating hostile inputs (G: the largest gradient norm so far)."""
    agg = compressors.make(name, **options, error_feedback="local")
    shape = (6, 8)
    claim = agg.theory({"x": shape})
    premise = theory.error_feedback.memory_bound_premise(claim, "local", 1)
    assert premise.holds and not premise.in_expectation
    state, largest = None, 0.0
    for t in range(30):
        kind = INPUTS[t % len(INPUTS)]
        g = adversarial(kind, *shape, seed=t)[None]
        largest = max(largest, float(g.norm()))
        _, _, state = one_step(agg, g, state=state)
        memory = next(s for s in compressors.iter_states(state) if isinstance(s, compressors.ErrorFeedbackState))
        e2 = float(memory.memory["x"].pow(2).sum())
        assert e2 <= theory.error_feedback.memory_bound(premise.delta, 1.0, largest) * (1 + 1e-9), (t, kind)


# -- the documented table --------------------------------------------------------------------------------------


@pytest.mark.parametrize("options,kind,delta,per_worker", [
    ({}, "nonexpansive", None, True),
    ({"variant": "alternating"}, "nonexpansive", None, True),
    ({"num_iters_per_step": 4}, "nonexpansive", None, True),
    ({"warm_start": False}, "contractive", 2 / 6, False),
    ({"warm_start": False, "num_iters_per_step": 2}, "contractive", 2 / 6, False),
    ({"warm_start": False, "variant": "alternating"}, "contractive", 2 / 8, True),
    ({"warm_start": False, "variant": "alternating", "num_iters_per_step": 2}, "contractive", 2 / 6, False),
    ({"warm_start": False, "orthogonalization": "gram_schmidt"}, "nonexpansive", None, True),
    ({"rank": 8, "shape": (6, 8)}, "exact", 1.0, True),  # rank >= n = 6: P^ square orthogonal, warm or cold
    ({"rank": 6, "warm_start": False}, "exact", 1.0, False),  # rank >= m = 6, cold: exact on the mean
    ({"rank": 6}, "nonexpansive", None, True),  # rank >= m but warm: a rank-deficient factor breaks it
    ({"rank": 6, "start_compressing_after_num_steps": 3}, "nonexpansive", None, True),
])
def test_powersgd_claims_as_documented(options, kind, delta, per_worker):
    """docs/theory_claims.md's PowerSGD rows, on one 8 x 6 matrix at rank 2 unless stated."""
    options = dict(options)
    shape = options.pop("shape", (8, 6))
    agg = compressors.make("powersgd", **{"rank": 2, "min_compression_rate": 0.0, **options})
    claim = agg.theory({"w": shape})
    assert (claim.kind, claim.per_worker) == (kind, per_worker), claim
    assert claim.delta == (None if delta is None else pytest.approx(delta)), claim


def test_every_registered_compressor_is_in_the_documented_table():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "theory_claims.md").read_text()
    missing = [name for name in compressors.REGISTRY if f"`{name}`" not in text]
    assert not missing, f"docs/theory_claims.md lacks {missing}"


@pytest.mark.parametrize("function,args", [(theory.lowrank.range_finder_delta, (0, 4, 2)),
                                           (theory.lowrank.range_finder_delta, (4, 4, 0)),
                                           (theory.lowrank.random_subspace_delta, (0, 1))])
def test_lowrank_deltas_reject_bad_sizes(function, args):
    with pytest.raises(ValueError, match="invalid"):
        function(*args)


@given(kind=st.sampled_from(INPUTS), seed=st.integers(0, 2 ** 16))
def test_cold_start_full_column_rank_is_exact_on_the_mean(kind, seed):
    """rank >= m < n, cold start: span P^ = range(mean M Omega) = range(mean M) for a Gaussian Omega, so the
    update is the mean exactly (almost surely) even on rank-deficient inputs; a worker's own message is not."""
    agg = build("powersgd", {**base_options("powersgd"), "rank": 6, "warm_start": False})
    claim = agg.theory({"x": (8, 6)})
    assert claim.kind == "exact" and not claim.per_worker and not claim.deterministic
    x = torch.stack([adversarial(kind, 8, 6, seed + i) for i in range(3)])  # (3, 8, 6)
    update, _, _ = one_step(agg, x, seed=seed)
    mean = x.mean(0)
    if float(mean.abs().max()) > 0:
        assert ratio(update, mean) <= RTOL


def ef_memory_after(options: dict, sequence: list[torch.Tensor], seed: int) -> float:
    """||e||^2 of one worker's local error-feedback memory after PowerSGD ran along ``sequence``."""
    agg = compressors.make("powersgd", **{"rank": 2, "min_compression_rate": 0.0, "error_feedback": "local",
                                          **options})
    state = None
    for g in sequence:
        _, _, state = one_step(agg, g[None], seed=seed, state=state)
    memory = next(s for s in compressors.iter_states(state) if isinstance(s, compressors.ErrorFeedbackState))
    return float(memory.memory["x"].pow(2).sum())


def test_memory_bound_where_its_premise_holds_and_not_where_it_does_not():
    """Along M1, then M2 ten times (6 x 6, rank 2, one worker, local error feedback): warm start keeps the
    subspace of M1, so the memory grows like 200 t^2 and passes memory_bound for the delta cold start has;
    cold start satisfies the premise (in expectation), and the mean of ||e||^2 over 40 seeds stays below
    the bound (one-sided, 5 standard errors)."""
    m1, m2 = adversarial_sequence(6, 6)[:2]
    sequence = [m1] + [m2] * 10
    largest = max(float(g.norm()) for g in sequence)
    cold = compressors.make("powersgd", rank=2, warm_start=False, min_compression_rate=0.0)
    cold = cold.theory({"x": (6, 6)})
    premise = theory.error_feedback.memory_bound_premise(cold, "local", workers=1)
    assert premise.holds and premise.in_expectation and premise.delta == pytest.approx(2 / 6)
    bound = theory.error_feedback.memory_bound(premise.delta, 1.0, largest)
    warm = ef_memory_after({}, sequence, seed=0)
    assert warm > 2 * bound  # no delta of the cold start's size holds with warm start
    draws = torch.tensor([ef_memory_after({"warm_start": False}, sequence, seed) for seed in range(40)])
    assert float(draws.mean()) <= bound + Z * float(draws.std()) / math.sqrt(len(draws))
