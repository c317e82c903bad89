"""Files written before the package layout moved (tests/data/pre_layout_*) still load and resume.

Stored records are named by their registered record names, never by module paths, so moving a module must
not change what a file means. The two files were written by the code as it stood before the move: a
checkpoint at step 3 of a 6-step PowerSGD run, and a DDP hook state after 3 PowerSGD steps.
"""
from pathlib import Path

import torch
from torch import nn

import compressors
import sim

DATA = Path(__file__).parent / "data"
EXPERIMENT = sim.Experiment(task="digits-mlp", workers=4, steps=6, compressor={"name": "powersgd", "rank": 2},
                            seed=3, momentum=0.9)


def test_checkpoint_written_before_the_move_resumes_bitwise(tmp_path):
    full = sim.run(EXPERIMENT)
    resumed = sim.run(EXPERIMENT, resume_from=DATA / "pre_layout_checkpoint.pt")
    assert resumed.history["step"].tolist() == full.history["step"].tolist()
    for name, p in full.params.items():
        assert torch.equal(resumed.params[name], p), name


def test_hook_state_written_before_the_move_loads():
    saved = torch.load(DATA / "pre_layout_hook_state.pt", weights_only=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    state, _ = compressors.ddp_comm_hook("powersgd", model=model, rank=2, error_feedback="local", warm_start=True)
    state.load_state_dict(saved)
    assert (state.steps, state.calls, len(state.buckets)) == (3, 3, 1)
    assert state.state_dict()["checksum"] == saved["checksum"]
