"""Error feedback: conservation, the memory bound, and the EF-SGD / EF21 rates.

Symbols: gamma the step size (1 when the memory is kept in gradient units, as ``compressors.ErrorFeedback``
does: the learning rate is applied after aggregation), delta in (0, 1] the contraction of C
(||C(x) - x||^2 <= (1 - delta) ||x||^2), G a bound on the gradient norm, L the smoothness constant,
sigma^2 a bound on the gradient's second moment E||g||^2, T the number of steps, Delta = f(x_0) - f*.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch


def _check_delta(owner: str, delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0.0 < delta <= 1.0):
        raise ValueError(f"{owner}: delta={delta!r} is invalid; allowed: a number in (0, 1]")


def conservation_gap(updates: Iterable[torch.Tensor], mean_memory: torch.Tensor,
                     mean_grads: Iterable[torch.Tensor]) -> torch.Tensor:
    """sum_t update_t + mean_i e_i^T - sum_t mean_i g_i^t, which error feedback keeps at exactly 0.

    Derivation ("local": e_i' = x_i - C_i(x_i), update = mean_i C_i(x_i); "averaged": e_i' = x_i - update):
    with x_i = g_i + e_i, in both cases mean_i e_i' = mean_i g_i + mean_i e_i - update, so telescoping from
    e^0 = 0 gives sum_t update_t + mean_i e_i^T = sum_t mean_i g_i^t: nothing is lost, only delayed.
    Assumptions: the update equals mean_i C_i(x_i) (linear decoding, true of all-reduce compressors) for
    "local"; none for "averaged". Source: Seide et al. 2014; Stich, Cordonnier, Jaggi 2018 (Sec. 2, "memory").
    Returns the gap (same shape as the tensors), computed in float64.
    """
    total = mean_memory.double().clone()
    for u in updates:
        total = total + u.double()
    for g in mean_grads:
        total = total - g.double()
    return total


def memory_bound(delta: float, gamma: float, G: float) -> float:
    """||e_t||^2 <= 4 (1 - delta) gamma^2 G^2 / delta^2 for every t, for one worker's error-feedback memory.

    Recursion e_{t+1} = x_t - C(x_t), x_t = gamma g_t + e_t, e_0 = 0. Proof: ||e_{t+1}||^2 <= (1 - delta)
    ||e_t + gamma g_t||^2 <= (1 - delta)(1 + eta) ||e_t||^2 + (1 - delta)(1 + 1/eta) gamma^2 G^2; with
    eta = delta / (2 (1 - delta)) the first factor is 1 - delta/2 and (1 + 1/eta) <= 2/delta; summing the
    geometric series gives the bound.
    Assumptions: C is delta-contractive on every input (deterministically, or in expectation for a bound on
    E||e||^2), ||g_t|| <= G (or E||g_t||^2 <= G^2). ``memory_bound_premise`` says whether a compressor's
    declared class meets this for an error-feedback mode and number of workers (warm-started PowerSGD does
    not). It does not cover "averaged" memory (residual against other workers' messages) beyond the workers'
    mean, nor EF21 (whose memory is a gradient estimate).
    Source: Stich, Cordonnier, Jaggi, NeurIPS 2018, Lemma 3.2 (top-k); Karimireddy, Rebjock, Stich, Jaggi,
    ICML 2019, Lemma 3 (any delta-compressor).
    """
    _check_delta("memory_bound", delta)
    return 4.0 * (1.0 - delta) * gamma ** 2 * G ** 2 / delta ** 2


def ef_sgd_rate(delta: float, L: float, sigma2: float, f_gap: float, T: int, gamma: float | None = None) -> float:
    """Bound on (1/(T+1)) sum_t E||grad f(x_t)||^2 for EF-SGD on an L-smooth, possibly non-convex f.

        avg E||grad f||^2 <= 2 Delta / (gamma (T+1)) + L gamma sigma^2 + 4 L^2 gamma^2 sigma^2 (1 - delta) / delta^2,

    from the virtual iterate x~_t = x_t - e_t (x~_{t+1} = x~_t - gamma g_t): L-smoothness gives
    E f(x~_{t+1}) <= E f(x~_t) - gamma/2 E||grad f(x_t)||^2 + L gamma^2 sigma^2 / 2 + gamma L^2 / 2 E||e_t||^2,
    then ``memory_bound`` with G^2 = sigma^2. With gamma = 1/sqrt(T+1) (the default here) this is
    (2 Delta + L sigma^2)/sqrt(T+1) + 4 L^2 sigma^2 (1 - delta)/(delta^2 (T+1)): the compression only enters
    the O(1/T) term, so for large T EF-SGD matches SGD ("compression for free").
    Assumptions: f L-smooth and bounded below, unbiased stochastic gradients with E||g||^2 <= sigma^2,
    C delta-contractive, single worker (or "local" memory with the same bound per worker), constant gamma.
    Source: Karimireddy, Rebjock, Stich, Jaggi, ICML 2019, Thm II (their constants on the sigma^2 / sqrt(T)
    term may be tighter than this derivation's); Stich & Karimireddy, JMLR 2020 ("The error-feedback
    framework"), for the sharper delayed-gradient analysis.
    """
    _check_delta("ef_sgd_rate", delta)
    if not (isinstance(T, int) and T >= 0):
        raise ValueError(f"ef_sgd_rate: T={T!r} is invalid; allowed: an integer >= 0")
    if gamma is None:
        gamma = 1.0 / math.sqrt(T + 1)
    if gamma <= 0:
        raise ValueError(f"ef_sgd_rate: gamma={gamma!r} is invalid; allowed: a number > 0")
    return (2.0 * f_gap / (gamma * (T + 1)) + L * gamma * sigma2
            + 4.0 * L ** 2 * gamma ** 2 * sigma2 * (1.0 - delta) / delta ** 2)


def ef21_constants(delta: float) -> tuple[float, float]:
    """(theta, beta) of EF21 for a delta-contractive compressor (their alpha is our delta):
    theta = 1 - sqrt(1 - delta), beta = (1 - delta) / (1 - sqrt(1 - delta)).
    Source: Richtarik, Sokolov, Fatkhullin, NeurIPS 2021, Lemma 2 / Thm 1."""
    _check_delta("ef21_constants", delta)
    root = math.sqrt(1.0 - delta)
    return 1.0 - root, (1.0 - delta) / (1.0 - root)


def ef21_max_stepsize(delta: float, L: float, L_tilde: float) -> float:
    """gamma <= 1 / (L + L~ sqrt(beta / theta)), L~ = sqrt(mean_i L_i^2) (Richtarik et al. 2021, Thm 1)."""
    theta, beta = ef21_constants(delta)
    return 1.0 / (L + L_tilde * math.sqrt(beta / theta))


def ef21_rate(delta: float, L: float, L_tilde: float, f_gap: float, g0: float, T: int,
              gamma: float | None = None) -> float:
    """Bound on E||grad f(x^_T)||^2, x^_T drawn uniformly from the iterates x_0..x_{T-1}, for EF21:

        E||grad f(x^_T)||^2 <= 2 Delta / (gamma T) + G^0 / (theta T),   G^0 = mean_i ||g_i^0 - grad f_i(x_0)||^2,

    an O(1/T) rate, as gradient descent, with no bounded-gradient assumption.
    Assumptions: full local gradients (deterministic), f_i L_i-smooth, f L-smooth and bounded below,
    C delta-contractive, gamma <= ``ef21_max_stepsize`` (the default gamma is that maximum). The algorithm
    keeps g = mean_i g_i exactly (the invariant the tests check).
    Source: Richtarik, Sokolov, Fatkhullin, "EF21: A new, simpler, theoretically better, and practically
    faster error feedback", NeurIPS 2021, Thm 1.
    """
    if not (isinstance(T, int) and T >= 1):
        raise ValueError(f"ef21_rate: T={T!r} is invalid; allowed: an integer >= 1")
    limit = ef21_max_stepsize(delta, L, L_tilde)
    gamma = limit if gamma is None else gamma
    if not 0.0 < gamma <= limit * (1.0 + 1e-12):
        raise ValueError(f"ef21_rate: gamma={gamma!r} is invalid; allowed: a number in (0, {limit}]")
    theta, _ = ef21_constants(delta)
    return 2.0 * f_gap / (gamma * T) + g0 / (theta * T)


class BoundPremise(NamedTuple):
    """Whether a compressor's declared class supports ``memory_bound`` under an error-feedback mode.

    holds: the premise of ``memory_bound`` is met; delta: the contraction to put in it (None when not);
    in_expectation: the bound is then on E||e||^2, not on ||e||^2 itself; scope: whose memory it bounds
    ("each worker" or "the workers' mean", mean_i e_i); reason: why, in words.
    """

    holds: bool
    delta: float | None
    in_expectation: bool
    scope: str
    reason: str


def memory_bound_premise(claim, mode: str = "local", workers: int = 1) -> BoundPremise:
    """Does ``memory_bound(delta, ...)`` apply to a compressor with this ``TheoryClaim`` and error-feedback mode?

    ``claim`` is what ``agg.theory(shapes)`` returns (any object with ``kind``, ``delta``, ``omega``,
    ``deterministic``, ``per_worker``; the error-feedback wrapper already turns "local_scaled" around an
    unbiased C into its contraction 1/(1 + omega)). The premise of ``memory_bound`` is the recursion
    e' = x - C(x) with C delta-contractive on every x it meets (Stich et al. 2018; Karimireddy et al. 2019):

    - "local" / "local_scaled" (each worker's e_i' = x_i - C_i(x_i)): needs kind "exact" (delta 1),
      "contractive" (delta), or "unbiased" with omega < 1 (E||C(x) - x||^2 <= omega ||x||^2 is a contraction
      in expectation with delta = 1 - omega). With one worker, or when the claim holds per worker, it bounds
      each worker's memory; when it holds only on the mean (``per_worker`` False: PowerSGD's projection is
      chosen from mean_i x_i) and workers > 1, it bounds only mean_i e_i, whose recursion is
      mean e' = mean x - C(mean x) (the update is C applied to the mean, and the mean of the residuals is
      linear): each worker's own memory is then bounded by nothing (a nonexpansive step: ||e_i'|| <= ||x_i||).
    - "averaged" (e_i' = x_i - update): with one worker it is "local"; with several only mean_i e_i follows
      the recursion, and only for a claim on the mean (update = C(mean x)) or an exact one.
    - "none" (no memory) and "ef21" (the memory is a gradient estimate, bounded by ``ef21_rate``'s analysis
      instead): not covered.
    - kinds "nonexpansive" (delta = 0: warm-started PowerSGD) and "biased" (plain sign): never covered.
    A claim "in expectation" (``deterministic`` False) gives a bound on E||e||^2, for inputs that do not
    depend on the step's own random draw (fresh randomness every step).
    """
    if not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"memory_bound_premise: workers={workers!r} is invalid; allowed: an integer >= 1")
    modes = ("none", "local", "local_scaled", "averaged", "ef21")
    if mode not in modes:
        raise ValueError(f"memory_bound_premise: mode={mode!r} is invalid; allowed: {', '.join(modes)}")
    expectation = not getattr(claim, "deterministic", True)
    if mode in ("none", "ef21"):
        why = "no memory" if mode == "none" else "EF21's memory is a gradient estimate, not a residual"
        return BoundPremise(False, None, expectation, "", why)
    if claim.kind == "exact":
        delta = 1.0
    elif claim.kind == "contractive" and claim.delta is not None and claim.delta > 0:
        delta = float(claim.delta)
    elif claim.kind == "unbiased" and claim.omega is not None and claim.omega < 1:
        delta = 1.0 - float(claim.omega)
    else:
        return BoundPremise(False, None, expectation, "",
                            f"a {claim.kind!r} operator has no contraction (delta > 0) for every input")
    per_worker = getattr(claim, "per_worker", True)
    if workers == 1 or (mode != "averaged" and per_worker):
        how = " in expectation" if expectation else ""
        return BoundPremise(True, delta, expectation, "each worker",
                            f"each worker's residual x_i - C_i(x_i) contracts{how}")
    if not per_worker or claim.kind == "exact":
        return BoundPremise(True, delta, expectation, "the workers' mean",
                            "the update is C(mean_i x_i), so mean_i e_i = mean x - C(mean x) contracts; "
                            "each worker's own memory is not bounded by the theory")
    return BoundPremise(False, None, expectation, "",
                        "averaged memory with several workers: update = mean_i C(x_i) is not C(mean_i x_i)")
