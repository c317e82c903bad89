"""Sweeps on an executor (anything whose submit(fn, *args) returns a future with .result()): the same results
directory and table as a serial sweep, resumable, a failed run named with its cause while the others finish;
slices of a sweep (--shard i/n) merged by load_results; concurrent.futures, Dask distributed and submitit."""
from __future__ import annotations

import concurrent.futures
import json
import os
from pathlib import Path

import pytest

import sim
from reference import SPEC_BASE_OPTIONS, SPEC_CONFIG
from sim.cli.main import main
from sim.workflow import sweep as sweep_module
from sim.workflow.store import CHECKPOINTS, RECORD, ResultsStore
from sim.workflow.sweep import SweepError, check_shard

ROOT = Path(__file__).resolve().parents[1]
BASE = sim.Experiment(**SPEC_BASE_OPTIONS)
GRID = {"compressor": ["identity", "powersgd:rank=2"]}
TOML = SPEC_CONFIG


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    return sim.sweep(BASE, grid=GRID, seeds=[0, 1], progress=False, out=tmp_path_factory.mktemp("serial"))


def finished_at(root: Path) -> dict[str, str]:
    return {p.parent.name: json.loads(p.read_text())["finished_at"] for p in (root / "runs").glob(f"*/{RECORD}")}


class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    submitted = 0

    def submit(self, fn, *args, **kwargs):
        CountingExecutor.submitted += 1
        return super().submit(fn, *args, **kwargs)


def test_any_executor_fills_the_same_directory_and_resumes(serial, tmp_path):
    with CountingExecutor(2) as executor:
        table = sim.sweep(BASE, grid=GRID, seeds=[0, 1], progress=False, out=tmp_path, executor=executor)
    assert CountingExecutor.submitted == 4
    assert table.equals(serial)  # row for row the serial sweep, labels included
    assert sim.compare(table, baseline="identity", metric="train_loss")["n"].tolist() == [2]
    stored = finished_at(tmp_path)
    with CountingExecutor(2) as executor:  # started again: every run is found complete and kept
        again = sim.sweep(BASE, grid=GRID, seeds=[0, 1], progress=False, out=tmp_path, executor=executor)
    assert again.equals(serial) and finished_at(tmp_path) == stored


def test_a_job_resumes_the_run_in_progress_from_its_checkpoint(serial, tmp_path, monkeypatch):
    experiment = BASE.with_overrides({"compressor": "powersgd:rank=2", "seed": 1})
    partial = ResultsStore(tmp_path).folder(experiment) / CHECKPOINTS
    # an interrupted job left checkpoints (steps 2 and 4) in its run folder, and no record
    sim.run(experiment, checkpoint_dir=partial, checkpoint_every=2)
    calls = []
    original = sweep_module.run

    def spy(e, **options):
        calls.append(options.get("resume_from"))
        return original(e, **options)

    monkeypatch.setattr(sweep_module, "run", spy)
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        table = sim.sweep(BASE, grid=GRID, seeds=[0, 1], progress=False, out=tmp_path, executor=executor,
                          checkpoint_every=2)
    assert table.equals(serial) and not partial.exists()  # stored, checkpoints superseded
    assert sum(c is not None for c in calls) == 1 and calls.count(None) == 3  # only that run resumed


def test_in_memory_sweep_on_an_executor_is_the_serial_table():
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        table = sim.sweep(BASE, grid=GRID, seeds=[0], progress=False, executor=executor)
    assert table.equals(sim.sweep(BASE, grid=GRID, seeds=[0], progress=False))


def test_a_failed_run_is_named_with_its_cause_and_the_others_are_stored(tmp_path):
    grid = {"lr": [0.1, 1e30]}  # lr=1e30 overflows on its first step
    with concurrent.futures.ThreadPoolExecutor(2) as executor, pytest.raises(SweepError) as caught:
        sim.sweep(BASE, grid=grid, seeds=[0, 1], progress=False, out=tmp_path, executor=executor)
    message = str(caught.value)
    assert "2 of 4 runs failed" in message and "lr=1e+30, seed 0" in message and "lr=1e+30, seed 1" in message
    assert "NonFiniteGradientError" in message and "lr=0.1" not in message
    assert [name for name, _ in caught.value.failures] and len(caught.value.failures) == 2
    assert sorted(sim.load_results(tmp_path)["run"].unique()) == ["lr=0.1"]  # the others finished and are stored


def test_shards_partition_the_runs_and_load_results_merges_them(serial, tmp_path):
    slices = [sim.sweep(BASE, grid=GRID, seeds=[0, 1], progress=False, out=tmp_path / f"s{i}", shard=f"{i}/3")
              for i in (1, 2, 3)]
    assert [t.run_id.nunique() for t in slices] == [2, 1, 1]
    merged = sim.load_results([tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"])
    assert merged.equals(serial)  # in sweep order, as one directory would give
    in_memory = sim.sweep(BASE, grid=GRID, seeds=[0, 1], progress=False, shard=(2, 3))
    assert in_memory[["label", "seed"]].drop_duplicates().values.tolist() == [["identity", 1]]


@pytest.mark.parametrize("shard", ["0/2", "3/2", "1-2", (1,), "a/b", (True, 2)])
def test_bad_shards_are_refused(shard):
    with pytest.raises(ValueError, match=r"shard=.* is invalid; allowed: None, 'i/n' or \(i, n\) with 1 <= i <= n"):
        check_shard(shard)


def test_bad_executors_are_refused_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="executor=.* is invalid; allowed: None or an object whose submit"):
        sim.sweep(BASE, grid=GRID, executor=object(), out=tmp_path / "x")
    with concurrent.futures.ThreadPoolExecutor(1) as executor, pytest.raises(ValueError, match="processes=2"):
        sim.sweep(BASE, grid=GRID, executor=executor, processes=2)
    with pytest.raises(ValueError, match="load_results: root=\\[\\] is invalid"):
        sim.load_results([])
    assert not (tmp_path / "x").exists()


def test_cli_shard_and_bad_shard(serial, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(TOML)
    for i in (1, 2):
        assert main(["sweep", str(config), "--grid", "compressor=identity,powersgd:rank=2", "--seeds", "0,1",
                     "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}"), "--no-progress"]) == 0
    assert sim.load_results([tmp_path / "s1", tmp_path / "s2"]).equals(serial)
    capsys.readouterr()
    assert main(["sweep", str(config), "--shard", "3/2", "--out", str(tmp_path / "bad")]) == 2
    assert "shard='3/2' is invalid" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["sweep", str(config), "--processes", "0", "--out", str(tmp_path / "bad")])
    assert exited.value.code == 2 and "--processes: '0' is not a whole number >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # fresh interpreters that import torch: tens of seconds on 2 cores
def test_cli_processes(serial, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(TOML)
    assert main(["sweep", str(config), "--grid", "compressor=identity,powersgd:rank=2", "--seeds", "0,1",
                 "--processes", "2", "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    assert sim.load_results(tmp_path / "p").equals(serial)


@pytest.mark.slow  # fresh interpreters that import torch: tens of seconds on 2 cores
def test_dask_local_cluster(serial, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        table = sim.sweep(BASE, grid=GRID, seeds=[0, 1], progress=False, out=tmp_path, executor=client)
    assert table.equals(serial)


@pytest.mark.slow  # fresh interpreters that import torch: tens of seconds on 2 cores
def test_submitit_local_executor(serial, tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    # a job is a fresh `python -m submitit...` process: it imports this checkout of the project
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=10)
    table = sim.sweep(BASE, grid=GRID, seeds=[0, 1], progress=False, out=tmp_path / "out", executor=executor)
    assert table.equals(serial)
