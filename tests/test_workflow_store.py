"""Results directories: each run stored as it completes, reloaded as one table; a sweep killed with SIGKILL and
started again produces exactly the rows of an uninterrupted one and does not redo finished runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import sim
from sim.workflow.config import load_config
from sim.workflow.store import HISTORY, RECORD, ResultsStore, run_id
from sim.workflow.sweep import sweep_to_dir

ROOT = Path(__file__).resolve().parents[1]
BASE = sim.Experiment(task="synthetic-lowrank", workers=2, steps=6, batch_size=8, lr=0.1, eval_every=3,
                      task_options={"dim_in": 6, "dim_out": 4, "samples": 64, "test_samples": 16},
                      compressor={"name": "powersgd", "rank": 1})
GRID = {"compressor.rank": [1, 2], "compressor.warm_start": [True, False]}


def test_store_round_trip_and_provenance(tmp_path):
    result = sim.run(BASE)
    folder = ResultsStore(tmp_path).write(BASE, result, {"compressor.rank": 1, "seed": 0}, index=0)
    record = json.loads((folder / RECORD).read_text())
    assert record["config"]["compressor"] == {"name": "powersgd", "rank": 1}
    assert record["seed"] == 0 and record["run_id"] == folder.name == run_id(BASE)
    assert record["versions"]["torch"].startswith("2.") and record["versions"]["python"]
    assert "commit" in record["git"]
    assert record["summary"]["rows"] == len(result.history) == 6
    table = sim.load_results(tmp_path)
    pd.testing.assert_frame_equal(table[list(result.history.columns)], result.history, check_exact=True)
    assert (table["compressor.rank"] == 1).all() and (table["run"] == "rank=1").all()
    assert (table["run_id"] == folder.name).all()
    assert sim.Experiment(**{k: (tuple(v) if k == "lr_milestones" else v)
                             for k, v in record["config"].items()}) == BASE  # the record rebuilds the run


def test_run_id_depends_on_everything_that_defines_a_run():
    ids = {run_id(BASE), run_id(BASE.replace(seed=1)), run_id(BASE.with_overrides({"compressor.rank": 2})),
           run_id(BASE.replace(lr=0.2)), run_id(BASE.with_overrides({"task_options.dim_in": 7}))}
    assert len(ids) == 5
    assert run_id(BASE) == run_id(BASE.replace())  # and only on that


def test_incomplete_runs_are_ignored_and_redone(tmp_path):
    store = ResultsStore(tmp_path)
    experiment = BASE.replace(steps=2)
    folder = store.folder(experiment)
    folder.mkdir(parents=True)
    (folder / HISTORY).write_text("step,train_loss\n1,nan\n")  # killed before its record was written
    (folder / f".{RECORD}.abc.json").write_text("{")  # a temporary file of an interrupted atomic write
    assert not store.is_complete(experiment) and sim.load_results(tmp_path).empty
    with pytest.raises(ValueError, match="not a directory"):
        sim.load_results(tmp_path / "typo")
    table = sweep_to_dir(experiment, tmp_path, progress=False)
    assert store.is_complete(experiment) and len(table) == 2 and table["train_loss"].notna().all()
    (folder / RECORD).write_text(json.dumps({"config": {"other": 1}}))  # a record of another config: redo
    assert not store.is_complete(experiment)


def test_sweep_to_dir_matches_in_memory_sweep_and_skips_complete_runs(tmp_path):
    table = sweep_to_dir(BASE, tmp_path, grid=GRID, seeds=[0, 1], progress=False)
    reference = sim.sweep(BASE, grid=GRID, seeds=[0, 1], progress=False)
    assert len(table) == len(reference) == 4 * 2 * 6
    for column in ["step", "train_loss", "test_loss", "bits", "compression_error", "seed"] + list(GRID):
        pd.testing.assert_series_equal(table[column], reference[column], check_exact=True, check_dtype=False)
    assert table["run"].nunique() == 4 and table["run_id"].nunique() == 8
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/record.json")}
    messages = []
    again = sweep_to_dir(BASE, tmp_path, grid=GRID, seeds=[0, 1], progress=False, log=messages.append)
    pd.testing.assert_frame_equal(again, table, check_exact=True)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/record.json")} == stamps
    assert messages == [f"8 of 8 runs already complete in {tmp_path / 'runs'}: skipping them"]


# -- the command line, killed with SIGKILL ---------------------------------------------------------------------
SWEEP_TOML = """
task = "synthetic-lowrank"
workers = 2
steps = {steps}
batch_size = 8
lr = 0.1
eval_every = 20
[task_options]
dim_in = 12
dim_out = 6
samples = 128
test_samples = 32
[compressor]
name = "powersgd"
rank = 1
"""


def cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "sim", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def sweep_args(config: Path, out: Path) -> list[str]:
    return ["sweep", str(config), "--grid", "compressor.rank=1,2", "--grid", "compressor.warm_start=true,false",
            "--seeds", "0", "--out", str(out), "--no-progress"]


def test_sweep_killed_with_sigkill_then_restarted_gives_the_uninterrupted_rows(tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text(SWEEP_TOML.format(steps=60))
    killed = tmp_path / "killed"
    process = cli(*sweep_args(config, killed))
    deadline = time.monotonic() + 120
    while not list(killed.glob("runs/*/record.json")):  # wait for the first finished run, then SIGKILL
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no run finished within 120 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    finished = {p: p.read_bytes() for p in killed.glob("runs/*/record.json")}
    assert 1 <= len(finished) < 4, "the sweep must be interrupted part-way for this test to mean anything"

    restarted = cli(*sweep_args(config, killed))
    out, err = restarted.communicate(timeout=300)
    assert restarted.returncode == 0, err
    assert f"{len(finished)} of 4 runs already complete" in out
    assert {p: p.read_bytes() for p in finished} == finished  # finished runs were not redone

    uninterrupted = tmp_path / "uninterrupted"
    base = load_config(config).experiment
    sweep_to_dir(base, uninterrupted, grid={"compressor.rank": [1, 2], "compressor.warm_start": [True, False]},
                 seeds=[0], progress=False)
    resumed, reference = sim.load_results(killed), sim.load_results(uninterrupted)
    assert len(reference) == 4 * 60
    pd.testing.assert_frame_equal(resumed, reference, check_exact=True)


def test_cli_run_and_bad_input(tmp_path, capsys):
    from sim.cli.main import main

    config = tmp_path / "one.toml"
    config.write_text(SWEEP_TOML.format(steps=3))
    assert main(["run", str(config), "--out", str(tmp_path / "one"), "--set", "compressor.rank=2", "--no-progress"]) == 0
    assert "results in" in capsys.readouterr().out
    table = sim.load_results(tmp_path / "one")
    # a 6 x 12 matrix at rank 2 compresses 2.0x, not above min_compression_rate=2: it is sent dense, and says so
    assert len(table) == 3 and table["run"].unique().tolist() == ["powersgd(rank=2) (dense)"]
    assert main(["sweep", str(config), "--grid", "compressor.rnak=1,2", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "rnak" in err and "did you mean 'rank'" in err
    assert main(["sweep", str(config), "--grid", "compressor.rank=1,0", "--out", str(tmp_path / "bad")]) == 2
    assert "rank=0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # validated before any run
