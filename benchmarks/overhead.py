"""``sim_overhead_ratio_w16``: one simulated step over its floor, one plain autograd SGD step on the
concatenated W*B batch of the same model.

A simulated step must compute W per-worker gradients of B samples each: at least the work of one big-batch
backward pass. Everything above that (per-worker gradient materialisation, error feedback, PowerSGD, the
step's metrics) is the simulator's overhead. Both sides start from the same parameters and see the same
W*B samples; the simulated side is ``Simulation.step`` exactly as ``sim.run`` calls it (PowerSGD rank 2,
local error feedback, warm start, momentum 0.9, and the step's metrics).

The ratio falls with the per-worker batch B: the floor's work grows with W*B samples, the simulator's extra
passes over W per-worker copies of the parameters do not. The metric keys on B = 128, the PowerSGD paper's
per-worker batch; B = 32 is reported beside it. Each configuration runs in a fresh process, with the
allocator setting ``python -m sim`` uses (``sim.allocator.keep_freed_memory``) and, beside it, glibc's
default (which page-faults fresh 64 MB per-worker tensors in every step).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from torch.func import functional_call

import sim
from .timing import fmt_ms, interleaved, median, ratio_of_medians, table

#: The two models of the metric: the digits CNN (BatchNorm, conv) and a 4-hidden-layer 1024-wide MLP
#: (64 -> 1024 -> 1024 -> 1024 -> 1024 -> 10, 3.2 M parameters) on the same digits data.
MODELS = {
    "digits-cnn": {"task": "digits-cnn"},
    "mlp-4x1024": {"task": "digits-mlp", "task_options": {"hidden": (1024, 1024, 1024, 1024)}},
}
BATCH = 128  # per worker: the PowerSGD paper's (16 workers x 128 on CIFAR-10)
COMPRESSOR = {"name": "powersgd", "rank": 2, "error_feedback": "local"}


def experiment(model: str, workers: int, batch: int = BATCH, **changes) -> sim.Experiment:
    return sim.Experiment(workers=workers, steps=10_000, batch_size=batch, compressor=COMPRESSOR, seed=0,
                          eval_every=0, **MODELS[model], **changes)


class SimulatedStep:
    """Calls ``Simulation.step`` on a carried state, as ``sim.run`` does."""

    def __init__(self, e: sim.Experiment):
        self.simulation = sim.Simulation(e)
        self.state = self.simulation.initial_state()

    def __call__(self):
        self.state, _ = self.simulation.step(self.state)


class FloorStep:
    """One plain SGD step (torch.optim.SGD, same lr and momentum) on the concatenated W*B batch."""

    def __init__(self, simulation: sim.Simulation):
        self.simulation = simulation
        self.model = simulation.model
        self.params = {n: p.detach().clone().requires_grad_() for n, p in self.model.named_parameters()}
        self.buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        e = simulation.experiment
        self.optimizer = torch.optim.SGD(list(self.params.values()), lr=e.lr, momentum=e.momentum)
        self.step = 0

    def __call__(self):
        s = self.simulation
        indices = s.sampler.batch(s.local_workers, self.step).reshape(-1)  # (W*B,)
        x, y = s.task.train_x[indices], s.task.train_y[indices]
        self.model.train()
        loss = s.task.loss(functional_call(self.model, (self.params, self.buffers), (x,)), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1


def measure(model: str, workers: int, repeats: int, batch: int = BATCH) -> dict[str, float]:
    """In this process: the simulated step and its floor, interleaved."""
    simulated = SimulatedStep(experiment(model, workers, batch))
    floor = FloorStep(simulated.simulation)
    # two warm-up rounds: the heap grows to its steady size before anything is timed
    samples = interleaved({"sim": simulated, "floor": floor}, repeats=repeats, warmup=2)
    return {"sim_s": median(samples["sim"]), "floor_s": median(samples["floor"]),
            "ratio": ratio_of_medians(samples, "sim", "floor")}


def measure_in_fresh_process(model: str, workers: int, batch: int, allocator: str, repeats: int) -> dict:
    """``measure`` in a fresh Python process (the same intra-op threads as this one), so every configuration
    starts from a clean heap and the allocator setting applies to it alone: ``allocator`` is "keep-freed"
    (``sim.allocator.keep_freed_memory()``, what ``python -m sim`` runs with) or "default" (glibc as is)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [model, str(workers), str(batch), allocator, str(repeats), str(torch.get_num_threads())]
    out = subprocess.run([sys.executable, "-m", "benchmarks.overhead", *args], env=env, capture_output=True,
                         text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"overhead child {args} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


ALLOCATORS = ("keep-freed", "default")
#: (model, W, B, allocator) measured; the metric keys on B = 128 (the PowerSGD paper's per-worker batch, as
#: in tests/test_paper_models.py) with the allocator ``python -m sim`` uses. B = 32 and glibc's default
#: allocator are reported beside it. W = 256 at B = 128 is a 32,768-sample step: one round takes ~10 s.
#: The MLP stops at W = 16: at W = 64 a step holds ~5 GB of per-worker tensors and takes minutes on 2 cores.
SCAN = {"digits-cnn": (1, 4, 16, 64, 256), "mlp-4x1024": (1, 4, 16)}
SIDE = [(model, 16, batch, allocator) for model in MODELS for batch in (BATCH, 32) for allocator in ALLOCATORS
        if (batch, allocator) != (BATCH, "keep-freed")]


def _key(model: str, workers: int, batch: int, allocator: str) -> str:
    suffix = ("" if batch == BATCH else f"_b{batch}") + ("" if allocator == "keep-freed" else "_default_malloc")
    return f"sim_overhead_ratio_w{workers}_{model}{suffix}"


def run(quick: bool = False):
    configs = [(m, w, BATCH, "keep-freed") for m, ws in SCAN.items() for w in ws] + SIDE
    metrics, rows = {}, []
    for model, w, batch, allocator in configs:
        repeats = 3 if quick else (7 if w <= 16 else 3)
        r = measure_in_fresh_process(model, w, batch, allocator, repeats)
        shown = allocator if r["allocator_applied"] or allocator != "keep-freed" else "keep-freed (not glibc: default)"
        rows.append([model, w, batch, shown, fmt_ms(r["sim_s"]), fmt_ms(r["floor_s"]), f"{r['ratio']:.2f}"])
        metrics[_key(model, w, batch, allocator)] = round(r["ratio"], 3)
        print(f"  overhead {model} W={w} B={batch} {shown}: sim {fmt_ms(r['sim_s'])}, "
              f"floor {fmt_ms(r['floor_s'])}, ratio {r['ratio']:.2f}", flush=True)
    metrics["sim_overhead_ratio_w16"] = max(metrics[_key(m, 16, BATCH, "keep-freed")] for m in MODELS)
    text = table(["model", "W", "B per worker", "allocator", "simulated step", "floor (W*B batch SGD)",
                  "ratio (median of rounds)"], rows)
    return metrics, {"sim_overhead": text}


def _child(argv: list[str]) -> None:
    model, workers, batch, allocator, repeats, threads = argv
    torch.set_num_threads(int(threads))
    from sim.allocator import keep_freed_memory

    applied = keep_freed_memory() if allocator == "keep-freed" else False
    print(json.dumps({**measure(model, int(workers), int(repeats), int(batch)), "allocator_applied": applied}))


if __name__ == "__main__":
    _child(sys.argv[1:])
