"""``peak_rss_mb_w64``: peak resident memory of a 64-worker ``digits-cnn`` run (PowerSGD rank 2, local error
feedback), and bytes per simulated worker.

Each run is a fresh Python process (peak RSS is a per-process high-water mark). Bytes per worker is the
slope between a 1-worker and a 64-worker run of the same experiment: (peak(64) - peak(1)) / 63, which
removes the interpreter, torch and the data set from the figure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from .timing import table

STEPS = 20
CHILD = """
import json, resource, sys, sim
e = sim.Experiment(task="digits-cnn", workers=int(sys.argv[1]), steps={steps}, batch_size=32, seed=0,
                   compressor={{"name": "powersgd", "rank": 2, "error_feedback": "local"}}, eval_every=0)
sim.run(e)
print(json.dumps({{"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def peak_rss_mb(workers: int) -> float:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", CHILD.format(steps=STEPS), str(workers)], env=env, check=True,
                         capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_kb"] / 1024.0


def run(quick: bool = False):
    one, many = peak_rss_mb(1), peak_rss_mb(64)
    per_worker = (many - one) * 2**20 / 63
    print(f"  memory digits-cnn: peak RSS W=1 {one:.0f} MB, W=64 {many:.0f} MB, "
          f"{per_worker / 1e6:.2f} MB per simulated worker", flush=True)
    metrics = {"peak_rss_mb_w64": round(many, 1), "peak_rss_mb_w1": round(one, 1),
               "bytes_per_simulated_worker_w64": int(per_worker)}
    text = table(["run", "peak RSS W=1", "peak RSS W=64", "bytes per simulated worker"],
                 [[f"digits-cnn, {STEPS} steps, PowerSGD r=2 + EF", f"{one:.0f} MB", f"{many:.0f} MB",
                   f"{per_worker / 1e6:.2f} MB"]])
    return metrics, {"memory": text}
