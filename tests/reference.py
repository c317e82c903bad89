"""Slow, obviously-correct references the fast paths are compared against.

Everything here is a plain Python loop over workers and over matrices: no batching, no packing, no
broadcasting over a worker axis. Means are sums in worker order divided by W (as the virtual all-reduce).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import compressors
import sim
from compressors.powersgd import PowerSGDState, group_by_matrix_shape


def reference_mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    """mean_i x_i as a loop: ((x_0 + x_1) + ...) / W."""
    total = tensors[0].clone()
    for t in tensors[1:]:
        total = total + t
    return total / len(tensors)


def exact_mean(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: (W, *shape)} -> {name: (*shape)}, the exact mean every compressor approximates."""
    return {n: reference_mean([g[i] for i in range(g.shape[0])]) for n, g in grads.items()}


def reference_gram_schmidt(x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Modified Gram-Schmidt of one (n, r) matrix, column by column, each column divided by (norm + epsilon)."""
    cols = []
    for i in range(x.shape[1]):
        c = x[:, i].clone()
        for _ in range(2):  # re-orthogonalize once ("twice is enough"), as compressors.orthogonalize
            for d in cols:
                c = c - torch.dot(d, c) * d
        cols.append(c / (torch.linalg.vector_norm(c) + epsilon))
    return torch.stack(cols, dim=1)


def reference_orthogonalize(x: torch.Tensor, method: str, epsilon: float) -> torch.Tensor:
    """One (n, r) matrix at a time (never a batch)."""
    assert x.dim() == 2
    if method == "qr":
        return torch.linalg.qr(x, mode="reduced").Q
    return reference_gram_schmidt(x, epsilon)


def initial_factors(state, shapes: dict[str, tuple[int, ...]], rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The shared starting factors {name: (p0 (n, r), q0 (m, r))} the kernel drew in init, one matrix at a time.

    Only the kernel's seeded draw is taken from it; everything after that the reference computes itself.
    """
    kernel_states = [s for s in compressors.iter_states(state) if isinstance(s, PowerSGDState)]
    assert len(kernel_states) == 1, "expected exactly one PowerSGD state"
    ks = kernel_states[0]
    out = {}
    for gr in group_by_matrix_shape(shapes, rank):
        for j, name in enumerate(gr.names):
            out[name] = (ks.p[gr.key][j].clone(), ks.q[gr.key][j].clone())  # in the state's dtype
    return out


@dataclass
class ReferencePowerSGD:
    """PowerSGD on W workers, one matrix and one worker at a time.

    ``factors``: {name: (p (n, r), q (m, r))} for the compressed tensors (matrix view shape[0] x rest);
    tensors not in ``factors`` are averaged exactly and keep no memory. Warm start only (fresh random
    factors are the kernel's RNG business, tested separately).
    error_feedback: "none" | "local" (e_i = x_i - C_i(x_i)) | "averaged" (e_i = x_i - update).
    """

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    workers: int
    variant: str = "paper"
    num_iters_per_step: int = 1
    error_feedback: str = "none"
    orthogonalization: str = "qr"
    epsilon: float = 1e-8
    warmup_steps: int = 0
    step: int = 0  # every call
    compressed_steps: int = 0  # the alternating parity counts compressed steps only
    memory: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def orth(self, x):
        return reference_orthogonalize(x, self.orthogonalization, self.epsilon)

    def __call__(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.step += 1
        if self.step <= self.warmup_steps:
            return exact_mean(grads)
        update = {}
        for name, g in grads.items():
            if name not in self.factors:
                update[name] = reference_mean([g[i] for i in range(self.workers)])
                continue
            shape = g.shape[1:]
            rows = shape[0]
            mats = [g[i].reshape(rows, -1) for i in range(self.workers)]  # W x (n, m)
            p0, q0 = self.factors[name]
            self.factors[name] = (p0.to(g.dtype), q0.to(g.dtype))  # factors take the gradient's dtype
            if self.error_feedback != "none":
                mem = self.memory.setdefault(name, [torch.zeros_like(m) for m in mats])
                mats = [m + e for m, e in zip(mats, mem)]
            if self.variant == "paper":
                u, local = self._paper(name, mats)
            else:
                u, local = self._alternating(name, mats)
            if self.error_feedback == "local":
                self.memory[name] = [x - c for x, c in zip(mats, local)]
            elif self.error_feedback == "averaged":
                self.memory[name] = [x - u for x in mats]
            update[name] = u.reshape(shape)
        self.compressed_steps += 1
        return update

    def _paper(self, name, mats):
        p, q = self.factors[name]
        p_hat, q_local = p, None
        for _ in range(self.num_iters_per_step):
            p_mean = reference_mean([m @ q for m in mats])  # P = mean_i M_i Q
            p_hat = self.orth(p_mean)
            q_local = [m.T @ p_hat for m in mats]  # Q_i = M_i^T P^
            q = reference_mean(q_local)
        self.factors[name] = (p_hat, q)
        return p_hat @ q.T, [p_hat @ qi.T for qi in q_local]

    def _alternating(self, name, mats):
        p, q = self.factors[name]
        residual = [m.clone() for m in mats]
        update = torch.zeros_like(mats[0])
        local = [torch.zeros_like(m) for m in mats]
        for it in range(self.num_iters_per_step):
            left = (self.compressed_steps * self.num_iters_per_step + it) % 2 == 0
            if left:  # Q^ in, P = mean_i R_i Q^ out; approximation P Q^^T
                q_hat = self.orth(q)
                outs = [r @ q_hat for r in residual]
                p = reference_mean(outs)
                approx = p @ q_hat.T
                local = [lc + o @ q_hat.T for lc, o in zip(local, outs)]
                q = q_hat
            else:  # P^ in, Q = mean_i R_i^T P^ out; approximation P^ Q^T
                p_hat = self.orth(p)
                outs = [r.T @ p_hat for r in residual]
                q = reference_mean(outs)
                approx = p_hat @ q.T
                local = [lc + p_hat @ o.T for lc, o in zip(local, outs)]
                p = p_hat
            residual = [r - approx for r in residual]
            update = update + approx
        self.factors[name] = (p, q)
        return update, local

    def mean_memory(self, name: str) -> torch.Tensor:
        return reference_mean(self.memory[name])


from compressors.testing import run_steps  # noqa: E402,F401  (one definition, shared with the public battery)


def flat_leaves(tree) -> list:
    """Every leaf of a nested state (dicts in key order, tuples, lists) in a fixed order."""
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in flat_leaves(tree[k])]
    if isinstance(tree, (tuple, list)):
        return [x for item in tree for x in flat_leaves(item)]
    return [tree]


def assert_identical_leaves(a, b) -> None:
    """Two nested states hold the same leaves bitwise (tensors: dtype, shape and values)."""
    la, lb = flat_leaves(a), flat_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        else:
            assert type(x) is type(y) and x == y


class Interrupted(Exception):
    """Raised from an ``on_step`` callback to kill a run at a chosen step."""


def run_interrupted(experiment, checkpoint_dir, stop_at: int, every: int):
    """``sim.run`` with checkpoints every ``every`` steps, killed after step ``stop_at`` (as by a crash)."""
    import sim

    def interrupt(simulation, state):
        if state.step == stop_at:
            raise Interrupted

    try:
        sim.run(experiment, checkpoint_dir=checkpoint_dir, checkpoint_every=every, on_step=interrupt)
    except Interrupted:
        return
    raise AssertionError(f"the run was not interrupted at step {stop_at}")


def assert_resume_is_bitwise(experiment, full, checkpoint_dir):
    """Resuming from ``checkpoint_dir`` ends with ``full``'s history and final state, bitwise; returns the resumed."""
    import pandas as pd
    import sim

    resumed = sim.run(experiment, resume_from=checkpoint_dir)
    pd.testing.assert_frame_equal(resumed.history, full.history, check_exact=True)
    assert_identical_leaves(resumed.extras["final_state"], full.extras["final_state"])
    return resumed


# -- small shared workloads ------------------------------------------------------------------------------------
#: A config file of a 3-step run on a tiny synthetic task (the CLI and sweep tests write it to a folder).
TINY_CONFIG = """
task = "synthetic-lowrank"
workers = 2
steps = 3
batch_size = 4
eval_every = 0
[task_options]
dim_in = 6
dim_out = 4
samples = 32
test_samples = 8
[compressor]
name = "powersgd"
rank = 1
"""
#: A 4-step run with evaluations, as an Experiment and as a config naming its compressor by a spec.
SPEC_BASE_OPTIONS = dict(task="synthetic-lowrank", workers=2, steps=4, batch_size=8, lr=0.1, eval_every=2,
                         task_options={"dim_in": 32, "dim_out": 16, "samples": 64, "test_samples": 16},
                         compressor={"name": "powersgd", "rank": 1})
SPEC_CONFIG = """
task = "synthetic-lowrank"
workers = 2
steps = 4
batch_size = 8
lr = 0.1
eval_every = 2
compressor = "powersgd:rank=1"
[task_options]
dim_in = 32
dim_out = 16
samples = 64
test_samples = 16
"""
#: A 6-step run checkpointed every 2 steps by the ``written`` fixture (tests/conftest.py).
CHECKPOINTED = sim.Experiment(task="synthetic-lowrank", task_options={"dim_in": 12, "dim_out": 10, "samples": 64,
                                                                       "test_samples": 8},
                              workers=2, steps=6, batch_size=4, eval_every=3,
                              compressor={"name": "powersgd", "rank": 2}, seed=1)
