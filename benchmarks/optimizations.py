"""Before/after of each hot-path optimization, side by side on the same tensors (interleaved, medians).

Each pair computes the same result (asserted here: bitwise, or to 1e-5 relative for the pairs marked
"rounding", which change the summation order); the tensors have the shapes of the ``mlp-4x1024`` step at
W = 16: (16, 1024, 1024) gradients, the per-worker sizes that dominate it.
"""
from __future__ import annotations

import torch

from compressors.error_feedback import _residual_into
from compressors.powersgd import Group, _batch, _left, _subtract_lowrank_
from compressors.state_tree import squared_norm
from sim.simulation import all_finite
from .timing import fmt_ms, interleaved, median, ratio_of_medians, table

W, N = 16, 1024


#: Pairs whose two sides differ in rounding only (a different summation order), checked to 1e-5 relative.
ROUNDING = ("memory norm, chunked float32 (compressors/state_tree.py)", "EF residual, fused (compressors/powersgd.py)",
            "group of three, members (compressors/powersgd.py)")


def _pairs(x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple]:
    grads = {"w": x}
    group = Group("1024x1024", ("w",), N, N, 2)
    three = {"a": x, "b": y, "c": x}  # a group of three same-shape matrices (the MLP's hidden layers)
    group3 = Group("1024x1024", ("a", "b", "c"), N, N, 2)
    generator = torch.Generator().manual_seed(1)
    p = torch.randn((N, 2), generator=generator)  # P^ (n, r)
    q = torch.randn((W, N, 2), generator=generator)  # Q_i (W, m, r)
    q3 = torch.randn((3, N, 2), generator=generator)  # Q (G, m, r)

    def residual_before():  # build C_i(x_i) = P^ Q_i^T, then subtract it (the generic error-feedback path)
        scratch = x + y
        return torch.sub(scratch, torch.matmul(p, q.transpose(-1, -2)), out=scratch)

    def residual_after():  # one fused baddbmm_ pass into x
        return _subtract_lowrank_(x + y, p, q)

    def norm_before():
        return float(x.double().pow(2).sum())

    def norm_after():
        squares = x.to(torch.float64, copy=True)
        return float(squares.mul_(squares).sum())

    def ef_after():
        scratch = x + y  # the error-feedback wrapper's own x_i = g_i + e_i, overwritten by the residual
        return _residual_into(scratch, y, x.dtype)

    return {
        "finiteness check (sim/runner.py)": (lambda: bool(torch.isfinite(x).all()), lambda: all_finite(x)),
        "memory norm (compressors/state_tree.py)": (norm_before, norm_after),
        "group of one matrix (compressors/powersgd.py)": (
            lambda: torch.stack([x.reshape(W, N, N)], dim=1), lambda: _batch(grads, group, W)),
        "EF residual (compressors/error_feedback.py)": (lambda: ((x + y) - y).to(x.dtype), ef_after),
        "memory norm, chunked float32 (compressors/state_tree.py)": (norm_after, lambda: float(squared_norm(x))),
        "EF residual, fused (compressors/powersgd.py)": (residual_before, residual_after),
        "group of three, members (compressors/powersgd.py)": (
            lambda: torch.matmul(_batch(three, group3, W), q3),
            lambda: _left(_batch(three, group3, W, allow_members=True), q3)),
    }


def run(quick: bool = False):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((W, N, N), generator=generator)  # (W, n, m)
    y = torch.randn((W, N, N), generator=generator)
    metrics, rows = {}, []
    for name, (before, after) in _pairs(x, y).items():
        a, b = before(), after()
        if name in ROUNDING:
            same = (torch.allclose(a, b, rtol=1e-5, atol=1e-4) if isinstance(a, torch.Tensor)
                    else abs(a - b) <= 1e-5 * abs(a))
        else:
            same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        if not same:
            raise AssertionError(f"optimizations: {name}: before and after differ")
        samples = interleaved({"before": before, "after": after}, repeats=3 if quick else 7, warmup=1)
        speedup = ratio_of_medians(samples, "before", "after")
        rows.append([name, fmt_ms(median(samples["before"])), fmt_ms(median(samples["after"])), f"{speedup:.1f}x"])
        metrics["optimization_speedup_" + name.split(" (")[0].replace(" ", "_")] = round(speedup, 2)
        print(f"  {name}: before {fmt_ms(median(samples['before']))}, after {fmt_ms(median(samples['after']))}, "
              f"{speedup:.1f}x", flush=True)
    text = table(["change (file)", f"before, ({W}, {N}, {N}) float32", "after", "speedup (median of rounds)"], rows)
    return metrics, {"optimizations": text}
