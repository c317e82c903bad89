"""Does compression pay on a real slow link? Real gloo ranks over a shaped loopback (docs/shaped_link.md), side
by side with the forecast (``sim.forecast``) of the same run.

For each model x ranks x link: the link is calibrated once (``sim.real.calibrate`` over it), then for exact
all-reduce, PowerSGD rank 1/2/4 and top-k at rank 2's bits: the real wall-clock time to the target accuracy and
per step (``sim.run_distributed(link=...)``), and the forecast's prediction of both. The per-collective cost
inside a running loop (``Network.sync``, docs/cost_model.md) is fitted per number of ranks on the PowerSGD rank 4
runs only (``sim.real.forecast.fit_sync``): runs whose link time is negligible, so the fit is not mixed up with
the bandwidth model's error on large messages; every other configuration is held out and judges the forecast.
Every run's components are written to ``benchmarks/shaped_link_runs.csv`` (a fit can be redone from them).
Keys:

- ``forecast_time_to_accuracy_max_rel_error``: the largest |predicted - measured| / measured time to target
  over the held-out configurations that reached it (target <= 0.20); ``..._no_sync``: the same without the
  sync term (reported);
- ``real_link_speedup_powersgd_r2_100mbit``: exact's real time to target over PowerSGD rank 2's, on
  fashion-mnist-mlp, 2 ranks, 100 Mbit/s; ``..._forecast``: the same ratio of the forecasts.

Without root or iproute2 nothing is run and the table says why. Timing needs a quiet machine: ranks share its
cores with each other and with anything else running.
"""
from __future__ import annotations

import math
import os

import pandas as pd

import compressors
import sim
from sim.models import build
from sim.real.calibrate import calibrate, sizes_for
from sim.real.forecast import fit_sync
from sim.real.link import missing_requirements
from sim.tasks import load_task
from .timing import table

MODELS = {"fashion-mnist-mlp": {}, "fashion-mnist-mlp-512x512": {"hidden": [512, 512]}}
TARGET = 0.70  # test accuracy every configuration reaches within STEPS (PowerSGD rank 1 last, near step 220)
STEPS, EVAL_EVERY, BATCH, LR, WARMUP = 300, 10, 64, 0.05, 20
FIT = "powersgd r4"  # the configuration Network.sync is fitted on; the others are held out
RUNS_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shaped_link_runs.csv")


def shapes_of(task_options: dict) -> dict[str, tuple[int, ...]]:
    task = load_task("fashion-mnist-mlp", dict(task_options), sim.Experiment().torch_dtype)
    return {name: tuple(p.shape) for name, p in build(task.model, 0).named_parameters()}


def compressor_specs(task_options: dict) -> dict[str, dict]:
    shapes = shapes_of(task_options)
    rank2_bits = compressors.make("powersgd", rank=2).bits_per_step(shapes)
    topk = compressors.match_bits("topk", shapes, rank2_bits, error_feedback="local")  # as PowerSGD
    return {"exact": {"name": "identity"}, "powersgd r1": {"name": "powersgd", "rank": 1},
            "powersgd r2": {"name": "powersgd", "rank": 2}, "powersgd r4": {"name": "powersgd", "rank": 4},
            "top-k at r2's bits": {"name": "topk", **topk}}


def experiment(task_options: dict, compressor: dict, workers: int) -> sim.Experiment:
    return sim.Experiment(task="fashion-mnist-mlp", task_options=task_options, workers=workers, steps=STEPS,
                          batch_size=BATCH, lr=LR, lr_warmup_steps=WARMUP, momentum=0.9, eval_every=EVAL_EVERY,
                          compression_error_every=0, nonfinite="skip_step", compressor=compressor, seed=0)


def grid(quick: bool):
    if quick:
        return [("fashion-mnist-mlp", 2, "100mbit", ("exact", "powersgd r2"))]
    names = ("exact", "powersgd r1", "powersgd r2", "powersgd r4", "top-k at r2's bits")
    return [(model, nproc, link, names) for model in MODELS for nproc in (2, 4) for link in ("100mbit", "1gbit")]


def measure(quick: bool) -> dict:
    """(model, nproc, link, name) -> the measured Forecast (its network's sync 0)."""
    found = {}
    for model, nproc, link, names in grid(quick):
        options = MODELS[model]
        network = calibrate((nproc,), "gloo", sizes_for(link), link=link).networks[nproc]
        specs = compressor_specs(options)
        for name in names:
            found[model, nproc, link, name] = sim.forecast(experiment(options, specs[name], nproc), TARGET,
                                                           link=link, nproc=nproc, network=network, measure=True)
            f = found[model, nproc, link, name]
            print(f"  {model} {nproc} {link} {name}: real {f.measured_step_seconds * 1e3:.1f} ms/step, forecast "
                  f"{f.step_seconds * 1e3:.1f} (no sync), {f.collectives} collectives", flush=True)
    return found


def largest_error(forecasts) -> float | None:
    errors = [abs(f.relative_error) for f in forecasts if f.relative_error is not None]
    return round(max(errors), 3) if errors else None


def run(quick: bool = False):
    missing = missing_requirements()
    if missing:
        reason = "not run: a shaped link needs " + " and ".join(missing)
        print("  " + reason, flush=True)
        return {}, {"shaped_link": reason}
    raw = measure(quick)
    pd.DataFrame([{"model": m, "nproc": p, "link": l, "compressor": n, "steps_to_target_sim": f.steps_to_target,
                   "steps_to_target_real": f.real_steps_to_target, "compute_seconds": f.compute_seconds,
                   "comm_seconds_without_sync": f.comm_seconds, "collectives": f.collectives,
                   "eval_seconds": f.eval_seconds, "evaluations_to_target": f.evaluations_to_target,
                   "measured_step_seconds": f.measured_step_seconds, "measured_seconds": f.measured_seconds}
                  for (m, p, l, n), f in raw.items()]).to_csv(RUNS_CSV, index=False)
    syncs = {nproc: fit_sync([f for (_, p, _, name), f in raw.items() if p == nproc and name == FIT])
             for nproc in sorted({key[1] for key in raw})}
    found = {key: f.with_sync(syncs[key[1]]) for key, f in raw.items()}
    rows = []
    for (model, nproc, link, name), f in found.items():
        error = f.relative_error
        rows.append([model, nproc, link, name, "fit" if name == FIT else "held out",
                     f.steps_to_target, f.real_steps_to_target, f"{f.measured_step_seconds * 1e3:.1f}",
                     f"{f.step_seconds * 1e3:.1f}", f"{f.measured_seconds:.1f}", f"{f.predicted_seconds:.1f}",
                     "-" if error is None else f"{error:+.0%}"])
    held_out = [key for key in found if key[3] != FIT]
    metrics = {"forecast_sync_ms_per_collective_" + str(p): round(s * 1e3, 3) for p, s in syncs.items()}
    for key, forecasts in (("forecast_time_to_accuracy_max_rel_error", found),
                           ("forecast_time_to_accuracy_max_rel_error_no_sync", raw)):
        value = largest_error([forecasts[k] for k in held_out])
        if value is not None:
            metrics[key] = value
    exact, r2 = (found.get(("fashion-mnist-mlp", 2, "100mbit", n)) for n in ("exact", "powersgd r2"))
    if exact is not None and r2 is not None and math.isfinite(r2.measured_seconds):
        metrics["real_link_speedup_powersgd_r2_100mbit"] = round(exact.measured_seconds / r2.measured_seconds, 3)
        metrics["real_link_speedup_powersgd_r2_100mbit_forecast"] = round(
            exact.predicted_seconds / r2.predicted_seconds, 3)
    text = table(["model", "ranks", "link", "compressor", "sync", f"steps to {TARGET:.0%} (sim)", "(real)",
                  "real ms/step", "forecast ms/step", "real s to target", "forecast s to target",
                  "forecast error"], rows)
    print(text, flush=True)
    return metrics, {"shaped_link": text}
