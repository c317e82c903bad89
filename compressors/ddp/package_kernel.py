"""The alternating PowerSGD kernel exactly as the authors' ``powersgd`` package runs it (epfml/powersgd, since
its July 2022 change), for ``compressors.PowerSGD``.

What makes it the package's, step by step (``powersgd/powersgd.py``, ``BasicPowerSGD``):

- Initial factors: one generator on the parameters' device seeded with ``seed`` (the package: 0) draws the P
  batch (G, n, r) of every same-shape group in order of first appearance, then the Q batch (G, m, r) of every
  group, in that order.
- Alternation: iteration ``t = step * T + it`` (``step`` counts compressed steps, ``T = num_iters_per_step``);
  an even ``t`` orthogonalizes P and sends Q_i = R_i^T P^, an odd one orthogonalizes Q and sends P_i = R_i Q^.
  The first compressed step therefore starts with P.
- Residual: each worker subtracts its *own* message (P^ Q_i^T, or P_i Q^^T) from its residual R_i before the
  all-reduce, so a second iteration compresses what this worker itself has not sent yet, and the residual kept
  for error feedback is x_i minus everything it sent (``error_feedback="local"``).
- Orthogonalization: a rank-1 factor is divided by max(||x||, 1e-16), a wider one goes through QR.

Where this kernel deviates from the package on purpose (each where the package has a bug):

- A rank-1 factor is normalized per matrix; the package divides a whole same-shape batch by the batch's norm,
  which scales every update of a group of two or more same-shape matrices by the wrong factor.
- Factors are drawn in the gradients' dtype; the package draws them in torch's default dtype and then fails in
  its matmul whenever that differs from the parameters' dtype (float64 or half-precision models).
- A factor that comes out all zero (an all-zero gradient) keeps its previous value (``keep_nonzero``); in the
  package a zero rank-1 factor normalizes to zero and the matrix is never updated again.
"""
from __future__ import annotations

import torch

from ..base import Reduced, check_grads
from ..orthogonalize import orthogonalize, scale_down
from ..powersgd import PowerSGDKernel, PowerSGDState, group_by_matrix_shape, group_matrices, keep_nonzero

#: The package's floor under a rank-1 factor's norm (``powersgd/orthogonalization.py``).
PACKAGE_NORM_FLOOR = 1e-16


class PackagePowerSGDKernel(PowerSGDKernel):
    """``PowerSGDKernel(variant="alternating", warm_start=True)`` with the package's draws, order and residual."""

    def __init__(self, rank: int, num_iters_per_step: int = 1, orthogonalization: str = "qr", seed: int = 0):
        super().__init__(rank, num_iters_per_step, warm_start=True, variant="alternating",
                         orthogonalization=orthogonalization, seed=seed)

    def init(self, shapes, workers, seed=0, dtype=torch.float32, device="cpu"):
        seed = seed if self.seed is None else self.seed
        groups = group_by_matrix_shape(shapes, self.rank)
        generator = torch.Generator(device=device).manual_seed(seed)  # the package: on the parameters' device
        p = {gr.key: torch.randn((len(gr.names), gr.n, gr.rank), generator=generator, dtype=dtype, device=device)
             for gr in groups}  # every P batch first ...
        q = {gr.key: torch.randn((len(gr.names), gr.m, gr.rank), generator=generator, dtype=dtype, device=device)
             for gr in groups}  # ... then every Q batch
        # The shared CPU generator of the base state is never drawn from (warm start always on).
        return PowerSGDState(0, torch.Generator().manual_seed(seed).get_state(), p, q)

    def _orth(self, x):
        """(G, a, r): rank 1 -> each matrix / max(its norm, 1e-16), as the package (but per matrix); else QR."""
        if x.shape[-1] != 1:
            return orthogonalize(x, self.orthogonalization, self.epsilon)
        work = scale_down(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x)  # exact powers of two
        norm = torch.linalg.vector_norm(work, dim=(-2, -1), keepdim=True)  # (G, 1, 1): one norm per matrix
        return (work / norm.clamp(min=PACKAGE_NORM_FLOOR)).to(x.dtype)

    def reduce_residual(self, x, state, comm):
        """``reduce(x)`` and each worker's residual as the package forms it: x_i minus its own messages, one
        iteration after the other (the base kernel's x_i - sum of messages differs in rounding)."""
        workers = check_grads("powersgd", x)
        groups = group_by_matrix_shape({n: g.shape[1:] for n, g in x.items()}, self.rank)
        matrices = {gr.key: group_matrices(x, gr, workers) for gr in groups}  # (W, G, n, m), never written to
        update, residual, p, q = self._iterate(matrices, state, comm)
        new_state = PowerSGDState(state.step + 1, state.rng, p, q)
        return (Reduced(self._unstack(groups, update, x), None), new_state,
                self._unstack(groups, residual, x, workers))

    def _alternating(self, groups, matrices, state, generator, comm, want_local):
        update, residual, p, q = self._iterate(matrices, state, comm)
        local = {k: matrices[k] - residual[k] for k in matrices} if want_local else None  # sum of own messages
        return update, local, p, q

    def _iterate(self, matrices, state, comm):
        """-> update (G, n, m), residual R_i (W, G, n, m), new P, Q per group."""
        p = {k: state.p[k].to(m.dtype) for k, m in matrices.items()}  # (G, n, r)
        q = {k: state.q[k].to(m.dtype) for k, m in matrices.items()}  # (G, m, r)
        residual = dict(matrices)  # R_i: what each worker has not sent yet
        update = {k: torch.zeros_like(m[0]) for k, m in matrices.items()}  # (G, n, m)
        for it in range(self.num_iters_per_step):
            sends_q = (state.step * self.num_iters_per_step + it) % 2 == 0  # even: P^ in, Q_i out (package order)
            inputs = {k: self._orth(v) for k, v in (p if sends_q else q).items()}
            if sends_q:  # Q_i = R_i^T P^  (W, G, m, r)
                out_local = {k: torch.matmul(residual[k].transpose(-1, -2), inputs[k]) for k in inputs}
            else:  # P_i = R_i Q^  (W, G, n, r)
                out_local = {k: torch.matmul(residual[k], inputs[k]) for k in inputs}
            for k in inputs:  # each worker's own message leaves its residual before the all-reduce
                a, b = (inputs[k], out_local[k]) if sends_q else (out_local[k], inputs[k])
                residual[k] = residual[k] - torch.matmul(a, b.transpose(-1, -2))  # (W, G, n, m)
            out = self._all_reduce(out_local, comm, "powersgd.q" if sends_q else "powersgd.p")  # means (G, a, r)
            for k in inputs:
                a, b = (inputs[k], out[k]) if sends_q else (out[k], inputs[k])
                update[k] = update[k] + torch.matmul(a, b.transpose(-1, -2))  # (G, n, m)
            if sends_q:
                p, q = inputs, out
            else:
                q, p = inputs, out
        return update, residual, keep_nonzero(p, state.p), keep_nonzero(q, state.q)

    def __repr__(self):
        return (f"PackagePowerSGDKernel(rank={self.rank}, num_iters_per_step={self.num_iters_per_step}, "
                f"orthogonalization={self.orthogonalization!r})")
