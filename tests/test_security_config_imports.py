"""A config file never runs code by itself: the modules its ``imports`` names are imported only when the command
line names them too (``--import``). ``python -m`` puts the working directory first on the import path, so a module
planted next to a config (or in the folder a user runs from) must not run just because the config names it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sim.workflow.config import from_mapping, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = textwrap.dedent("""
    imports = ["planted_cfg_module"]
    task = "synthetic-lowrank"
    workers = 2
    steps = 2
    batch_size = 4
    eval_every = 0
    [task_options]
    dim_in = 6
    dim_out = 4
    samples = 32
    test_samples = 8
""")


def plant(folder: Path) -> Path:
    """A module that leaves a marker file when imported, and a config naming it, both in ``folder``."""
    marker = folder / "IMPORTED"
    (folder / "planted_cfg_module.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "c.toml").write_text(CONFIG)
    return marker


def python_m(folder: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *argv], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=240)


@pytest.mark.parametrize("command", [
    ["sim", "run", "c.toml", "--out", "out", "--no-progress"],
    ["sim.launch", "--experiment", "c.toml", "--nproc", "1"],
])
def test_a_config_run_from_its_folder_imports_nothing_the_command_line_does_not_name(tmp_path, command):
    marker = plant(tmp_path)
    done = python_m(tmp_path, *command)
    assert not marker.exists(), "the config's module ran without --import"
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert "--import planted_cfg_module" in err


def test_the_command_line_naming_the_module_imports_it(tmp_path):
    marker = plant(tmp_path)
    done = python_m(tmp_path, "sim", "run", "c.toml", "--import", "planted_cfg_module", "--out", "out",
                    "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    assert marker.exists()


def test_python_loaders_import_nothing_unless_asked(tmp_path, monkeypatch):
    marker = plant(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="--import planted_cfg_module"):
        load_config(tmp_path / "c.toml")
    with pytest.raises(ValueError, match="planted_cfg_module"):  # sim.launch's inline JSON goes through this
        from_mapping(json.loads(json.dumps({"imports": ["planted_cfg_module"], "task": "synthetic-lowrank"})))
    assert not marker.exists()
