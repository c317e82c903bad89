"""Write docs/validation.md: the largest sim-vs-real parameter difference for every registered compressor.

    python scripts/write_validation.py [--task synthetic-lowrank] [--steps 30] [--out docs/validation.md]

For each compressor: ``sim.run`` (one process, VirtualCollective) against ``sim.run_distributed`` on 2 gloo
processes with 1 worker each (W = 2) and with 2 emulated workers each (W = 4), same experiment and seed.
The table reports max over tensors of max|real - sim| / max|sim| for the final parameters.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time

import torch

import compressors
import sim

TASK_OPTIONS = {"synthetic-lowrank": {"dim_in": 16, "dim_out": 8, "samples": 512, "test_samples": 64}}


def experiment(task: str, name: str, workers: int, steps: int) -> sim.Experiment:
    options = {"rank": 2} if name == "powersgd" else {}
    return sim.Experiment(task=task, task_options=TASK_OPTIONS.get(task, {}), workers=workers, steps=steps,
                          batch_size=16, lr=0.05, eval_every=0, compressor={"name": name, **options}, seed=0)


def rel(a: sim.Result, b: sim.Result) -> float:
    return max(float((a.params[n] - b.params[n]).abs().max() / b.params[n].abs().max().clamp_min(1e-30))
               for n in b.params)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="synthetic-lowrank")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="docs/validation.md")
    args = parser.parse_args(argv)
    names = sorted(compressors.REGISTRY)
    started = time.perf_counter()
    rows = []
    for workers, k in ((2, 1), (4, 2)):
        exps = [experiment(args.task, n, workers, args.steps) for n in names]
        real = sim.run_distributed(exps, nproc=2, workers_per_process=k, timeout=3600)
        for e, r in zip(exps, real):
            v = sim.run(e)
            rows.append((e.compressor["name"], workers, k, compressors.make(e.compressor["name"]).all_reducible,
                         rel(r, v), abs(r.final("train_loss") - v.final("train_loss")),
                         r.history["bits"].tolist() == v.history["bits"].tolist()))
    by_name = {}
    for name, workers, k, reducible, diff, loss_diff, bits in rows:
        by_name.setdefault(name, {})[workers] = (reducible, diff, loss_diff, bits)
    lines = [
        "# Validation: the simulator against real torch.distributed processes",
        "",
        f"Written by `python {' '.join(['scripts/write_validation.py'] + (argv or sys.argv[1:]))}` on "
        f"{datetime.date.today()} (torch {torch.__version__}, Python {platform.python_version()}, "
        f"{time.perf_counter() - started:.0f} s).",
        "",
        f"Task `{args.task}`, {args.steps} steps, seed 0, SGD lr 0.05 with momentum 0.9, each compressor with its",
        "defaults (PowerSGD rank 2). `sim.run` (one process, `VirtualCollective`) against `sim.run_distributed`",
        "on 2 gloo processes (CPU): W = 2 is one worker per process, W = 4 is two emulated workers per process.",
        "Difference: max over tensors of max|real - sim| / max|sim| of the final parameters. Bits: the",
        "per-step ledger totals are identical.",
        "",
        "| compressor | all-reduce only | W=2 (2 x 1) param diff | W=4 (2 x 2) param diff | final loss diff W=2 / W=4 | bits equal |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        two, four = by_name[name][2], by_name[name][4]
        lines.append(f"| {name} | {'yes' if two[0] else 'no (all-gather)'} | {two[1]:.1e} | {four[1]:.1e} | "
                     f"{two[2]:.1e} / {four[2]:.1e} | {'yes' if two[3] and four[3] else 'NO'} |")
    lines += [
        "",
        "Why W = 2 is exact and W = 4 is not: the real mean is a local row sum, one SUM all-reduce, then a",
        "division; with one row per process and two processes that is (x0 + x1) / 2, the simulator's",
        "`x.sum(0) / 2` exactly (IEEE addition commutes). With four workers the additions are grouped",
        "(x0 + x1) + (x2 + x3) instead of torch's own order: float32 rounding per step, which training carries",
        "along. The remaining W = 2 differences, where not 0, are last-bit differences of batched matmuls over",
        "(2, ...) rows in one process vs (1, ...) rows per process.",
        "The loss column differs at W = 2 although the parameters agree: a process averages its metric over",
        "processes in float64 (`average_metric`), the simulator over its rows in float32.",
        "",
        "## NCCL and GPUs",
        "",
        "NCCL is the same code path: `DistributedCollective` issues the same `all_reduce` / `all_gather_single`",
        "calls on any backend (CPU tensors are staged through the current GPU under NCCL), and the DDP hook and",
        "`sim.run_distributed(..., backend=\"nccl\")` only pick the backend. No GPU was available when this report was written, so nothing",
        "here was run on CUDA or NCCL; CI has no GPU either, and no test requires one.",
        "",
        "## Covered by the test suite (`pytest -m distributed`)",
        "",
        "- `tests/test_distributed_collective.py`: the real mean is bitwise the virtual one for W = 2 (fp32,",
        "  fp64, fp16, bf16); every registered compressor aggregates like the simulator with 2 x 2 emulated",
        "  workers; identical ledgers; a hung peer and a dead peer raise `CollectiveError` within the timeout;",
        "  a killed process or a hung run ends `spawn` with `DistributedRunError`.",
        "- `tests/test_distributed_hook.py`: DDP + identity hook == DDP without a hook (bitwise); every",
        "  compressor through the hook with several buckets == the simulator (fp32, fp16, bf16); our PowerSGD",
        "  hook sends the same elements per step as torch's `powerSGD_hook` and reaches a comparable loss;",
        "  100 steps with many buckets on gloo; hook state save/load resumes bitwise.",
        "- `tests/test_distributed_package.py`: the `powersgd` package's README loop, with or without",
        "  `zero_grad`, in one process and under torch.distributed, against the simulator's aggregator.",
        "- `tests/test_distributed_run.py`: `sim.run_distributed` vs `sim.run` for every all-reducible",
        "  compressor (W = 2, 30 steps, 1e-6) and with emulated workers (W = 4).",
        "",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
