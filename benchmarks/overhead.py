"""``sim_overhead_ratio_w16``: one simulated step over its floor, one plain autograd SGD step on the
concatenated W*B batch of the same model.

A simulated step must compute W per-worker gradients of B samples each: at least the work of one big-batch
backward pass. Everything above that (per-worker gradient materialisation, error feedback, PowerSGD, the
step's metrics) is the simulator's overhead. Both sides start from the same parameters and see the same
W*B samples; the simulated side is ``Simulation.step`` exactly as ``sim.run`` calls it (PowerSGD rank 2,
local error feedback, warm start, momentum 0.9, and the step's metrics).
"""
from __future__ import annotations

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
BATCH = 32
COMPRESSOR = {"name": "powersgd", "rank": 2, "error_feedback": "local"}


def experiment(model: str, workers: int, **changes) -> sim.Experiment:
    return sim.Experiment(workers=workers, steps=10_000, batch_size=BATCH, compressor=COMPRESSOR, seed=0,
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


def measure(model: str, workers: int, repeats: int) -> dict[str, float]:
    simulated = SimulatedStep(experiment(model, workers))
    floor = FloorStep(simulated.simulation)
    samples = interleaved({"sim": simulated, "floor": floor}, repeats=repeats, warmup=1)
    return {"sim_s": median(samples["sim"]), "floor_s": median(samples["floor"]),
            "ratio": ratio_of_medians(samples, "sim", "floor")}


#: Worker counts per model. The MLP stops at 16: at W = 64 a step holds ~5 GB of per-worker tensors and
#: takes minutes on 2 cores (make bench must stay near 10 minutes); W = 256 would need ~20 GB.
SCAN = {"digits-cnn": (1, 4, 16, 64, 256), "mlp-4x1024": (1, 4, 16)}


def run(quick: bool = False):
    metrics, rows = {}, []
    for model, ws in SCAN.items():
        for w in ws:
            repeats = 3 if quick else (7 if w <= 16 else 3)
            r = measure(model, w, repeats)
            rows.append([model, w, fmt_ms(r["sim_s"]), fmt_ms(r["floor_s"]), f"{r['ratio']:.2f}"])
            metrics[f"sim_overhead_ratio_w{w}_{model}"] = round(r["ratio"], 3)
            print(f"  overhead {model} W={w}: sim {fmt_ms(r['sim_s'])}, floor {fmt_ms(r['floor_s'])}, "
                  f"ratio {r['ratio']:.2f}", flush=True)
    metrics["sim_overhead_ratio_w16"] = max(metrics[f"sim_overhead_ratio_w16_{m}"] for m in MODELS)
    text = table(["model", "W", "simulated step", "floor (W*B batch SGD)", "ratio (median of rounds)"], rows)
    return metrics, {"sim_overhead": text}
