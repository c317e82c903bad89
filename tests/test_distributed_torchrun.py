"""torchrun as the launcher of real runs: `torchrun --nproc_per_node 2 -m sim.launch ...` stores the run that
`sim.run` computes in one process (two workers: sums of two commute exactly)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sim
from sim.workflow.config import load_config

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
CONFIG = """
task = "synthetic-lowrank"
workers = 2
steps = 5
batch_size = 8
lr = 0.05
eval_every = 0
compressor = "powersgd:rank=2"
[task_options]
dim_in = 16
dim_out = 8
samples = 128
test_samples = 32
"""


@pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_torchrun_two_processes_store_the_simulated_run(tmp_path):
    config = tmp_path / "exp.toml"
    config.write_text(CONFIG)
    torchrun = str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "sim.launch",
                           "--experiment", str(config), "--out", str(tmp_path / "real")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "results in" in done.stdout  # rank 0 stores the run; the other rank prints nothing
    real = sim.load_results(tmp_path / "real")
    virtual = sim.run(load_config(config).experiment)
    assert real["run"].unique().tolist() == ["powersgd(rank=2)"]
    assert real["train_loss"].tolist() == pytest.approx(virtual.history["train_loss"].tolist(), rel=1e-6)
    assert real["bits"].tolist() == virtual.history["bits"].tolist()
