"""``peak_rss_mb_w64``: peak resident memory of a 64-worker ``digits-cnn`` run (PowerSGD rank 2, local error
feedback), and bytes per simulated worker.

Each run is a fresh Python process whose live RSS is sampled every 2 ms during ``sim.run`` (the kernel's
high-water mark is already set by start-up, ~2 GB, and hides the run). Bytes per worker is the slope of
the run's own peak (peak during the run minus RSS before it) between a 1-worker and a 64-worker run:
(run(64) - run(1)) / 63.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from .timing import table

STEPS = 20
CHILD = """
import json, os, sys, threading, time, sim
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
e = sim.Experiment(task="digits-cnn", workers=int(sys.argv[1]), steps={steps}, batch_size=32, seed=0,
                   compressor={{"name": "powersgd", "rank": 2, "error_feedback": "local"}}, eval_every=0)
simulation = sim.Simulation(e)  # task data and model loaded: the run's own memory is measured from here
before, peak, done = rss(), [0], []
def sample():  # the process's high-water mark (ru_maxrss) is set by start-up; sample the live RSS instead
    while not done:
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
thread = threading.Thread(target=sample); thread.start()
sim.run(e, simulation=simulation)
done.append(1); thread.join()
print(json.dumps({{"peak_kb": max(peak[0], rss()) / 1024, "run_kb": (max(peak[0], rss()) - before) / 1024}}))
"""


def peak_rss_mb(workers: int) -> float:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", CHILD.format(steps=STEPS), str(workers)], env=env, check=True,
                         capture_output=True, text=True, timeout=600)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    return found["peak_kb"] / 1024.0, found["run_kb"] / 1024.0


def run(quick: bool = False):
    (one, one_run), (many, many_run) = peak_rss_mb(1), peak_rss_mb(64)
    per_worker = (many_run - one_run) * 2**20 / 63
    print(f"  memory digits-cnn: peak RSS W=1 {one:.0f} MB, W=64 {many:.0f} MB, "
          f"{per_worker / 1e6:.2f} MB per simulated worker", flush=True)
    metrics = {"peak_rss_mb_w64": round(many, 1), "peak_rss_mb_w1": round(one, 1),
               "run_rss_mb_w64": round(many_run, 1), "run_rss_mb_w1": round(one_run, 1),
               "bytes_per_simulated_worker_w64": int(per_worker)}
    text = table(["run", "peak RSS W=1", "peak RSS W=64", "bytes per simulated worker"],
                 [[f"digits-cnn, {STEPS} steps, PowerSGD r=2 + EF", f"{one:.0f} MB", f"{many:.0f} MB",
                   f"{per_worker / 1e6:.2f} MB"]])
    return metrics, {"memory": text}
