"""The command line: what exists (`list`), errors in command-line words (one line, status 2), Ctrl-C, --import
and config imports, refused duplicates, permissions and plain progress lines, and sim.launch's config loader."""
from __future__ import annotations

import json
import os
import stat
import sys

import pytest

import compressors
import sim
from reference import TINY_CONFIG
from sim.cli.main import main
from sim.cli.arguments import INTERRUPTED
from sim.workflow.config import load_config
from sim.tasks import TASK_REGISTRY

TINY = TINY_CONFIG


def config_file(tmp_path, text: str = TINY, name: str = "tiny.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("kind, expected", [
    ("tasks", ["digits-mlp", "synthetic-lowrank", "dim_in=64"]),
    ("compressors", sorted(compressors.REGISTRY) + ["rank=1"]),
    ("optimizers", ["sgd", "adam", "adamw", "betas=[0.9, 0.999]", "momentum=0.9"]),
    ("networks", ["ethernet-10g", "gbit_per_s=10"]),
    ("accelerators", ["v100", "fp32_tflops=15.7"]),
    ("models", ["resnet18_cifar", "parameters=11173962", "resnet50", "parameters=25557032", "gpt2"]),
])
def test_list_shows_every_registered_name_with_its_options(capsys, kind, expected):
    assert main(["list", kind]) == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, text


def test_list_json_matches_the_registries(capsys):
    assert main(["list", "tasks", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(TASK_REGISTRY)
    synthetic = next(r for r in rows if r["name"] == "synthetic-lowrank")
    assert synthetic["options"]["samples"] == 4096 and synthetic["origin"] == "built-in"


def test_import_makes_a_users_tasks_visible(capsys, tmp_path, monkeypatch):
    module = tmp_path / "cli_user_tasks_a.py"
    module.write_text("import sim\nfrom sim.tasks import register_task\n"
                      "register_task('cli-user-task', sim.tasks.TASK_REGISTRY['synthetic-lowrank'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["list", "tasks", "--import", "cli_user_tasks_a"]) == 0
    out = capsys.readouterr().out
    assert "cli-user-task" in out and "[from sim.tasks.synthetic]" in out
    assert main(["list", "tasks", "--import", "no_such_module_here"]) == 2
    err = one_line_error(capsys)
    assert "--import" in err and "no_such_module_here" in err
    assert main(["list", "tasks", "--import", "../evil.py"]) == 2
    assert "module name" in one_line_error(capsys)


def test_a_configs_imports_run_only_when_the_command_line_names_them(tmp_path, monkeypatch, capsys):
    (tmp_path / "cli_user_tasks_b.py").write_text(
        "import sim\nsim.tasks.register_task('cli-config-task', sim.tasks.TASK_REGISTRY['synthetic-lowrank'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    text = 'imports = ["cli_user_tasks_b"]\n' + TINY.replace('"synthetic-lowrank"', '"cli-config-task"')
    path = config_file(tmp_path, text)
    with pytest.raises(ValueError, match="import it first"):  # reading a file from Python runs no code
        load_config(path)
    assert "cli_user_tasks_b" not in sys.modules
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2  # the file alone: no
    assert "--import cli_user_tasks_b" in one_line_error(capsys)
    assert "cli_user_tasks_b" not in sys.modules
    assert main(["run", str(path), "--import", "cli_user_tasks_b", "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    table = sim.load_results(tmp_path / "out")
    assert len(table) == 3 and "cli_user_tasks_b" in sys.modules
    assert load_config(path).experiment.task == "cli-config-task"  # imported now: fine
    with pytest.raises(ValueError, match="imports"):
        load_config(config_file(tmp_path, 'imports = "x"\n' + TINY, "bad.toml"))


@pytest.mark.parametrize("argv, named", [
    (["whatif", "--workers", "four"], "'four' is not a whole number >= 1"),
    (["whatif", "--workers", "0"], "'0' is not a whole number >= 1"),
    (["whatif", "--codec", "fast"], "invalid choice: 'fast'"),
    (["list", "widgets"], "invalid choice: 'widgets'"),
    (["calibrate", "--nproc", "1.5"], "'1.5' is not a whole number"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_command_line_values_are_one_line_and_status_2(capsys, argv, named):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = one_line_error(capsys)
    assert named in err and "--help" in err and "int" not in err.replace("invalid", "").replace("print", "")


def test_bad_config_values_are_one_line_and_status_2(tmp_path, capsys):
    path = config_file(tmp_path)
    assert main(["run", str(path), "--set", "workers=many", "--no-progress"]) == 2
    assert "workers='many' is invalid" in one_line_error(capsys)
    assert main(["run", str(config_file(tmp_path, "learning_rate = 1\n" + TINY, "u.toml")), "--no-progress"]) == 2
    assert "learning_rate" in one_line_error(capsys)
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in one_line_error(capsys)


def test_every_option_has_help_with_an_example():
    from sim.cli.main import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.dest in ("help",):
                continue
            assert action.help, (name, action.dest)
            if action.option_strings and action.dest not in ("no_progress", "json"):
                assert "e.g." in action.help, (name, action.dest)


def test_ctrl_c_prints_one_line_and_no_traceback(tmp_path, capsys, monkeypatch):
    import sim.cli.runs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sim.cli.runs, "sweep_to_dir", interrupted)
    assert main(["run", str(config_file(tmp_path)), "--no-progress"]) == 130
    assert one_line_error(capsys) == f"python -m sim run: {INTERRUPTED}"


@pytest.mark.parametrize("argv, named", [
    (["--grid", "compressor.rank=1,2,1"], "1 is repeated"),
    (["--seeds", "0,1,0"], "--seeds"),
    (["--grid", "seed=0,1", "--seeds", "2,3"], "--seeds"),
])
def test_repeated_values_and_two_ways_of_giving_seeds_are_refused(tmp_path, capsys, argv, named):
    out = tmp_path / "out"
    assert main(["sweep", str(config_file(tmp_path)), "--out", str(out), "--no-progress", *argv]) == 2
    assert named in one_line_error(capsys)
    assert not out.exists()
    with pytest.raises(ValueError, match="repeated"):
        load_config(config_file(tmp_path, TINY + "[sweep]\nseeds = [1, 1]\n", "s.toml"))


def test_a_grid_over_seed_alone_runs_each_seed(tmp_path):
    assert main(["sweep", str(config_file(tmp_path)), "--grid", "seed=3,4", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    assert sorted(sim.load_results(tmp_path / "o").seed.unique()) == [3, 4]


def test_outside_a_terminal_progress_is_one_plain_line_per_run_and_files_are_group_readable(tmp_path, capfd):
    old = os.umask(0o022)
    try:
        assert main(["sweep", str(config_file(tmp_path)), "--grid", "compressor.rank=1,2", "--seeds", "0,1",
                     "--out", str(tmp_path / "o")]) == 0  # stderr is captured here: not a terminal
    finally:
        os.umask(old)
    out, err = capfd.readouterr()
    lines = [line for line in out.splitlines() if " done: " in line]
    assert len(lines) == 4 and lines[0].startswith("run 1/4 done: rank=1, seed 0")
    assert "\r" not in out + err and "\x1b[" not in out + err  # no bars, no escape codes
    files = list((tmp_path / "o" / "runs").rglob("*.*"))
    assert len(files) == 8
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in files)


def test_launch_reads_configs_through_the_same_loader(tmp_path, capsys):
    from sim.cli.launch import load_experiment, main as launch

    path = config_file(tmp_path, 'optimizer = "adam"\n' + TINY)
    experiment = load_experiment(str(path), {"steps": 5})
    assert experiment == load_config(path, {"steps": 5}).experiment and experiment.optimizer == "adam"
    assert load_experiment('{"task": "synthetic-lowrank", "workers": 2}').workers == 2
    assert launch(["--experiment", str(config_file(tmp_path, "wokers = 3\n" + TINY, "typo.toml"))]) == 2
    err = one_line_error(capsys)
    assert "wokers" in err and "did you mean 'workers'" in err
    swept = config_file(tmp_path, TINY + "[sweep]\nseeds = [0, 1]\n", "sw.toml")  # as `run`: the base experiment
    assert load_experiment(str(swept)) == load_config(swept).experiment
    assert launch(["--experiment", str(config_file(tmp_path, TINY + "[sweep]\nseeds = [0, 0]\n", "bad.toml"))]) == 2
    assert "repeated" in one_line_error(capsys)
    assert launch(["--experiment", "{not json"]) == 2
    assert "experiment=" in one_line_error(capsys)
    with pytest.raises(SystemExit):
        launch(["--nproc", "two"])
    assert "'two' is not a whole number" in one_line_error(capsys)


@pytest.mark.distributed
def test_launch_writes_the_results_layout_that_load_results_reads(tmp_path, capsys):
    from sim.cli.launch import main as launch

    assert launch(["--experiment", str(config_file(tmp_path)), "--nproc", "2", "--out", str(tmp_path / "real"),
                   "--set", "optimizer=adamw", "--set", "lr=0.01"]) == 0
    table = sim.load_results(tmp_path / "real")
    assert len(table) == 3 and table.run_id.nunique() == 1
    virtual = sim.run(load_config(config_file(tmp_path), {"optimizer": "adamw", "lr": 0.01}).experiment)
    assert table.train_loss.tolist() == pytest.approx(virtual.history.train_loss.tolist(), rel=1e-5)


def test_a_sweep_resumes_its_run_in_progress_from_that_runs_checkpoint(tmp_path, monkeypatch, capsys):
    import pandas as pd

    import sim.workflow.sweep
    from sim.workflow.sweep import sweep_to_dir

    base = load_config(config_file(tmp_path)).experiment.replace(steps=9, eval_every=4)
    grid = {"compressor.rank": [1, 2]}
    reference = sweep_to_dir(base, tmp_path / "reference", grid=grid, progress=False)

    real_run, started = sim.workflow.sweep.run, []

    def run_interrupted_in_the_second_job(experiment, **options):
        started.append(options.get("resume_from"))

        def stop(simulation, state):
            if len(started) == 2 and state.step == 7:
                raise KeyboardInterrupt
        return real_run(experiment, on_step=stop, **options)

    monkeypatch.setattr(sim.workflow.sweep, "run", run_interrupted_in_the_second_job)
    with pytest.raises(KeyboardInterrupt):
        sweep_to_dir(base, tmp_path / "out", grid=grid, progress=False, checkpoint_every=3)
    partial = list((tmp_path / "out" / "runs").glob("*/checkpoints/checkpoint-000000006.pt"))
    assert len(partial) == 1  # the run in progress has its own checkpoint; the finished one has none left
    monkeypatch.setattr(sim.workflow.sweep, "run", real_run)
    lines = []
    table = sweep_to_dir(base, tmp_path / "out", grid=grid, progress=False, checkpoint_every=3, log=lines.append)
    assert any("resuming" in line and "checkpoint-000000006.pt" in line for line in lines), lines
    pd.testing.assert_frame_equal(table, reference, check_exact=True)
    assert not list((tmp_path / "out" / "runs").glob("*/checkpoints"))


def test_sim_sweep_out_is_the_resumable_results_directory(tmp_path):
    base = load_config(config_file(tmp_path)).experiment
    grid = {"compressor.rank": [1, 2]}
    table = sim.sweep(base, grid=grid, seeds=[0, 1], progress=False, out=tmp_path / "o", checkpoint_every=2)
    assert len(table) == 4 * 3 and sorted(table.seed.unique()) == [0, 1]
    import pandas as pd

    pd.testing.assert_frame_equal(table, sim.load_results(tmp_path / "o"), check_exact=True)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "o").rglob("record.json")}
    again = sim.sweep(base, grid=grid, seeds=[0, 1], progress=False, out=tmp_path / "o")
    pd.testing.assert_frame_equal(again, table, check_exact=True)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing redone
    in_memory = sim.sweep(base, grid=grid, seeds=[0, 1], progress=False)
    assert in_memory.train_loss.tolist() == table.train_loss.tolist()


@pytest.mark.parametrize("arguments, named", [
    ({"grid": {"compressor.rank": [1, 1]}}, "repeated"),
    ({"seeds": [0, 0]}, "repeated"),
    ({"grid": {"seed": [1, 2]}, "seeds": [0, 1]}, "seeds"),
    ({"shard": "3/2", "out": "x"}, "shard"),
])
def test_sim_sweep_refuses_repeated_runs(tmp_path, arguments, named):
    base = load_config(config_file(tmp_path)).experiment
    with pytest.raises(ValueError, match=named):
        sim.sweep(base, progress=False, **arguments)


def test_sim_sweep_over_seed_reports_the_seed_it_ran(tmp_path):
    base = load_config(config_file(tmp_path)).experiment
    table = sim.sweep(base, grid={"seed": [3, 4]}, progress=False)
    assert sorted(table.seed.unique()) == [3, 4]
    assert table[table.seed == 3].train_loss.tolist() == sim.run(base.replace(seed=3)).history.train_loss.tolist()
