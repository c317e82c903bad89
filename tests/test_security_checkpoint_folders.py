"""Checkpoint folders hold untrusted names: only regular files named with ASCII digits, of a step within the run,
are candidates (a FIFO never blocks a resume); pruning and resuming never delete the newest valid checkpoint;
new files are never written through a planted symbolic link; JSON nesting is bounded."""
from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import pytest

import sim
from reference import CHECKPOINTED as EXPERIMENT
from sim import checkpoint
from sim.workflow.config import load_config
from sim.workflow.store import read_record
from sim.workflow.sweep import resume_options




@pytest.fixture
def deadline():
    """Fail (instead of hanging the suite) if the test blocks for 60 s."""
    def expired(*_):
        raise TimeoutError("blocked: a read waited on a FIFO")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_fifo_named_like_the_newest_checkpoint_does_not_hang_resume(copy, deadline):
    newest = copy / "checkpoint-000000006.pt"
    newest.unlink()
    os.mkfifo(newest)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a candidate: no warning about it
        assert checkpoint.load(copy, EXPERIMENT).step == 4
    with pytest.raises(ValueError, match="allowed: an existing checkpoint file"):
        checkpoint.load(newest, EXPERIMENT)
    with pytest.raises(ValueError, match="not a regular file"):
        checkpoint.read(newest, EXPERIMENT)


def test_names_with_non_ascii_digits_or_steps_beyond_the_run_are_not_candidates(copy):
    (copy / "checkpoint-\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0669.pt").write_bytes(b"junk")  # Arabic-Indic 9
    (copy / "checkpoint-999999999.pt").write_bytes(b"junk")
    (copy / "checkpoint-000000005.pt").mkdir()  # a folder
    os.symlink(copy / "checkpoint-000000004.pt", copy / "checkpoint-000000003.pt")  # a link
    assert [s for s, _ in checkpoint.checkpoints(copy, range(2), 2, steps=EXPERIMENT.steps)] == [4, 6]
    assert checkpoint.latest(copy, workers=2, steps=EXPERIMENT.steps).name == "checkpoint-000000006.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checkpoint.load(copy, EXPERIMENT).step == 6


def test_far_future_junk_never_makes_pruning_delete_valid_checkpoints(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    junk = [directory / "checkpoint-999999999.pt", directory / "checkpoint-999999998.pt"]
    sim.run(EXPERIMENT, checkpoint_dir=directory, checkpoint_every=2)  # claims the folder (experiment.json)
    for path in junk:
        path.write_bytes(b"not a checkpoint")
    sim.run(EXPERIMENT, checkpoint_dir=directory, checkpoint_every=2)  # writes 2, 4, 6 again, pruning each time
    steps = [s for s, _ in checkpoint.checkpoints(directory, range(2), 2)]
    assert 6 in steps and 4 in steps, steps
    assert all(p.exists() for p in junk)  # files of later steps are never touched either
    assert checkpoint.load(directory, EXPERIMENT).step == 6


def test_the_sweep_resume_never_deletes_a_valid_checkpoint(copy, capsys):
    (copy / "checkpoint-000000006.pt").write_bytes(b"corrupt newest")
    options = resume_options(EXPERIMENT, copy, 2, log=print)
    assert Path(options["resume_from"]).name == "checkpoint-000000004.pt"
    assert (copy / "checkpoint-000000004.pt").exists() and (copy / "checkpoint-000000006.pt").exists()
    assert "checkpoint-000000006.pt" in capsys.readouterr().out  # reported, not deleted


def test_a_folder_with_no_resumable_checkpoint_is_kept_aside(copy):
    for name in ("checkpoint-000000004.pt", "checkpoint-000000006.pt"):
        (copy / name).write_bytes(b"corrupt")
    options = resume_options(EXPERIMENT, copy, 2)
    assert "resume_from" not in options and not copy.exists()
    aside = copy.with_name("ckpt.unusable-1")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-000000004.pt", "checkpoint-000000006.pt",
                                                       "experiment.json"]


def test_temporary_files_never_follow_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    directory = tmp_path / "ckpt"
    directory.mkdir()
    pid = os.getpid()
    for name in (f".checkpoint-000000002.pt.{pid}.tmp", f".experiment.json.{pid}.tmp", f".write-probe.{pid}.tmp"):
        os.symlink(victim, directory / name)
    sim.run(EXPERIMENT, checkpoint_dir=directory, checkpoint_every=2)
    assert victim.read_text() == "precious"
    assert checkpoint.load(directory, EXPERIMENT).step == 6


def test_a_deeply_nested_manifest_is_a_value_error(copy):
    (copy / checkpoint.MANIFEST).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match="nested deeper than"):
        sim.run(EXPERIMENT, checkpoint_dir=copy, checkpoint_every=2)
    with pytest.raises(ValueError, match="nested deeper than"):
        checkpoint.load(copy, EXPERIMENT)


def test_deeply_nested_configs_and_records_are_refused_or_skipped(tmp_path):
    deep = "[" * 200_000 + "]" * 200_000
    (tmp_path / "c.json").write_text('{"task": ' + deep + "}")
    with pytest.raises(ValueError, match="nested deeper than"):
        load_config(tmp_path / "c.json")
    (tmp_path / "c.toml").write_text("task = " + deep + "\n")
    with pytest.raises(ValueError, match="config: cannot parse"):
        load_config(tmp_path / "c.toml")
    run = tmp_path / "run"
    run.mkdir()
    (run / "record.json").write_text('{"config": ' + deep + "}")
    assert read_record(run) is None  # an incomplete run, not a RecursionError
    (tmp_path / "net.json").write_text(deep)
    with pytest.raises(ValueError, match="network=.* is invalid.*nested deeper than"):
        sim.Experiment(task="synthetic-lowrank", network=str(tmp_path / "net.json"))
