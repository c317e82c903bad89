"""Operator classes of compressors: contraction delta and variance omega, with converters.

Definitions (Stich, Cordonnier, Jaggi 2018; Beznosikov, Horvath, Richtarik, Safaryan 2020, "On biased
compression for distributed learning", Section 2):

- C is **unbiased with variance omega** if E C(x) = x and E ||C(x) - x||^2 <= omega ||x||^2 for all x.
- C is **delta-contractive** (0 < delta <= 1) if E ||C(x) - x||^2 <= (1 - delta) ||x||^2 for all x; it is
  *deterministically* contractive when the bound holds without the expectation.
- The per-input contraction is delta(x) = 1 - ||C(x) - x||^2 / ||x||^2.
- C is **nonexpansive** if ||C(x) - x|| <= ||x|| for all x (delta = 0): a projection onto a subspace that
  does not depend on x at random (warm-started PowerSGD) is one, and no positive delta holds for it.

When a bound holds (``compressors.TheoryClaim`` records it): "for all x" means every finite x whose squared
norm stays inside the working dtype's range, in exact arithmetic up to rounding, unless the claim narrows
the magnitudes (casts: the 16-bit normal range; natural compression: float32's). A bound "in expectation"
is over the randomness drawn in that step, for an x that does not depend on that draw (inputs built from
earlier steps, as error feedback's, are fine; an adversary who knows the seed is not). A claim may hold for
each worker's own message C(x_i), or only for the update as a function of the workers' mean (PowerSGD).
docs/theory_claims.md lists every registered compressor's claim and its premise.

Converter: if C is unbiased with omega, C / (1 + omega) is delta-contractive with delta = 1 / (1 + omega)
(Beznosikov et al. 2020, Lemma 1): E||C/(1+w) - x||^2 = E||C||^2/(1+w)^2 - 2||x||^2/(1+w) + ||x||^2 and
E||C||^2 <= (1+w) ||x||^2.

Several tensors: a compressor applied tensor by tensor is contractive with the smallest delta and unbiased
with the largest omega of its tensors (sum the per-tensor bounds); tensors sent exactly have delta 1, omega 0.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

# -- converters and per-input measures ---------------------------------------------------------------------


def delta_from_omega(omega: float) -> float:
    """delta = 1 / (1 + omega): the contraction of the rescaled unbiased operator C / (1 + omega)."""
    if omega < 0:
        raise ValueError(f"delta_from_omega: omega={omega!r} is invalid; allowed: a number >= 0")
    return 1.0 / (1.0 + omega)


def delta_of(x: torch.Tensor, cx: torch.Tensor) -> float:
    """The per-input contraction delta(x) = 1 - ||C(x) - x||^2 / ||x||^2 (1 for x = 0 = C(0)), in float64."""
    x64, c64 = x.double(), cx.double()
    norm2 = float(x64.pow(2).sum())
    error2 = float((c64 - x64).pow(2).sum())
    if norm2 == 0.0:
        return 1.0 if error2 == 0.0 else -math.inf
    return 1.0 - error2 / norm2


def combine_delta(deltas: Iterable[float]) -> float:
    """delta of a compressor applied tensor by tensor: the smallest per-tensor delta (1 with no tensor)."""
    return min(deltas, default=1.0)


def combine_omega(omegas: Iterable[float]) -> float:
    """omega of a compressor applied tensor by tensor: the largest per-tensor omega (0 with no tensor)."""
    return max(omegas, default=0.0)


def contraction(kind: str, delta: float | None = None, omega: float | None = None, owner: str = "compressor") -> float:
    """The delta an error-feedback analysis may use: delta for "exact"/"contractive", 1/(1+omega) for
    "unbiased" (after rescaling by 1/(1+omega)); a "biased" operator (plain sign) has none: ValueError."""
    if kind == "exact":
        return 1.0
    if kind == "contractive" and delta is not None:
        return delta
    if kind == "unbiased" and omega is not None:
        return delta_from_omega(omega)
    raise ValueError(f"{owner}: delta is undefined for a {kind!r} operator; allowed: an exact, contractive "
                     "or unbiased compressor")


# -- casts ---------------------------------------------------------------------------------------------------

_UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24,
                  torch.float64: 2.0 ** -53}


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p for a p-bit significand (Higham, Accuracy and Stability, 2.1): fl(x) = x (1 + e), |e| <= u."""
    if dtype not in _UNIT_ROUNDOFF:
        raise ValueError(f"unit_roundoff: dtype={dtype!r} is invalid; allowed: {', '.join(map(str, _UNIT_ROUNDOFF))}")
    return _UNIT_ROUNDOFF[dtype]


def cast_delta(dtype: torch.dtype) -> float:
    """Round-to-nearest cast: ||fl(x) - x||^2 <= u^2 ||x||^2, so delta = 1 - u^2 (deterministic).

    Assumption: every coordinate lies in the normal range of ``dtype`` or is zero (fp16: 6.1e-5 <= |x| <=
    65504; bf16 has float32's range). Subnormals lose relative accuracy; overflow gives inf.
    """
    return 1.0 - unit_roundoff(dtype) ** 2


# -- sparsifiers ---------------------------------------------------------------------------------------------


def topk_delta(d: int, k: int) -> float:
    """Top-k keeps the k largest magnitudes: ||x - top_k(x)||^2 <= (1 - k/d) ||x||^2, deterministically
    (the d - k dropped squares are at most the average square). Stich, Cordonnier, Jaggi 2018, Lemma A.1."""
    return min(1.0, k / d)


def randomk_delta(d: int, k: int) -> float:
    """Unscaled random-k (uniform k-subset): E||x - rand_k(x)||^2 = (1 - k/d) ||x||^2 (each coordinate kept
    with probability k/d). Contractive in expectation only. Stich et al. 2018."""
    return min(1.0, k / d)


def randomk_omega(d: int, k: int) -> float:
    """Scaled random-k, (d/k) rand_k(x): unbiased, E||C(x) - x||^2 = (d/k - 1) ||x||^2 exactly."""
    return d / k - 1.0


def random_block_delta(d: int, k: int) -> float:
    """A cyclic block of k coordinates at a uniform start: each coordinate is kept with probability k/d, so
    the same expectation as random-k (but the kept coordinates are correlated)."""
    return randomk_delta(d, k)


def random_block_omega(d: int, k: int) -> float:
    """Scaled cyclic block (d/k) block_k(x): unbiased with omega = d/k - 1 (same marginals as random-k)."""
    return randomk_omega(d, k)


# -- signs ---------------------------------------------------------------------------------------------------


def scaled_sign_delta(d: int) -> float:
    """C(x) = ||x||_1/d sign(x) (EF-signSGD, Karimireddy et al. 2019, Lemma 8): with sign(x_j) in {-1, +1},
    ||C(x) - x||^2 = ||x||^2 - ||x||_1^2 / d exactly, so delta(x) = ||x||_1^2 / (d ||x||^2) >= 1/d."""
    return 1.0 / d


def scaled_sign_delta_of(x: torch.Tensor) -> float:
    """The per-input contraction of the scaled sign: ||x||_1^2 / (d ||x||_2^2) (1 for x = 0)."""
    x64 = x.double().flatten()
    norm2 = float(x64.pow(2).sum())
    return 1.0 if norm2 == 0 else float(x64.abs().sum()) ** 2 / (x64.numel() * norm2)


# -- stochastic quantizers -----------------------------------------------------------------------------------


def qsgd_omega(d: int, levels: int) -> float:
    """QSGD with s levels: Q(x)_j = ||x|| sign(x_j) xi_j / s, xi_j in {l, l+1} rounding s|x_j|/||x|| at random.
    Unbiased with omega = min(d/s^2, sqrt(d)/s). Alistarh et al. 2017, Lemma 3.1."""
    return min(d / levels ** 2, math.sqrt(d) / levels)


def qsgd_variance_of(x: torch.Tensor, levels: int) -> float:
    """Exact E||Q(x) - x||^2 = ||x||^2/s^2 sum_j q_j (1 - q_j), q_j the fractional part of s|x_j|/||x||."""
    x64 = x.double().flatten()
    norm = float(x64.norm())
    if norm == 0:
        return 0.0
    scaled = levels * x64.abs() / norm
    q = scaled - scaled.floor()
    return norm ** 2 / levels ** 2 * float((q * (1 - q)).sum())


def terngrad_omega(d: int) -> float:
    """TernGrad (Wen et al. 2017): C(x)_j = s sign(x_j) b_j, s = ||x||_inf, b_j ~ Bernoulli(|x_j|/s). Unbiased,
    E||C(x) - x||^2 = s ||x||_1 - ||x||^2. Maximising s||x||_1/||x||^2 (attained at x = (1, t, ..., t),
    t = 1/(sqrt d + 1)) gives (sqrt d + 1)/2, so omega = (sqrt(d) - 1)/2, tight (derived here)."""
    return (math.sqrt(d) - 1.0) / 2.0


def terngrad_variance_of(x: torch.Tensor) -> float:
    """Exact E||C(x) - x||^2 = ||x||_inf ||x||_1 - ||x||_2^2 for TernGrad."""
    x64 = x.double().flatten()
    if x64.numel() == 0:
        return 0.0
    return float(x64.abs().max() * x64.abs().sum() - x64.pow(2).sum())


def natural_omega() -> float:
    """Natural compression (Horvath et al. 2019, Theorem 1): round |x_j| in [2^a, 2^(a+1)] to 2^(a+1) with
    probability |x_j|/2^a - 1. Unbiased; the variance (|x|-2^a)(2^(a+1)-|x|) is at most x^2/8 (at |x| = 4/3 2^a),
    so omega = 1/8. Assumption: |x_j| in float32's normal range (below it, 0 is the lower neighbour)."""
    return 1.0 / 8.0


def natural_variance_of(x: torch.Tensor) -> float:
    """Exact E||C_nat(x) - x||^2 = sum_j (|x_j| - 2^a_j)(2^(a_j+1) - |x_j|), 2^a_j <= |x_j| < 2^(a_j+1)."""
    a = x.double().abs().flatten()
    a = a[a > 0]
    low = torch.exp2(torch.floor(torch.log2(a)))
    return float(((a - low) * (2 * low - a)).sum())


# -- low rank ------------------------------------------------------------------------------------------------


def svd_delta(n: int, m: int, rank: int) -> float:
    """Best rank-r (Eckart-Young): ||M - M_r||^2 = sum_{i>r} sigma_i^2 <= (1 - r/min(n, m)) ||M||^2 (the
    dropped squares are the smallest), deterministically."""
    return min(1.0, rank / min(n, m))


def svd_error(singular_values: torch.Tensor, rank: int) -> float:
    """Eckart-Young-Mirsky: the squared Frobenius error of the best rank-r approximation, sum_{i>r} sigma_i^2."""
    s = singular_values.double().flatten().sort(descending=True).values
    return float(s[rank:].pow(2).sum())


def sketch_omega(m: int, rank: int) -> float:
    """Gaussian sketch C(M) = M Omega Omega^T / r, Omega (m x r) with i.i.d. N(0, 1) entries, shared by workers.
    E[Omega Omega^T] = r I makes it unbiased; E[(Omega Omega^T)^2] = r(m + r + 1) I (Wishart second moment)
    gives E||C(M) - M||^2 = (m + 1)/r ||M||^2 exactly, for every M: omega = (m + 1)/r."""
    return (m + 1.0) / rank


def atomo_probabilities(singular_values: torch.Tensor, budget: int) -> torch.Tensor:
    """ATOMO's variance-optimal inclusion probabilities (Wang et al. 2018, Algorithm 2), along the last axis.

    Minimise sum_j sigma_j^2 / p_j subject to sum_j p_j = s, 0 <= p_j <= 1: with sigma sorted decreasingly,
    the k largest saturate at p = 1 and the rest get p_j = c_k sigma_j, c_k = (s - k) / sum_{j >= k} sigma_j,
    for the smallest k with c_k sigma_k <= 1 (k = s - 1 always qualifies). When only zeros remain after k,
    they share the leftover budget evenly (they contribute nothing). Requires 1 <= s <= count; sum p = s.
    """
    sigma = singular_values.double()
    count = sigma.shape[-1]
    if not 1 <= budget <= count:
        raise ValueError(f"atomo_probabilities: budget={budget!r} is invalid; allowed: an integer in [1, {count}]")
    ordered, order = sigma.sort(dim=-1, descending=True)  # (..., count)
    tail = ordered.flip(-1).cumsum(-1).flip(-1)[..., :budget]  # tail[k] = sum_{j >= k} sigma_(j), k < s
    k = torch.arange(budget, dtype=torch.float64, device=sigma.device)
    scale = (budget - k) / tail.clamp_min(torch.finfo(torch.float64).tiny)  # c_k
    fits = (tail == 0) | (scale * ordered[..., :budget] <= 1)  # (..., s); true at k = s - 1 at the latest
    first = fits.to(torch.int8).argmax(-1, keepdim=True)  # (..., 1): the smallest qualifying k
    c = scale.gather(-1, first)
    empty = tail.gather(-1, first) == 0
    share = (budget - first).double() / (count - first).double()
    rest = torch.where(empty, share.expand_as(ordered), (c * ordered).clamp(max=1.0))
    index = torch.arange(count, device=sigma.device)
    p_sorted = torch.where(index < first, torch.ones_like(ordered), rest)
    return torch.empty_like(p_sorted).scatter_(-1, order, p_sorted)


def atomo_variance(singular_values: torch.Tensor, probabilities: torch.Tensor) -> float:
    """E||C(M) - M||^2 = sum_j sigma_j^2 (1/p_j - 1) for independent or systematic sampling of the triplets
    (the rank-one terms u_j v_j^T are Frobenius-orthonormal, so cross terms vanish)."""
    s, p = singular_values.double(), probabilities.double()
    terms = s.pow(2) * (1 / p - 1)
    return float(torch.where(s == 0, torch.zeros_like(terms), terms).sum())  # p = 0 only where sigma = 0


def atomo_omega(n: int, m: int, budget: int) -> float:
    """Spectral ATOMO with budget s: the uniform p_j = s/min(n, m) is feasible, so the optimal variance is at
    most (min(n, m)/s - 1) ||M||^2: omega = min(n, m)/s - 1 (0 when s >= min(n, m): every triplet is sent)."""
    return max(0.0, min(n, m) / budget - 1.0)
