"""What the processes of a real run hand back is read as data, never unpickled into code, and their private
directory is made only where no other user can swap it (``sim.real.distributed.spawn``)."""
from __future__ import annotations

import io
import os
import tempfile

import pytest
import torch

import sim
from sim.real.distributed import DistributedRunError, private_directory, result_from_data, result_to_data, spawn

def _leave_marker(path: str) -> None:
    open(path, "w").write("ran")


class Planted:
    """Unpickling this calls ``_leave_marker``: what a swapped result file would hold."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return _leave_marker, (self.path,)


def _returns_code(rank: int, world: int, path: str):
    return {"result": Planted(path)}


def test_a_ranks_return_value_is_never_unpickled_into_code(tmp_path):
    marker = str(tmp_path / "marker")
    with pytest.raises(DistributedRunError, match="result of rank 0 is invalid; allowed: tensors"):
        spawn(_returns_code, 1, (marker,), timeout=120)
    assert not os.path.exists(marker), "the parent ran code named in a rank's result file"


def test_a_tmpdir_others_can_write_without_the_sticky_bit_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # world-writable, no sticky bit: anyone may rename our directory and plant theirs
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    with pytest.raises(ValueError, match="TMPDIR.*is invalid; allowed: a directory only you can write"):
        spawn(_returns_code, 1, (str(tmp_path / "marker"),), timeout=60)
    with pytest.raises(ValueError, match="TMPDIR"):
        with private_directory("calibrate"):
            pass
    assert list(shared.iterdir()) == []  # refused before anything was made there
    os.chmod(shared, 0o1777)  # the sticky bit (as /tmp): others cannot remove or rename what is ours
    with private_directory("spawn") as path:
        assert os.stat(path).st_mode & 0o777 == 0o700


def test_a_result_travels_as_plain_data():
    e = sim.Experiment(task="synthetic-lowrank", task_options={"dim_in": 6, "dim_out": 4, "samples": 32,
                       "test_samples": 8}, workers=2, steps=3, batch_size=4, eval_every=2,
                       compressor={"name": "powersgd", "rank": 1})
    result = sim.run(e)
    buffer = io.BytesIO()
    torch.save(result_to_data(result), buffer)
    buffer.seek(0)
    back = result_from_data(torch.load(buffer, weights_only=True), e)
    assert back.history.equals(result.history) and list(back.history.dtypes) == list(result.history.dtypes)
    assert all(torch.equal(back.params[n], p) for n, p in result.params.items())
    assert type(back.extras["final_state"]) is type(result.extras["final_state"])
    assert back.bits_per_step == result.bits_per_step
