"""Low-rank approximation: Eckart-Young, PowerSGD's projection identities, subspace-iteration convergence.

Symbols follow the PowerSGD paper (Vogels, Karimireddy, Jaggi, NeurIPS 2019): M is an n x m matrix (a
gradient in its matrix view shape[0] x prod(shape[1:])), r the rank, sigma_1 >= sigma_2 >= ... its singular
values, P^ an n x r matrix with orthonormal columns, t the number of power iterations.

All functions are pure: tensors in, tensors or floats out, nothing mutated.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _as_sorted_values(singular_values: torch.Tensor | Sequence[float]) -> torch.Tensor:
    s = torch.as_tensor(singular_values, dtype=torch.float64).flatten().abs()
    return torch.sort(s, descending=True).values


def eckart_young_error(singular_values: torch.Tensor | Sequence[float], r: int) -> float:
    """Squared Frobenius error of the best rank-r approximation: min_{rank X <= r} ||M - X||_F^2 = sum_{i>r} sigma_i^2.

    Assumptions: none beyond M real; ``singular_values`` may come in any order (they are sorted). r >= 0;
    r >= len(singular_values) gives 0.
    Source: Eckart & Young (1936); Mirsky (1960) for every unitarily invariant norm.
    """
    if r < 0:
        raise ValueError(f"eckart_young_error: r={r!r} is invalid; allowed: an integer >= 0")
    s = _as_sorted_values(singular_values)
    return float(s[r:].pow(2).sum())


def relative_eckart_young_error(singular_values: torch.Tensor | Sequence[float], r: int) -> float:
    """sum_{i>r} sigma_i^2 / sum_i sigma_i^2, the smallest relative squared error any rank-r compressor can reach
    (0 for a zero matrix). For a contractive operator this is 1 - delta of the best rank-r projection on M."""
    s = _as_sorted_values(singular_values)
    total = float(s.pow(2).sum())
    return 0.0 if total == 0.0 else eckart_young_error(s, r) / total


def best_rank_r(matrix: torch.Tensor, r: int) -> torch.Tensor:
    """U_r diag(sigma_1..r) V_r^T from a full SVD: a minimizer of ||M - X||_F over rank X <= r (Eckart-Young).

    Works on a batch (..., n, m); computed in float64 and returned in the input's dtype.
    """
    if r < 0:
        raise ValueError(f"best_rank_r: r={r!r} is invalid; allowed: an integer >= 0")
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)  # (..., n, k), (..., k), (..., k, m)
    r = min(r, s.shape[-1])
    approx = (u[..., :, :r] * s[..., None, :r]) @ vh[..., :r, :]  # (..., n, m)
    return approx.to(matrix.dtype)


# -- PowerSGD's projection -----------------------------------------------------------------------------------

def powersgd_update(p_hat: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The update PowerSGD applies: P^ Q^T with Q = M^T P^, i.e. the orthogonal projection P^ P^^T M.

    Assumption: P^ (n x r) has orthonormal columns (after QR / Gram-Schmidt of a full-rank P). Then the
    update is the best approximation of M with column space span(P^), and has rank <= r.
    Source: Vogels et al. 2019, Algorithm 1 (the mean M is linear, so P^ P^^T mean_i M_i = mean_i P^ P^^T M_i).
    """
    return p_hat @ (p_hat.transpose(-1, -2) @ m)


def projection_residual(p_hat: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(I - P^ P^^T) M: what a PowerSGD step leaves to error feedback."""
    return m - powersgd_update(p_hat, m)


def projection_inner_product(p_hat: torch.Tensor, m: torch.Tensor) -> float:
    """<update, residual>_F = trace((P^P^^T M)^T (I - P^P^^T) M) = 0 when P^^T P^ = I (P^P^^T is idempotent
    and symmetric). Returns the computed value, to be compared with 0 in units of ||M||_F^2."""
    update = powersgd_update(p_hat, m)
    return float((update.double() * (m.double() - update.double())).sum())


def pythagoras_gap(m: torch.Tensor, update: torch.Tensor) -> float:
    """||M||_F^2 - ||update||_F^2 - ||M - update||_F^2; 0 for any orthogonal projection of M
    (||M||^2 = ||P^P^^T M||^2 + ||(I - P^P^^T) M||^2). Returns the computed value, to compare with 0."""
    m64, u64 = m.double(), update.double()
    return float(m64.pow(2).sum() - u64.pow(2).sum() - (m64 - u64).pow(2).sum())


def projection_error(p_hat: torch.Tensor, m: torch.Tensor) -> float:
    """||M - P^P^^T M||_F^2 = ||M||_F^2 - ||P^^T M||_F^2 = sum_i sigma_i^2 ||(I - P^P^^T) u_i||^2 >= sum_{i>r} sigma_i^2."""
    return float(projection_residual(p_hat.double(), m.double()).pow(2).sum())


# -- subspace (power) iteration --------------------------------------------------------------------------------

def largest_principal_angle_tan(basis: torch.Tensor, subspace: torch.Tensor) -> float:
    """tan(theta_max) between span(basis) and span(subspace) (both n x r, full column rank).

    cos(theta_max) is the smallest singular value of orth(subspace)^T orth(basis) (Bjorck & Golub 1973);
    returns inf when the spaces contain orthogonal directions (cos = 0). Measured through the cosine, so its
    resolution near 0 is about sqrt(machine epsilon) (~1e-8 in float64).
    """
    a = torch.linalg.qr(basis.double()).Q
    b = torch.linalg.qr(subspace.double()).Q
    cos = float(torch.linalg.svdvals(b.transpose(-1, -2) @ a).min().clamp(max=1.0))
    if cos <= 0.0:
        return math.inf
    return math.sqrt(max(0.0, 1.0 - cos * cos)) / cos


def subspace_iteration_tan(ratio: float, tan0: float, t: int) -> float:
    """tan(theta_max(span P^_t, U_r)) <= (sigma_{r+1}/sigma_r)^(2t - 1) tan(theta_max(span Q_0, V_r)).

    PowerSGD's paper variant on a FIXED matrix M, with warm start (t counts power iterations across steps:
    steps x num_iters_per_step): P^_t spans M (M^T M)^(t-1) Q_0, i.e. 2t - 1 multiplications by M or M^T,
    each shrinking the tangent of every principal angle by sigma_{r+1}/sigma_r (write Q_0 = V_r C_1 + V_perp C_2,
    then M Q_0 = U_r Sigma_r C_1 + U_perp Sigma_perp C_2 and tan = ||Sigma_perp C_2 C_1^-1 Sigma_r^-1||).
    Assumptions: M fixed (no error feedback, no new gradient), gap sigma_r > sigma_{r+1}, sigma_r > 0,
    V_r^T Q_0 invertible (tan0 finite), no breakdown of the orthogonalization (M Q full rank).
    Source: Golub & Van Loan, Matrix Computations, 4th ed., Thm 8.2.2 (orthogonal iteration);
    Halko, Martinsson & Tropp, SIAM Review 2011, Sec. 4.5 and Thm 9.2 (power scheme).
    """
    if t < 1:
        raise ValueError(f"subspace_iteration_tan: t={t!r} is invalid; allowed: an integer >= 1")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"subspace_iteration_tan: ratio={ratio!r} is invalid; allowed: sigma_(r+1)/sigma_r in [0, 1]")
    if math.isinf(tan0):
        return math.inf
    return ratio ** (2 * t - 1) * tan0


def subspace_iteration_excess_error(singular_values: torch.Tensor | Sequence[float], r: int, tan0: float,
                                   t: int) -> float:
    """Bound on ||M - P^_t P^_t^T M||_F^2 - sum_{i>r} sigma_i^2 after t warm-started power iterations.

        excess <= sum_{i<=r} sigma_i^2 ||(I - P^P^^T) u_i||^2 <= sigma_1^2 r sin^2(theta_t) <= sigma_1^2 r tan^2(theta_t),
        tan(theta_t) <= (sigma_{r+1}/sigma_r)^(2t - 1) tan0,

    so the excess error decays like (sigma_{r+1}/sigma_r)^(4t - 2): geometric, faster with a larger gap.
    (The first inequality drops the non-positive term -sum_{i>r} sigma_i^2 ||P^^T u_i||^2 of
    ||(I - P P^T) M||_F^2 = sum_i sigma_i^2 ||(I - P P^T) u_i||^2.)
    Assumptions: those of ``subspace_iteration_tan``; r < number of singular values (otherwise the error is 0).
    Source: as ``subspace_iteration_tan`` (Golub & Van Loan Thm 8.2.2; Halko, Martinsson, Tropp 2011).
    """
    s = _as_sorted_values(singular_values)
    if r >= s.numel():
        return 0.0
    if r < 1:
        raise ValueError(f"subspace_iteration_excess_error: r={r!r} is invalid; allowed: an integer >= 1")
    sigma_r, sigma_next = float(s[r - 1]), float(s[r])
    if sigma_r <= sigma_next or sigma_r == 0.0:
        raise ValueError("subspace_iteration_excess_error: singular_values need a gap sigma_r > sigma_(r+1); "
                         f"got sigma_r={sigma_r}, sigma_(r+1)={sigma_next}")
    tan_t = subspace_iteration_tan(sigma_next / sigma_r, tan0, t)
    sin2 = min(1.0, tan_t * tan_t / (1.0 + tan_t * tan_t)) if math.isfinite(tan_t) else 1.0
    return float(s[0]) ** 2 * r * sin2


# -- expected contraction of a cold-started power step -------------------------------------------------------

def range_finder_delta(n: int, m: int, r: int) -> float:
    """E||M - P^P^^T M||_F^2 <= (1 - r/min(n, m)) ||M||_F^2 for P^ = orth(M (M^T M)^(t-1) Omega), Omega (m x r)
    a fresh Gaussian matrix, any t >= 1 (PowerSGD "paper", cold start); equality for a flat spectrum.

    Proof: M = U S V^T of rank k > r, G = V^T Omega Gaussian; span P^ = U span(S^(2t-1) G), so the captured
    energy is sum_i s_i^2 L_i with L_i the leverage score of row i of S^(2t-1) G (sum_i L_i = r). By
    Sherman-Morrison L_i grows with its row's scale and shrinks when another row grows, so swapping the
    exchangeable rows i, j of G gives E L_i >= E L_j whenever s_i >= s_j; Chebyshev's sum inequality then
    gives sum_i s_i^2 E L_i >= (r/k) ||M||^2 >= (r/min(n, m)) ||M||^2 (k <= r: exact). Derived here; Halko,
    Martinsson, Tropp 2011 (Thm 10.5) bound this range finder only with oversampling (p >= 2 extra columns).
    Assumptions: Omega drawn independently of M; exact orthonormalization (QR); exact arithmetic.
    """
    if min(n, m, r) < 1:
        raise ValueError(f"range_finder_delta: n, m, r = {n}, {m}, {r} are invalid; allowed: integers >= 1")
    return min(1.0, r / min(n, m))


def random_subspace_delta(dim: int, r: int) -> float:
    """E||M B B^T||_F^2 = (r/dim) ||M||_F^2 for B (dim x r) an orthonormal basis of a uniformly random
    r-dimensional subspace independent of M (E[B B^T] = (r/dim) I by rotation invariance): the delta of one
    cold-started "alternating" PowerSGD iteration, dim = m (Q in) or n (P in)."""
    if min(dim, r) < 1:
        raise ValueError(f"random_subspace_delta: dim, r = {dim}, {r} are invalid; allowed: integers >= 1")
    return min(1.0, r / dim)
