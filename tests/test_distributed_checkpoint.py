"""Checkpoint and resume of real multi-process runs (sim.run_distributed): every process writes its own workers'
checkpoints into one directory; a resumed run continues from the newest step every process holds and ends
bitwise where the uninterrupted run ends, also when the crash landed between two processes' writes."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

import sim
from sim import checkpoint
from sim.distributed import DistributedRunError

pytestmark = pytest.mark.distributed

EXPERIMENT = sim.Experiment(task="digits-mlp", workers=4, steps=6, batch_size=8, seed=3, eval_every=3,
                            task_options={"hidden": [16]},
                            compressor={"name": "powersgd", "rank": 1, "error_feedback": "local"})
NPROC = 2  # two workers per process


def _run(**options) -> sim.Result:
    return sim.run_distributed(EXPERIMENT, nproc=NPROC, backend="gloo", timeout=180, **options)


def _assert_same_run(a: sim.Result, b: sim.Result) -> None:
    pd.testing.assert_frame_equal(a.history, b.history, check_exact=True)
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name]), name
    for name in a.buffers:
        assert torch.equal(a.buffers[name], b.buffers[name]), name


def _files(directory) -> dict[str, list[int]]:
    return {str(w): [step for step, _ in checkpoint.checkpoints(directory, w, EXPERIMENT.workers)]
            for w in (range(0, 2), range(2, 4))}


def test_resume_after_a_crash_between_two_processes_writes_is_bitwise(tmp_path):
    uninterrupted = _run()
    full = _run(checkpoint_dir=tmp_path, checkpoint_every=2)
    _assert_same_run(uninterrupted, full)  # checkpointing itself changes nothing
    assert _files(tmp_path) == {"range(0, 2)": [4, 6], "range(2, 4)": [4, 6]}  # KEEP = 2 per process

    # the crash: process 1 wrote step 6, process 0 died before writing it
    (tmp_path / checkpoint.file_name(6, range(0, 2), EXPERIMENT.workers)).unlink()
    resumed = _run(resume_from=tmp_path)  # both continue from step 4, the newest step both hold
    _assert_same_run(uninterrupted, resumed)
    assert resumed.history.step.tolist() == uninterrupted.history.step.tolist()


def test_resume_without_a_common_step_is_refused_by_every_process(tmp_path):
    _run(checkpoint_dir=tmp_path, checkpoint_every=2)
    for step in (4, 6):  # process 0 has nothing left
        (tmp_path / checkpoint.file_name(step, range(0, 2), EXPERIMENT.workers)).unlink()
    with pytest.raises(DistributedRunError, match="common step"):
        _run(resume_from=tmp_path)


def test_bad_checkpoint_arguments_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="resume_from"):
        _run(resume_from=tmp_path / "missing")
    with pytest.raises(ValueError, match="one Experiment"):
        sim.run_distributed([EXPERIMENT, EXPERIMENT], nproc=NPROC, checkpoint_dir=tmp_path, checkpoint_every=2)
    with pytest.raises(ValueError, match="checkpoint_every"):
        _run(checkpoint_dir=tmp_path, checkpoint_every=0)


def test_launch_command_line_checkpoints_and_resumes(tmp_path):
    import dataclasses
    import json

    from sim.launch import main

    fields = {f.name: getattr(EXPERIMENT, f.name) for f in dataclasses.fields(EXPERIMENT)}
    spec = json.dumps({k: v for k, v in fields.items() if k in ("task", "workers", "steps", "batch_size", "seed",
                                                                "task_options", "compressor")})
    base = ["--experiment", spec, "--nproc", str(NPROC)]
    assert main([*base, "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "3",
                 "--out", str(tmp_path / "full.pt")]) == 0
    for workers in (range(0, 2), range(2, 4)):  # as if both processes died after step 5: resume from step 3
        (tmp_path / "ckpt" / checkpoint.file_name(6, workers, EXPERIMENT.workers)).unlink()
    assert main([*base, "--resume-from", str(tmp_path / "ckpt"), "--out", str(tmp_path / "resumed.pt")]) == 0
    full, resumed = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("full", "resumed"))
    _assert_same_run(full, resumed)
    with pytest.raises(ValueError, match="checkpoint_every"):
        main([*base, "--checkpoint-dir", str(tmp_path), "--checkpoint-every", "-1"])
