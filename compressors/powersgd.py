"""PowerSGD (Vogels, Karimireddy, Jaggi, NeurIPS 2019): rank-r power iteration, all-reduce only.

Two variants:
- ``"paper"`` (paper Algorithm 1): per iteration P_i = M_i Q, P = mean P_i, P^ = orth(P), Q_i = M_i^T P^,
  Q = mean Q_i; update P^ Q^T = P^ P^^T mean(M). Warm start reuses Q across steps.
- ``"alternating"`` (after the authors' later ``powersgd`` package): one factor per iteration, alternating
  between left and right multiplications across iterations and steps; each iteration compresses what the
  averaged approximation so far leaves (R_i <- R_i - mean approximation). Warm start reuses both factors.
  The package itself starts with the other factor, subtracts each worker's own message instead (since
  July 2022) and draws its initial factors in another order: ``package_kernel.PackagePowerSGDKernel``
  (``compressors.PowerSGD``) reproduces it exactly.

Every same-shape matrix of every worker goes through one batched matmul: M is (W, G, n, m) per group of
G same-shape matrices, the shared factor (G, m, r) broadcasts over workers. Each iteration is one packed
all-reduce over all groups. This kernel has no error feedback, warm-up or vector policy: ``make`` composes
those around it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from theory import lowrank
from .base import Aggregator, Reduced, TheoryClaim, check_grads, dtype_bits, matrix_view_shape
from .orthogonalize import orthogonalize
from .packing import pack, unpack
from .serialization import register_record


VARIANTS = ("paper", "alternating")


@register_record
class PowerSGDState(NamedTuple):
    step: int  # compressed steps taken so far (the alternating variant's parity)
    rng: torch.Tensor  # state of the generator shared by all workers (uint8)
    p: dict[str, torch.Tensor]  # per group: (G, n, r), the last P (orthonormal in "paper")
    q: dict[str, torch.Tensor]  # per group: (G, m, r), the last Q (warm start)


class Group(NamedTuple):
    key: str
    names: tuple[str, ...]
    n: int
    m: int
    rank: int


def group_by_matrix_shape(shapes, rank, separate: bool = False) -> list[Group]:
    """Same matrix-view shapes (and ranks) batch together; the effective rank is capped at min(n, m).

    rank: one rank for every tensor, or {name: rank}. A shape class whose tensors share one rank is keyed
    "{n}x{m}"; one split by different ranks is keyed "{n}x{m}r{rank}" per rank. ``separate``: one group per
    tensor, keyed by its name (its factors then keep their key whatever ranks the other tensors take).
    """
    rank_of = (lambda name: rank) if isinstance(rank, int) else (lambda name: rank[name])
    members: dict[tuple[int, int, int], list[str]] = {}
    ranks_of_shape: dict[tuple[int, int], set[int]] = {}
    for name, shape in shapes.items():
        n, m = matrix_view_shape(tuple(shape))
        r = min(rank_of(name), n, m)
        key = (n, m, r, name) if separate else (n, m, r)
        members.setdefault(key, []).append(name)
        ranks_of_shape.setdefault((n, m), set()).add(r)
    groups = []
    for key, names in members.items():
        n, m, r = key[:3]
        if separate:
            label = names[0]
        else:
            label = f"{n}x{m}" if len(ranks_of_shape[(n, m)]) == 1 else f"{n}x{m}r{r}"
        groups.append(Group(label, tuple(names), n, m, r))
    return groups


def keep_nonzero(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per matrix, a factor that came out all zero (a zero gradient) keeps its previous value.

    Why: warm start multiplies the next gradient by the stored factor; a zero factor gives P = M 0 = 0, and
    Gram-Schmidt keeps zero columns zero, so every later update would be zero (silently stuck).
    """
    return {k: torch.where(v.abs().amax(dim=(-2, -1), keepdim=True) == 0, old[k].to(v.dtype), v)
            for k, v in new.items()}


#: Members of at least this many elements (all workers) are not stacked: stacking a group copies every member
#: once, a full pass over W copies of each big matrix; one matmul per member costs only a few more dispatches.
STACK_BELOW_ELEMENTS = 1 << 16


def group_matrices(grads, group: Group, workers: int, allow_members: bool = False) -> torch.Tensor | list[torch.Tensor]:
    """A group's matrices of every worker: one (W, G, n, m) tensor (the layout ``torch.stack`` gives), or, when
    ``allow_members`` and the members are big, the list of G (W, n, m) views (no copy; see ``_left``/``_right``).

    A group of one matrix is a view of the gradient (no copy: saves a pass over W copies of it); nothing
    downstream writes into the result, so the caller's gradients are never touched either way.
    """
    if len(group.names) == 1:
        return grads[group.names[0]].reshape(workers, group.n, group.m).contiguous().unsqueeze(1)
    members = [grads[n].reshape(workers, group.n, group.m) for n in group.names]  # views when contiguous
    if allow_members and workers * group.n * group.m >= STACK_BELOW_ELEMENTS:
        return members
    return torch.stack(members, dim=1)


def _left(matrices, factor: torch.Tensor) -> torch.Tensor:
    """M_i Q for every worker and member: (W, G, n, m) @ (G, m, r) -> (W, G, n, r)."""
    if isinstance(matrices, list):
        return torch.stack([torch.matmul(m, factor[j]) for j, m in enumerate(matrices)], dim=1)
    return torch.matmul(matrices, factor)


def _right(matrices, factor: torch.Tensor) -> torch.Tensor:
    """M_i^T P for every worker and member: (W, G, n, m)^T @ (G, n, r) -> (W, G, m, r)."""
    if isinstance(matrices, list):
        return torch.stack([torch.matmul(m.transpose(-1, -2), factor[j]) for j, m in enumerate(matrices)], dim=1)
    return torch.matmul(matrices.transpose(-1, -2), factor)


def _subtract_lowrank_(x: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x_i <- x_i - P Q_i^T for every worker, in one fused pass over x when it can be written as (W, n, m).

    x: (W, *shape) with the matrix view n x m, p: (n, r) shared, q: (W, m, r) per worker. ``baddbmm`` reads
    and writes x once instead of materialising the (W, n, m) reconstruction and subtracting it (two passes
    and a W-copy allocation); the result differs from ``x - P Q_i^T`` only in rounding.
    """
    workers, n, m = q.shape[0], p.shape[0], q.shape[1]
    if x.is_contiguous():
        view = x.view(workers, n, m)  # (W, n, m), shares x's memory
        view.baddbmm_(p.expand(workers, n, p.shape[1]), q.transpose(-1, -2), alpha=-1)
        return x
    return x - torch.matmul(p, q.transpose(-1, -2)).reshape(x.shape)


class PowerSGDKernel(Aggregator):
    name = "powersgd"
    all_reducible = True

    def __init__(self, rank: int, num_iters_per_step: int = 1, warm_start: bool = True, variant: str = "paper",
                 orthogonalization: str = "qr", epsilon: float = 1e-8, seed: int | None = None,
                 layer_rank=None, separate: bool = False):
        self.rank = rank
        # name -> rank (``compressors.ranks.layers``), or None: ``rank`` for every tensor
        self.layer_rank = layer_rank
        self.separate = separate  # one group per tensor (ranks that change per tensor over time)
        self.num_iters_per_step = num_iters_per_step
        self.warm_start = warm_start
        self.variant = variant
        self.orthogonalization = orthogonalization
        self.epsilon = epsilon
        self.seed = seed

    def ranks(self, shapes) -> int | dict[str, int]:
        """The configured rank of every tensor: ``rank``, or {name: rank} with per-layer ranks."""
        if self.layer_rank is None:
            return self.rank
        return {name: self.layer_rank(name) for name in shapes}

    def groups(self, shapes, ranks=None) -> list[Group]:
        """The batched groups for ``ranks`` (default: the configured ranks)."""
        return group_by_matrix_shape(shapes, self.ranks(shapes) if ranks is None else ranks, self.separate)

    # -- state -------------------------------------------------------------------------------------------
    def init(self, shapes, workers, seed=0, dtype=torch.float32, device="cpu"):
        generator = torch.Generator().manual_seed(seed if self.seed is None else self.seed)
        p, q = {}, {}
        for group in self.groups(shapes):
            g = len(group.names)
            # Drawn on the CPU from one seeded generator: identical on every worker and every device.
            p[group.key] = torch.randn((g, group.n, group.rank), generator=generator).to(dtype=dtype, device=device)
            q[group.key] = torch.randn((g, group.m, group.rank), generator=generator).to(dtype=dtype, device=device)
        return PowerSGDState(0, generator.get_state(), p, q)

    # -- one step ----------------------------------------------------------------------------------------
    def reduce(self, grads, state, comm, want_local=False):
        return self.reduce_at_ranks(grads, state, comm, want_local)

    def reduce_at_ranks(self, grads, state, comm, want_local=False, ranks=None):
        """``reduce`` with other ranks than the configured ones ({name: rank} or one rank); ``state``'s factors
        must have those ranks (``compressors.ranks.control`` slices its stored factors to them)."""
        return self._reduce(grads, state, comm, want_local, residual=False, ranks=ranks)

    def reduce_residual(self, x, state, comm, ranks=None):
        """``reduce(x)`` that also leaves each worker's residual x_i - C_i(x_i) in ``x`` (overwritten in place).

        For local error feedback, whose x = g + e is its own temporary: the residual is formed by one fused
        pass (``_subtract_lowrank_``) instead of building C_i(x_i) and subtracting it. Returns
        (Reduced(update, None), state, residuals) with ``residuals[name]`` x[name] itself (or, where it
        could not be written in place, a new tensor).
        """
        return self._reduce(x, state, comm, want_local=False, residual=True, ranks=ranks)

    def _reduce(self, grads, state, comm, want_local, residual, ranks=None):
        workers = check_grads("powersgd", grads)
        groups = self.groups({n: g.shape[1:] for n, g in grads.items()}, ranks)
        generator = torch.Generator().manual_seed(0)
        generator.set_state(state.rng)
        paper = self.variant == "paper"
        matrices = {gr.key: group_matrices(grads, gr, workers, allow_members=paper) for gr in groups}  # never written to
        if paper:
            update, local, p, q = self._paper(groups, matrices, state, generator, comm, want_local or residual)
        else:
            update, local, p, q = self._alternating(groups, matrices, state, generator, comm, want_local or residual)
        new_state = PowerSGDState(state.step + 1, generator.get_state(), p, q)
        update = self._unstack(groups, update, grads)
        if residual:
            if paper:  # local holds the factors (P^, Q_i): fuse the reconstruction into the subtraction
                residuals = {}
                for gr in groups:
                    p_hat, q_local = local[gr.key]  # (G, n, r), (W, G, m, r)
                    for j, name in enumerate(gr.names):
                        residuals[name] = _subtract_lowrank_(grads[name], p_hat[j], q_local[:, j])
            else:
                local = self._unstack(groups, local, grads, workers)
                residuals = {name: torch.sub(x, local[name], out=x) if x.is_contiguous() else x - local[name]
                             for name, x in grads.items()}
            return Reduced(update, None), new_state, {name: residuals[name] for name in grads}
        if want_local and paper:
            local = {k: torch.matmul(p_hat, q_local.transpose(-1, -2)) for k, (p_hat, q_local) in local.items()}
        return Reduced(update, self._unstack(groups, local, grads, workers) if want_local else None), new_state

    def _fresh(self, shape, generator, like):
        return torch.randn(shape, generator=generator).to(dtype=like.dtype, device=like.device)

    def _orth(self, x):
        return orthogonalize(x, self.orthogonalization, self.epsilon)

    def _all_reduce(self, factors: dict[str, torch.Tensor], comm, tag: str) -> dict[str, torch.Tensor]:
        """All groups' local factors (W, G, a, r) in one collective -> their means (G, a, r)."""
        out: dict[str, torch.Tensor] = {}
        for buffer, layout in pack(factors):
            out.update(unpack(comm.all_reduce_mean(buffer, tag=tag), layout))
        return out

    def _paper(self, groups, matrices, state, generator, comm, want_local):
        """-> update (G, n, m) per group, local factors (P^ (G, n, r), Q_i (W, G, m, r)) per group (or None),
        and the new P, Q (the caller reconstructs P^ Q_i^T only if it needs it)."""
        q = {}
        for gr in groups:
            members = matrices[gr.key]
            like = members[0] if isinstance(members, list) else members
            q[gr.key] = (state.q[gr.key].to(like.dtype) if self.warm_start
                         else self._fresh((len(gr.names), gr.m, gr.rank), generator, like))
        p_hat, q_local = {}, {}
        for _ in range(self.num_iters_per_step):
            p_local = {k: _left(matrices[k], q[k]) for k in q}  # (W, G, n, r)
            p_mean = self._all_reduce(p_local, comm, "powersgd.p")
            p_hat = {k: self._orth(v) for k, v in p_mean.items()}  # (G, n, r)
            q_local = {k: _right(matrices[k], p_hat[k]) for k in q}  # (W, G, m, r)
            q = self._all_reduce(q_local, comm, "powersgd.q")  # (G, m, r)
        update = {k: torch.matmul(p_hat[k], q[k].transpose(-1, -2)) for k in q}  # (G, n, m)
        local = {k: (p_hat[k], q_local[k]) for k in q} if want_local else None
        return update, local, p_hat, (keep_nonzero(q, state.q) if self.warm_start else state.q)

    def _alternating(self, groups, matrices, state, generator, comm, want_local):
        p = {gr.key: state.p[gr.key].to(matrices[gr.key].dtype) for gr in groups}
        q = {gr.key: state.q[gr.key].to(matrices[gr.key].dtype) for gr in groups}
        residual = dict(matrices)  # R_i: what is left to compress on each worker
        update = {k: torch.zeros_like(m[0]) for k, m in matrices.items()}  # (G, n, m)
        local = {k: torch.zeros_like(m) for k, m in matrices.items()} if want_local else None
        for it in range(self.num_iters_per_step):
            left = (state.step * self.num_iters_per_step + it) % 2 == 0  # even: Q in, P out
            inputs = q if left else p
            if it == 0 and not self.warm_start:
                inputs = {k: self._fresh(v.shape, generator, v) for k, v in inputs.items()}
            inputs = {k: self._orth(v) for k, v in inputs.items()}
            if left:  # P_i = R_i Q^, approximation P Q^^T
                out_local = {k: torch.matmul(residual[k], inputs[k]) for k in inputs}
            else:  # Q_i = R_i^T P^, approximation P^ Q^T
                out_local = {k: torch.matmul(residual[k].transpose(-1, -2), inputs[k]) for k in inputs}
            out = self._all_reduce(out_local, comm, "powersgd.p" if left else "powersgd.q")
            for k in inputs:
                a, b = (out[k], inputs[k]) if left else (inputs[k], out[k])
                approx = torch.matmul(a, b.transpose(-1, -2))  # (G, n, m)
                residual[k] = residual[k] - approx
                update[k] = update[k] + approx
                if want_local:
                    la, lb = (out_local[k], inputs[k]) if left else (inputs[k], out_local[k])
                    local[k] = local[k] + torch.matmul(la, lb.transpose(-1, -2))
            if left:
                q, p = inputs, out
            else:
                p, q = inputs, out
        return update, local, keep_nonzero(p, state.p), keep_nonzero(q, state.q)

    @staticmethod
    def _unstack(groups, batched, grads, workers=None):
        out = {}
        for gr in groups:
            for index, name in enumerate(gr.names):
                shape = grads[name].shape[1:]
                t = batched[gr.key][..., index, :, :]
                out[name] = t.reshape(shape) if workers is None else t.reshape(workers, *shape)
        return {name: out[name] for name in grads}

    # -- accounting --------------------------------------------------------------------------------------
    def bits_per_step(self, shapes, dtype=torch.float32):
        """Paper: T r (n + m) elements per matrix per step. Alternating: one factor per iteration, so
        T r (n + m) / 2 on average over two steps (exact per step when T is even)."""
        return self.bits_at_ranks(shapes, None, dtype=dtype)

    def bits_at_ranks(self, shapes, ranks, *, dtype=torch.float32):
        """``bits_per_step`` at other ranks than the configured ones ({name: rank}, one rank, or None)."""
        elements = 0
        for gr in self.groups(shapes, ranks):
            elements += len(gr.names) * gr.rank * (gr.n + gr.m)
        elements *= self.num_iters_per_step
        bits = elements * dtype_bits(dtype)
        return bits if self.variant == "paper" else bits / 2

    def theory(self, shapes):
        """The class PowerSGD has on these shapes: the weakest of its matrices' classes (``_matrix_claim``).

        Every variant applies, per matrix, projections onto subspaces with orthonormal (QR) or shrunk
        orthogonal (Gram-Schmidt, columns divided by norm + epsilon) bases: ||C(x) - x|| <= ||x|| always. A
        positive delta needs fresh randomness this step (``warm_start=False``) and an exact orthonormal basis
        (QR; Gram-Schmidt divides by norm + epsilon, and with epsilon = 0 a rank-deficient P gives NaN). With
        warm start the subspace comes from earlier steps and an input orthogonal to it loses everything
        (after M1 = e1 f1^T + e2 f2^T, the input 10 (e3 f3^T + e4 f4^T) + 0.01 M1 keeps delta ~ 1e-6 at
        rank 2, for any number of iterations); with epsilon > 0 an input of tiny scale (|x| ~ 1e-12) keeps
        its share only up to ||P||/(||P|| + epsilon).
        """
        return self.theory_at_ranks(shapes, None)

    def theory_at_ranks(self, shapes, ranks) -> TheoryClaim:
        """``theory`` with other ranks than the configured ones ({name: rank}, one rank, or None)."""
        ranks = self.ranks(shapes) if ranks is None else ranks
        rank_of = (lambda name: ranks) if isinstance(ranks, int) else (lambda name: ranks[name])
        per_matrix = [self._matrix_claim(*matrix_view_shape(tuple(s)), rank=rank_of(name))
                      for name, s in shapes.items()]
        if not per_matrix or all(c.kind == "exact" for c in per_matrix):
            return TheoryClaim(kind="exact", omega=0.0, delta=1.0,
                               deterministic=all(c.deterministic for c in per_matrix),
                               per_worker=all(c.per_worker for c in per_matrix),
                               premise="; ".join(sorted({c.premise for c in per_matrix if c.premise})))
        weakest = [c for c in per_matrix if c.kind == "nonexpansive"] or [c for c in per_matrix if c.kind != "exact"]
        delta = None if weakest[0].kind == "nonexpansive" else min(c.delta for c in weakest)
        return TheoryClaim(kind=weakest[0].kind, delta=delta, deterministic=weakest[0].deterministic,
                           per_worker=all(c.per_worker for c in per_matrix), premise=weakest[0].premise)

    def _matrix_claim(self, n: int, m: int, rank: int | None = None) -> TheoryClaim:
        """The class of one n x m matrix at rank r = min(rank, n, m).

        - exact: "paper" with an exact basis and r = n (P^ is a square orthogonal matrix, for every start),
          or r = m cold-started (span P^ = range(mean M Omega) = range(mean M) almost surely: exact on the
          mean, not on each worker's M_i); "alternating" with an exact basis and r = n = m.
        - contractive in expectation, cold start, exact basis: "paper" (any number of iterations t) or
          "alternating" with t >= 2 (its first two iterations leave the same (I - P^P^^T) M as one "paper"
          iteration, later ones only shrink the residual): delta = r/min(n, m) on the workers' mean
          (``theory.lowrank.range_finder_delta``, tight for a flat spectrum); "alternating" with t = 1
          projects each worker's M_i onto a fresh random subspace of R^m (even steps) or R^n (odd steps):
          delta = r/max(n, m), for each worker (``theory.lowrank.random_subspace_delta``).
        - nonexpansive otherwise (warm start, or Gram-Schmidt): delta = 0 in the worst case.
        """
        r = min(self.rank if rank is None else rank, n, m)
        exact_basis = self.orthogonalization == "qr"  # Gram-Schmidt: shrunk columns (epsilon > 0) or NaN (0)
        cold = not self.warm_start
        paper = self.variant == "paper"
        if exact_basis and paper and r >= n:
            return TheoryClaim(kind="exact", omega=0.0, delta=1.0, premise="rank >= rows: P^ is square orthogonal")
        if exact_basis and paper and r >= m and cold:
            return TheoryClaim(kind="exact", omega=0.0, delta=1.0, deterministic=False, per_worker=False,
                               premise="cold start, rank >= columns: exact on the workers' mean, almost surely")
        if exact_basis and not paper and r >= n and r >= m:
            return TheoryClaim(kind="exact", omega=0.0, delta=1.0, premise="rank >= rows and columns")
        if not (exact_basis and cold):
            why = "warm start" if self.warm_start else "Gram-Schmidt orthogonalization"
            return TheoryClaim(kind="nonexpansive", per_worker=True,
                               premise=f"{why}: a projection, no worst-case contraction")
        if not paper and self.num_iters_per_step == 1:
            return TheoryClaim(kind="contractive", delta=lowrank.random_subspace_delta(max(n, m), r),
                               deterministic=False,
                               premise="cold start, alternating, one iteration: a fresh random subspace")
        return TheoryClaim(kind="contractive", delta=lowrank.range_finder_delta(n, m, r), deterministic=False,
                           per_worker=False,
                           premise="cold start, exact basis: in expectation, on the workers' mean")

    def __repr__(self):
        return (f"PowerSGDKernel(rank={self.rank}, num_iters_per_step={self.num_iters_per_step}, "
                f"warm_start={self.warm_start}, variant={self.variant!r}, "
                f"orthogonalization={self.orthogonalization!r})")
