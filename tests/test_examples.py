"""The examples/ folder runs as a user would run it: the script at tiny sizes, and its config from the command
line (`--import` registers the script's tasks that the config's `imports` names)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import sim

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_own_model_example_runs_and_reports_each_step():
    done = _run("examples/own_model.py", "--quick")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for marker in ("one run: test accuracy", "test accuracy by configuration and seed", "mean_diff", "ci_low",
                   "regression: test loss", "speedup"):
        assert marker in out, marker
    assert "Traceback" not in done.stderr


def test_own_model_config_runs_from_the_command_line(tmp_path, monkeypatch, capsys):
    from sim.cli.main import main

    monkeypatch.chdir(ROOT)  # module names resolve from the current directory, as for a user
    assert main(["run", "examples/own_model.toml", "--import", "examples.own_model", "--out", str(tmp_path / "out"), "--no-progress",
                 "--set", "steps=4", "--set", "task_options.samples=64", "--set", "eval_every=0"]) == 0
    table = sim.load_results(tmp_path / "out")
    assert len(table) == 4 and table.test_accuracy.notna().iloc[-1]
    assert main(["list", "tasks", "--import", "examples.own_model"]) == 0
    listed = capsys.readouterr().out
    assert "marked-token" in listed and "noisy-sine" in listed and "[from examples.own_model]" in listed
