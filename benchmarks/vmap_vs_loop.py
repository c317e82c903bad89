"""``vmap_vs_loop_speedup_w16``: the vectorized engine (torch.func vmap over the worker axis) over the loop
engine (one autograd call per worker), on the same per-worker gradients at W = 16.

Measured on ``engine.gradients`` alone (both engines return identical (W, *shape) gradients; the rest of a
step is shared), for the default task ``digits-mlp`` and ``digits-cnn``; the metric keys on the worse.
``default_engine_vs_loop_speedup_w16`` (below): the default engine ("auto") against the loop on every built-in task.
"""
from __future__ import annotations

import torch

import sim
from .timing import fmt_ms, interleaved, median, ratio_of_medians, table

TASKS = ("digits-mlp", "digits-cnn")
WORKERS = 16
BATCH = 32


def measure(task: str, repeats: int) -> dict[str, float]:
    fns = {}
    for engine in ("vmap", "loop"):
        s = sim.Simulation(sim.Experiment(task=task, workers=WORKERS, batch_size=BATCH, engine=engine, seed=0))
        state = s.initial_state()
        indices = s.sampler.batch(s.local_workers, 0)  # (W, B)
        x, y = s.task.train_x[indices], s.task.train_y[indices]
        fns[engine] = (lambda s=s, state=state, x=x, y=y: s.engine.gradients(state.params, state.buffers, x, y))
    a, b = fns["vmap"](), fns["loop"]()
    for name in a[0]:  # the pair computes the same thing (up to summation order)
        torch.testing.assert_close(a[0][name], b[0][name], rtol=1e-4, atol=1e-5)
    samples = interleaved(fns, repeats=repeats, warmup=1)
    return {"vmap_s": median(samples["vmap"]), "loop_s": median(samples["loop"]),
            "speedup": ratio_of_medians(samples, "loop", "vmap")}


def run(quick: bool = False):
    metrics, tables = run_vmap(quick)
    found, text = run_default(quick)
    metrics.update(found)
    tables.update(text)
    return metrics, tables


def run_vmap(quick: bool = False):
    metrics, rows = {}, []
    for task in TASKS:
        r = measure(task, 3 if quick else 7)
        metrics[f"vmap_vs_loop_speedup_w16_{task}"] = round(r["speedup"], 2)
        rows.append([task, WORKERS, fmt_ms(r["vmap_s"]), fmt_ms(r["loop_s"]), f"{r['speedup']:.1f}x"])
        print(f"  vmap vs loop {task}: vmap {fmt_ms(r['vmap_s'])}, loop {fmt_ms(r['loop_s'])}, "
              f"speedup {r['speedup']:.1f}x", flush=True)
    metrics["vmap_vs_loop_speedup_w16"] = min(metrics[f"vmap_vs_loop_speedup_w16_{t}"] for t in TASKS)
    text = table(["task", "W", "vmap engine", "loop engine", "speedup (median of rounds)"], rows)
    return metrics, {"vmap_vs_loop": text}


#: ``default_engine_vs_loop_speedup_w16``: the default engine (``engine="auto"``) over the loop engine on every
#: built-in task whose data is on this machine. Where "auto" resolves to the loop the two are one engine (1.0 by
#: construction, not timed). The metric keys on the worst task; target >= 0.95 ("the default never loses").
def default_vs_loop(quick: bool = False) -> tuple[dict[str, float], list[list[str]]]:
    from sim.engine import resolve_engine
    from sim.tasks import TASK_REGISTRY

    metrics, rows = {}, []
    for task in TASK_REGISTRY:
        try:
            s = sim.Simulation(sim.Experiment(task=task, workers=WORKERS, batch_size=BATCH, seed=0))
        except ValueError as error:  # a dataset that is not on this machine (cifar10, wikitext2 need data_dir)
            rows.append([task, "-", "-", "-", f"not measured: {str(error).split(';')[0]}"])
            continue
        chosen = resolve_engine("auto", s.model)
        if chosen == "loop":
            speedup = 1.0
            rows.append([task, chosen, "-", "-", "1.00x (same engine)"])
        else:
            r = measure(task, 3 if quick else 7)
            speedup = r["speedup"]
            rows.append([task, chosen, fmt_ms(r["vmap_s"]), fmt_ms(r["loop_s"]), f"{speedup:.2f}x"])
        metrics[f"default_engine_vs_loop_speedup_w16_{task}"] = round(speedup, 2)
        print(f"  default ({chosen}) vs loop {task}: {speedup:.2f}x", flush=True)
    metrics["default_engine_vs_loop_speedup_w16"] = min(metrics.values())
    return metrics, rows


def run_default(quick: bool = False):
    metrics, rows = default_vs_loop(quick)
    text = table(["task", "auto picks", "default engine", "loop engine", "speedup (median of rounds)"], rows)
    return metrics, {"default_engine_vs_loop": text}
