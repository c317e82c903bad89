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
    if method == "qr":
        result = torch.linalg.qr(work, mode="reduced").Q
    elif method == "gram_schmidt":
        result = gram_schmidt(work, epsilon)
    else:
        raise ValueError(f"orthogonalize: orthogonalization={method!r} is invalid; allowed: {ORTHOGONALIZATIONS}")
    return result.to(x.dtype)


def gram_schmidt(x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Modified Gram-Schmidt over the last axis, every leading index independent. Returns a new tensor."""
    columns: list[torch.Tensor] = []
    for i in range(x.shape[-1]):
        col = x[..., i]  # (..., n)
        for done in columns:
            col = col - (done * col).sum(-1, keepdim=True) * done
        col = col / (torch.linalg.vector_norm(col, dim=-1, keepdim=True) + epsilon)
        columns.append(col)
    return torch.stack(columns, dim=-1)
