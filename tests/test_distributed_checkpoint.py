"""Checkpoint and resume of real multi-process runs (sim.run_distributed): every process writes its own workers'
checkpoints into one directory; a resumed run continues from the newest step every process holds and ends
bitwise where the uninterrupted run ends, also when the crash landed between two processes' writes."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

import sim
from sim import checkpoint, checkpoint_schema
from sim.real.distributed import DistributedRunError

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


def _agree_on_cases(rank: int, world: int, directories: list[str]) -> list[tuple[str, str]]:
    """Every rank's outcome of ``agreed_checkpoint`` on each directory: ("ok", path) or ("raised", message)."""
    from sim.real.distributed import agreed_checkpoint
    from compressors.comm import DistributedCollective

    comm = DistributedCollective(EXPERIMENT.workers // world, timeout=20)
    out = []
    for directory in directories:
        try:
            out.append(("ok", agreed_checkpoint(directory, EXPERIMENT, comm)))
        except ValueError as error:
            out.append(("raised", str(error)))
    return out


def _write_checkpoint(directory, workers: range, step: int) -> None:
    """A valid checkpoint of ``workers`` at ``step`` (initial state, history rows of the logged steps)."""
    state = sim.Simulation(EXPERIMENT, local_workers=workers).initial_state()._replace(step=step)
    rows = [{"step": s} for s in checkpoint_schema.logged_steps(EXPERIMENT, step)]
    checkpoint.save(directory, EXPERIMENT, state, rows, local_workers=workers, keep=10)


def test_processes_agree_on_the_newest_common_step_or_all_refuse(tmp_path):
    """The valid files held decide; a corrupt file counts as absent. Each case: steps held by process 0 and 1."""
    from sim.real.distributed import spawn

    cases = {"one-behind": ([4, 6], [4]), "none-on-one": ([], [4, 6]), "disjoint": ([2], [4, 6]),
             "newest-corrupt": ([4, 6], [4, 6])}
    directories = []
    for name, held in cases.items():
        directory = tmp_path / name
        directory.mkdir()
        for workers, steps in zip((range(0, 2), range(2, 4)), held):
            for step in steps:
                _write_checkpoint(directory, workers, step)
        directories.append(str(directory))
    newest = tmp_path / "newest-corrupt" / checkpoint.file_name(6, range(2, 4), EXPERIMENT.workers)
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated: process 1's step 6 does not count
    rank0, rank1 = spawn(_agree_on_cases, NPROC, (directories,), timeout=120)
    assert rank0[0] == ("ok", directories[0] + "/" + checkpoint.file_name(4, range(0, 2), EXPERIMENT.workers))
    assert rank1[0] == ("ok", directories[0] + "/" + checkpoint.file_name(4, range(2, 4), EXPERIMENT.workers))
    for outcomes in (rank0[1:3], rank1[1:3]):  # both processes refuse, neither is left waiting
        assert [kind for kind, _ in outcomes] == ["raised", "raised"]
        assert all("common step" in message for _, message in outcomes)
    assert "newest common step: none" in rank1[1][1] and "newest common step: 2" in rank1[2][1]
    assert rank0[3] == ("ok", directories[3] + "/" + checkpoint.file_name(4, range(0, 2), EXPERIMENT.workers))
    assert rank1[3] == ("ok", directories[3] + "/" + checkpoint.file_name(4, range(2, 4), EXPERIMENT.workers))


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

    from sim.cli.launch import main

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
    with pytest.raises(SystemExit) as exit_:  # the command line refuses it: a one-line error, status 2
        main([*base, "--checkpoint-dir", str(tmp_path), "--checkpoint-every", "-1"])
    assert exit_.value.code == 2
    assert main([*base, "--checkpoint-every", "3"]) == 2  # without --checkpoint-dir: refused before any process
