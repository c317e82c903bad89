"""Batched orthogonalization of PowerSGD factors: each matrix of the batch on its own.

Trap avoided: a rank-1 "normalize" must divide each matrix by its own norm, never by the batch's.
Half-precision inputs are orthogonalized in float32 (LAPACK has no fp16/bf16 QR) and cast back.
"""
from __future__ import annotations

import torch

ORTHOGONALIZATIONS = ("qr", "gram_schmidt")


def orthogonalize(x: torch.Tensor, method: str = "qr", epsilon: float = 1e-8) -> torch.Tensor:
    """(..., n, r) -> (..., n, r) with orthonormal columns spanning the same space (where x has full rank).

    Zero or rank-deficient matrices never produce NaN: QR (Householder) returns unit columns for null
    directions; Gram-Schmidt divides by (norm + epsilon), leaving zero columns zero.
    """
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    work = scale_down(work)
    if method == "qr":
        result = torch.linalg.qr(work, mode="reduced").Q
    elif method == "gram_schmidt":
        result = gram_schmidt(work, epsilon)
    else:
        raise ValueError(f"orthogonalize: orthogonalization={method!r} is invalid; allowed: {ORTHOGONALIZATIONS}")
    return result.to(x.dtype)


def scale_down(x: torch.Tensor) -> torch.Tensor:
    """Each matrix whose largest |entry| is >= 1 divided by a power of two into [0.5, 1); the others untouched.

    Why: the column space is scale-invariant, but squared norms of huge entries (|x| ~ 1e19 in float32)
    overflow to inf, and inf / inf is NaN. A power of two is exact, so no rounding is added.
    """
    if x.numel() == 0:
        return x
    exponent = torch.frexp(x.abs().amax(dim=(-2, -1), keepdim=True)).exponent  # amax = m 2^e, m in [0.5, 1)
    return torch.ldexp(x, -exponent.clamp(min=0))


def gram_schmidt(x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Modified Gram-Schmidt over the last axis, every leading index independent. Returns a new tensor."""
    columns: list[torch.Tensor] = []
    for i in range(x.shape[-1]):
        col = x[..., i]  # (..., n)
        # Two passes ("twice is enough", Giraud et al. 2005): when P is rank-deficient (a gradient of rank < r)
        # one pass leaves a residual of rounding noise plus an epsilon-bias component along earlier columns,
        # which normalization would blow up into a non-orthogonal column (update != P^ P^^T M).
        for _ in range(2):
            for done in columns:
                col = col - (done * col).sum(-1, keepdim=True) * done
        col = col / (torch.linalg.vector_norm(col, dim=-1, keepdim=True) + epsilon)
        columns.append(col)
    return torch.stack(columns, dim=-1)
