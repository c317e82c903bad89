"""Does compression pay on a real slow link? Real gloo ranks over a shaped loopback (docs/shaped_link.md), side
by side with the forecast (``sim.forecast``) of the same run.

For each model x ranks x link: the link is calibrated once (``sim.real.calibrate`` over it), then for exact
all-reduce, PowerSGD rank 1/2/4 and top-k at rank 2's bits: the real wall-clock time to the target accuracy and
per step (``sim.run_distributed(link=...)``), and the forecast's prediction of both. Keys:

- ``forecast_time_to_accuracy_max_rel_error``: the largest |predicted - measured| / measured time to target
  over every configuration that reached it (target <= 0.20);
- ``real_link_speedup_powersgd_r2_100mbit``: exact's real time to target over PowerSGD rank 2's, on
  fashion-mnist-mlp, 2 ranks, 100 Mbit/s; ``..._forecast``: the same ratio of the forecasts.

Without root or iproute2 nothing is run and the table says why. Timing needs a quiet machine: ranks share its
cores with each other and with anything else running.
"""
from __future__ import annotations

import math

import compressors
import sim
from sim.models import build
from sim.real.calibrate import calibrate, sizes_for
from sim.real.link import missing_requirements
from sim.tasks import load_task
from .timing import table

MODELS = {"fashion-mnist-mlp": {}, "fashion-mnist-mlp-512x512": {"hidden": [512, 512]}}
TARGET = 0.75  # test accuracy every configuration reaches within STEPS on Fashion-MNIST
STEPS, EVAL_EVERY = 300, 10


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
                          batch_size=32, lr=0.1, momentum=0.9, eval_every=EVAL_EVERY, compression_error_every=0,
                          compressor=compressor, seed=0)


def grid(quick: bool):
    if quick:
        return [("fashion-mnist-mlp", 2, "100mbit", ("exact", "powersgd r2"))]
    names = ("exact", "powersgd r1", "powersgd r2", "powersgd r4", "top-k at r2's bits")
    return [(model, nproc, link, names) for model in MODELS for nproc in (2, 4) for link in ("100mbit", "1gbit")]


def run(quick: bool = False):
    missing = missing_requirements()
    if missing:
        reason = "not run: a shaped link needs " + " and ".join(missing)
        print("  " + reason, flush=True)
        return {}, {"shaped_link": reason}
    rows, errors, found = [], [], {}
    for model, nproc, link, names in grid(quick):
        options = MODELS[model]
        network = calibrate((nproc,), "gloo", sizes_for(link), link=link).networks[nproc]
        specs = compressor_specs(options)
        for name in names:
            f = sim.forecast(experiment(options, specs[name], nproc), TARGET, link=link, nproc=nproc,
                             network=network, measure=True)
            error = f.relative_error
            if error is not None:
                errors.append(abs(error))
            found[model, nproc, link, name] = f
            rows.append([model, nproc, link, name, f.steps_to_target, f"{f.measured_step_seconds * 1e3:.1f}",
                         f"{f.step_seconds * 1e3:.1f}", f"{f.measured_seconds:.1f}", f"{f.predicted_seconds:.1f}",
                         "-" if error is None else f"{error:+.0%}"])
            print("  " + " | ".join(str(c) for c in rows[-1]), flush=True)
    metrics = {}
    if errors:
        metrics["forecast_time_to_accuracy_max_rel_error"] = round(max(errors), 3)
    exact, r2 = (found.get(("fashion-mnist-mlp", 2, "100mbit", n)) for n in ("exact", "powersgd r2"))
    if exact is not None and r2 is not None and math.isfinite(r2.measured_seconds):
        metrics["real_link_speedup_powersgd_r2_100mbit"] = round(exact.measured_seconds / r2.measured_seconds, 3)
        metrics["real_link_speedup_powersgd_r2_100mbit_forecast"] = round(
            exact.predicted_seconds / r2.predicted_seconds, 3)
    text = table(["model", "ranks", "link", "compressor", f"steps to {TARGET:.0%}", "real ms/step",
                  "forecast ms/step", "real s to target", "forecast s to target", "forecast error"], rows)
    return metrics, {"shaped_link": text}
