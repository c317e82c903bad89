"""``sim_vs_real_speedup_w4``: ``sim.run`` over ``sim.run_distributed`` (gloo, 4 processes, one worker each)
on the same 200-step ``digits-mlp`` experiment (PowerSGD rank 2), wall time of the whole call each.

The real side pays for process start-up, process-group set-up and a real all-reduce per collective: what a
researcher waits for when confirming a simulated result on real processes. Both sides return the same
Result; their final parameters are compared (a sanity check that the pair did the same work).
"""
from __future__ import annotations

import sim
from .timing import fmt_ms, interleaved, median, ratio_of_medians, table

STEPS = 200
NPROC = 4


def experiment() -> sim.Experiment:
    return sim.Experiment(task="digits-mlp", workers=NPROC, steps=STEPS, batch_size=32,
                          compressor={"name": "powersgd", "rank": 2}, seed=0, eval_every=0)


def run(quick: bool = False):
    e = experiment()
    out = {}

    def simulated():
        out["sim"] = sim.run(e)

    def real():
        out["real"] = sim.run_distributed(e, nproc=NPROC, backend="gloo")

    samples = interleaved({"sim": simulated, "real": real}, repeats=2 if quick else 3, warmup=0)
    spread = max(float((out["sim"].params[n] - out["real"].params[n]).abs().max()) for n in out["sim"].params)
    speedup = ratio_of_medians(samples, "real", "sim")
    print(f"  sim vs real W={NPROC}: sim {fmt_ms(median(samples['sim']))}, real {fmt_ms(median(samples['real']))}, "
          f"speedup {speedup:.1f}x (max |param difference| {spread:.1e})", flush=True)
    metrics = {"sim_vs_real_speedup_w4": round(speedup, 2), "sim_vs_real_max_param_difference": spread}
    text = table(["experiment", "sim.run", f"sim.run_distributed (gloo, {NPROC} processes)", "speedup",
                  "max abs param difference"],
                 [[f"digits-mlp, W={NPROC}, {STEPS} steps, PowerSGD r=2", fmt_ms(median(samples["sim"])),
                   fmt_ms(median(samples["real"])), f"{speedup:.1f}x", f"{spread:.1e}"]])
    return metrics, {"sim_vs_real": text}
