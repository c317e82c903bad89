"""Checkpoint and resume: an interrupted run resumes to the very same numbers; writes are atomic; a checkpoint
refuses to load into another configuration."""
import os

import pandas as pd
import pytest
import torch

import sim
from reference import assert_identical_leaves
from sim import checkpoint

TINY = {"dim_in": 12, "dim_out": 10, "samples": 64, "test_samples": 8}


def tiny(**changes) -> sim.Experiment:
    base = dict(task="synthetic-lowrank", task_options=TINY, workers=3, steps=14, batch_size=4, eval_every=5,
                log_every=2, compressor={"name": "powersgd", "rank": 2}, seed=1, momentum=0.9)
    base.update(changes)
    return sim.Experiment(**base)


class Interrupted(Exception):
    pass


def interrupt_at(step: int):
    def on_step(simulation, state):
        if state.step == step:
            raise Interrupted
    return on_step


assert_identical = assert_identical_leaves


COMPRESSORS = [
    {"name": "powersgd", "rank": 2},  # local error feedback + warm-start factors + shared generator
    {"name": "powersgd", "rank": 1, "variant": "alternating", "warm_start": False, "error_feedback": "averaged",
     "start_compressing_after_num_steps": 3},
    {"name": "qsgd", "levels": 4, "error_feedback": "ef21"},  # private per-worker generators
    {"name": "signum", "momentum": 0.5},  # per-worker momentum inside the compressor
    {"name": "randomk", "ratio": 0.2},
]


@pytest.mark.parametrize("compressor", COMPRESSORS, ids=lambda c: c["name"])
def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path, compressor):
    e = tiny(compressor=compressor, network="ethernet-10g")
    full = sim.run(e)
    with pytest.raises(Interrupted):
        sim.run(e, checkpoint_dir=tmp_path, checkpoint_every=4, on_step=interrupt_at(11))
    assert checkpoint.latest(tmp_path).name == "checkpoint-000000008.pt"
    resumed = sim.run(e, resume_from=tmp_path)
    pd.testing.assert_frame_equal(resumed.history, full.history, check_exact=True)
    assert_identical(resumed.extras["final_state"], full.extras["final_state"])


def test_checkpointed_state_equals_the_state_at_that_step(tmp_path):
    """What is restored is exactly the TrainState the loop carried (compressor state included)."""
    e = tiny()
    states = {}
    sim.run(e, checkpoint_dir=tmp_path, checkpoint_every=3,
            on_step=lambda s, state: states.__setitem__(state.step, state))
    restored = checkpoint.load(tmp_path / "checkpoint-000000012.pt", e)
    assert restored.step == 12
    assert type(restored.state) is sim.TrainState
    assert_identical(restored.state, states[12])
    history_rows = restored.rows
    assert [r["step"] for r in history_rows] == [2, 4, 5, 6, 8, 10, 12]  # log_every=2 plus eval_every=5


def test_resume_continues_checkpointing_and_a_finished_run_resumes_to_its_result(tmp_path):
    e = tiny()
    full = sim.run(e)
    with pytest.raises(Interrupted):
        sim.run(e, checkpoint_dir=tmp_path, checkpoint_every=3, on_step=interrupt_at(7))
    again = sim.run(e, resume_from=tmp_path, checkpoint_dir=tmp_path, checkpoint_every=3)
    pd.testing.assert_frame_equal(again.history, full.history, check_exact=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-000000012.pt", "checkpoint-000000014.pt", checkpoint.MANIFEST]  # the last one: the final step
    done = sim.run(e, resume_from=tmp_path)  # nothing left to run: the stored history is the result
    pd.testing.assert_frame_equal(done.history, full.history, check_exact=True)
    assert all(torch.equal(done.params[k], full.params[k]) for k in full.params)


def test_ledger_totals_survive_a_resume(tmp_path):
    e = tiny(keep_ledger=True)
    full = sim.Simulation(e)
    sim.run(e, simulation=full)
    with pytest.raises(Interrupted):
        sim.run(e, checkpoint_dir=tmp_path, checkpoint_every=5, on_step=interrupt_at(6))
    resumed = sim.Simulation(e)
    sim.run(e, simulation=resumed, resume_from=tmp_path)
    assert resumed.comm.ledger.calls == full.comm.ledger.calls
    assert resumed.comm.ledger.total_bits == full.comm.ledger.total_bits
    assert resumed.comm.ledger.records == full.comm.ledger.records


def test_another_configuration_is_refused_naming_the_fields(tmp_path):
    e = tiny()
    sim.run(e, checkpoint_dir=tmp_path, checkpoint_every=7)
    with pytest.raises(ValueError, match=r"differing fields: compressor, lr \(compressor: checkpoint .*'rank': 2.*"
                                         r"experiment .*'rank': 1.*lr: checkpoint 0.1, experiment 0.2"):
        sim.run(e.replace(lr=0.2, compressor={"name": "powersgd", "rank": 1}), resume_from=tmp_path)
    with pytest.raises(ValueError, match="differing fields: seed"):
        checkpoint.load(tmp_path, e.replace(seed=2))


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    e = tiny()
    states = {}
    real_write = checkpoint._write

    def crash_halfway(payload, f):
        if payload["step"] == 8:  # the second checkpoint: write half of it, then "lose power"
            import io
            buffer = io.BytesIO()
            real_write(payload, buffer)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            raise OSError("disk full")
        real_write(payload, f)

    monkeypatch.setattr(checkpoint, "_write", crash_halfway)
    with pytest.raises(OSError, match="disk full"):
        sim.run(e, checkpoint_dir=tmp_path, checkpoint_every=4,
                on_step=lambda s, state: states.__setitem__(state.step, state))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000000004.pt", checkpoint.MANIFEST]  # no partial
    assert_identical(checkpoint.load(tmp_path, e).state, states[4])
    monkeypatch.setattr(checkpoint, "_write", real_write)
    pd.testing.assert_frame_equal(sim.run(e, resume_from=tmp_path).history, sim.run(e).history, check_exact=True)


def test_a_crash_before_the_rename_is_ignored(tmp_path, monkeypatch):
    """A process killed between writing the temporary file and os.replace leaves a stray temporary file."""
    e = tiny()
    sim.run(e, checkpoint_dir=tmp_path, checkpoint_every=4, on_step=None)
    stray = tmp_path / ".checkpoint-000000016.pt.12345.tmp"
    stray.write_bytes(b"half a checkpoint")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert checkpoint.latest(tmp_path).name == "checkpoint-000000014.pt"
    assert checkpoint.load(tmp_path, e).step == 14

    def no_rename(src, dst):
        raise KeyboardInterrupt  # killed right before the rename
    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, e, checkpoint.load(tmp_path, e).state._replace(step=20), [])
    monkeypatch.undo()
    assert checkpoint.latest(tmp_path).name == "checkpoint-000000014.pt"
    assert not list(tmp_path.glob(".checkpoint-000000020*"))  # the temporary file was cleaned up


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    sim.run(tiny(steps=20), checkpoint_dir=tmp_path, checkpoint_every=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-000000018.pt", "checkpoint-000000020.pt"]


def test_checkpoints_are_versioned_plain_data(tmp_path):
    e = tiny(steps=4)
    sim.run(e, checkpoint_dir=tmp_path, checkpoint_every=4)
    path = checkpoint.latest(tmp_path)
    payload = torch.load(path, weights_only=True)  # no arbitrary pickled objects inside
    assert payload["format_version"] == checkpoint.FORMAT_VERSION
    assert payload["experiment"]["compressor"] == {"name": "powersgd", "rank": 2}
    payload["format_version"] = 999
    torch.save(payload, path)
    with pytest.raises(ValueError, match="format_version=999 is invalid"):
        checkpoint.load(tmp_path, e)


def test_unreadable_or_missing_checkpoints_raise_value_errors(tmp_path):
    e = tiny(steps=4)
    with pytest.raises(ValueError, match="resume_from=.*found none"):
        sim.run(e, resume_from=tmp_path)
    with pytest.raises(ValueError, match="resume_from=.*invalid"):
        sim.run(e, resume_from=tmp_path / "missing")
    (tmp_path / "checkpoint-000000004.pt").write_bytes(b"\x80garbage")
    with pytest.raises(ValueError, match="unreadable"):
        sim.run(e, resume_from=tmp_path)


@pytest.mark.parametrize("kwargs, word", [
    ({"checkpoint_every": 5}, "checkpoint_every"), ({"checkpoint_dir": "x"}, "checkpoint_every"),
    ({"checkpoint_dir": "x", "checkpoint_every": 0}, "checkpoint_every"),
    ({"checkpoint_dir": "x", "checkpoint_every": 2.5}, "checkpoint_every"),
    ({"checkpoint_dir": 3, "checkpoint_every": 2}, "checkpoint_dir"), ({"resume_from": 1.0}, "resume_from"),
])
def test_checkpoint_arguments_are_validated(kwargs, word):
    with pytest.raises(ValueError, match=word):
        sim.run(tiny(steps=2), **kwargs)


def test_processes_emulating_different_workers_keep_separate_files(tmp_path):
    e = tiny(steps=2, workers=4)
    state = sim.Simulation(e, local_workers=range(2, 4)).initial_state()
    checkpoint.save(tmp_path, e, state, [], local_workers=range(2, 4))
    assert checkpoint.latest(tmp_path) is None  # not the full run's
    assert checkpoint.latest(tmp_path, range(2, 4), 4).name == "checkpoint-000000000-w2-4.pt"
    with pytest.raises(ValueError, match="found none"):
        checkpoint.load(tmp_path, e, local_workers=range(0, 2))
    assert checkpoint.load(tmp_path, e, local_workers=range(2, 4)).step == 0
