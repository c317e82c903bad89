"""Sweeps into a results directory: one writer at a time (a second sweep on the same directory is refused with
one line naming the first one's pid, before it writes anything), grid keys never overwrite history columns of
the same name, and a diverged run ends the command line with one line, not a traceback."""
from __future__ import annotations

import os

import sim
from reference import TINY_CONFIG
from sim.cli.main import main
from sim.workflow.store import exclusive, load_results

TINY = TINY_CONFIG


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_a_second_sweep_on_the_same_out_is_refused_naming_the_first(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(TINY)
    out = tmp_path / "out"
    with exclusive(out):  # another sweep holds the directory
        assert main(["sweep", str(config), "--seeds", "0,1", "--out", str(out), "--no-progress"]) == 2
        err = one_line(capsys)
        assert f"is in use by another sweep (pid {os.getpid()})" in err
        assert not (out / "runs").exists()  # refused before writing anything
    assert main(["sweep", str(config), "--seeds", "0,1", "--out", str(out), "--no-progress"]) == 0
    assert len(load_results(out)) == 6


def test_grid_keys_named_like_history_columns_get_their_own_column(tmp_path):
    base = sim.Experiment(task="synthetic-lowrank", task_options={"dim_in": 6, "dim_out": 4, "samples": 32,
                          "test_samples": 8}, workers=2, steps=4, batch_size=4, eval_every=0, lr_warmup_steps=4)
    table = sim.sweep(base, grid={"lr": [0.1, 0.2]}, seeds=[0], progress=False, out=tmp_path / "out")
    assert list(table["config.lr"]) == [0.1] * 4 + [0.2] * 4
    assert list(table["lr"].round(6)) == [0.025, 0.05, 0.075, 0.1, 0.05, 0.1, 0.15, 0.2]  # per step: warm-up kept
    memory = sim.sweep(base, grid={"lr": [0.1, 0.2]}, seeds=[0], progress=False)
    assert list(memory["config.lr"]) == list(table["config.lr"]) and list(memory["lr"]) == list(table["lr"])


def test_a_diverged_run_ends_the_command_line_with_one_line(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("lr = 1e30\n" + TINY.replace("steps = 3", "steps = 20"))
    assert main(["run", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = one_line(capsys)
    assert "the run diverged" in err and "nonfinite" in err
