"""Experiments from TOML/JSON files and command-line values: good input parses, bad input names the key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from sim.workflow.config import apply_overrides, from_mapping, load_config, parse_assignment, parse_seeds, parse_value, split_top_level

ROOT = Path(__file__).resolve().parents[1]

TOML = """
task = "synthetic-lowrank"
workers = 4
steps = 7
lr = 0.05
lr_milestones = [3, 5]
[compressor]
name = "powersgd"
rank = 2
warm_start = false
[task_options]
dim_in = 8
dim_out = 4
[sweep]
seeds = [0, 3]
[sweep.grid]
"compressor.rank" = [1, 2]
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_toml_and_json_give_the_same_config(tmp_path):
    toml_config = load_config(write(tmp_path, "a.toml", TOML))
    e = toml_config.experiment
    assert (e.task, e.workers, e.steps, e.lr, e.lr_milestones) == ("synthetic-lowrank", 4, 7, 0.05, (3, 5))
    assert e.compressor == {"name": "powersgd", "rank": 2, "warm_start": False}
    assert e.task_options == {"dim_in": 8, "dim_out": 4}
    assert toml_config.grid == {"compressor.rank": [1, 2]} and toml_config.seeds == (0, 3)
    as_json = {**{k: v for k, v in e.to_dict().items() if k != "network"},
               "sweep": {"grid": {"compressor.rank": [1, 2]}, "seeds": [0, 3]}}
    json_config = load_config(write(tmp_path, "a.json", json.dumps(as_json)))
    assert json_config.experiment == e
    assert (json_config.grid, json_config.seeds) == (toml_config.grid, toml_config.seeds)


def test_no_sweep_table_means_one_run_with_the_experiment_seed(tmp_path):
    config = load_config(write(tmp_path, "b.toml", 'task = "synthetic-lowrank"\nseed = 5\n'))
    assert config.grid == {} and config.sweep_seeds == (5,)


@pytest.mark.parametrize("text, named", [
    ("task = 'synthetic-lowrank'\nlearning_rate = 0.1\n", "learning_rate"),  # unknown top-level key
    ("task = 'synthetic-lowrank'\n[sweep]\nseed = [1]\n", "seed"),  # unknown sweep key
    ("task = 'synthetic-lowrank'\n[sweep.grid]\n'compressor.rnak' = [1]\n", "rnak"),  # unknown compressor option
    ("task = 'synthetic-lowrank'\n[sweep.grid]\n'optimizer.lr' = [1]\n", "optimizer"),  # unknown field in grid
    ("task = 'synthetic-lowrank'\n[task_options]\nwidth = 3\n", "width"),  # unknown task option
    ("task = 'synthetic-lowrank'\nlr = '0.1'\n", "lr"),  # wrong type
    ("task = 'synthetic-lowrank'\nworkers = 2.5\n", "workers"),
    ("task = 'synthetic-lowrank'\nnesterov = 1\n", "nesterov"),
    ("task = 'synthetic-lowrank'\ncompressor = 3\n", "compressor"),
    ("task = 'synthetic-lowrank'\n[compressor]\nname = 'powersgd'\nrank = '2'\n", "rank"),
    ("task = 'synthetic-lowrank'\n[sweep]\nseeds = [-1]\n", "seeds"),
    ("task = 'synthetic-lowrank'\n[sweep]\nseeds = 3\n", "seeds"),
    ("task = 'synthetic-lowrank'\n[sweep.grid]\n'compressor.rank' = 2\n", "compressor.rank"),
    ("task = 'synthetic-lowrank'\n[compressor]\nname='powersgd'\n[sweep.grid]\n'compressor.rank' = [1, 0]\n", "rank"),
    ("task = 'synthetic-lowrank'\nsweep = 1\n", "sweep"),
    ("task = 'no-such-task'\n", "task"),
])
def test_bad_keys_and_types_raise_naming_the_key(tmp_path, text, named):
    with pytest.raises(ValueError, match=named):
        load_config(write(tmp_path, "bad.toml", text))


def test_unparsable_and_unknown_files(tmp_path):
    with pytest.raises(ValueError, match="cannot parse"):
        load_config(write(tmp_path, "x.toml", "task = \n"))
    with pytest.raises(ValueError, match="cannot parse"):
        load_config(write(tmp_path, "x.json", "[1, 2]"))
    with pytest.raises(ValueError, match="suffix"):
        load_config(write(tmp_path, "x.yaml", "task: digits-mlp"))
    with pytest.raises(ValueError, match="not a file"):
        load_config(tmp_path / "missing.toml")


def test_overrides_apply_before_validation(tmp_path):
    path = write(tmp_path, "c.toml", "task = 'synthetic-lowrank'\n[compressor]\nname = 'powersgd'\n")
    e = load_config(path, {"compressor.rank": 3, "steps": 11, "task_options.dim_in": 5}).experiment
    assert (e.compressor["rank"], e.steps, e.task_options["dim_in"]) == (3, 11, 5)
    with pytest.raises(ValueError, match="lr.x"):
        apply_overrides({}, {"lr.x": 1})
    assert "rank" not in load_config(path).experiment.compressor  # the file itself is unchanged


@pytest.mark.parametrize("text, value", [("true", True), ("False", False), ("none", None), ("3", 3),
                                         ("-2", -2), ("0.5", 0.5), ("1e-3", 1e-3), ("qr", "qr"),
                                         ("[64, 32]", [64, 32])])
def test_parse_value(text, value):
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_parse_assignments_and_seeds():
    assert parse_assignment("compressor.rank=1,2,4", many=True) == ("compressor.rank", [1, 2, 4])
    assert parse_assignment("task_options.hidden=[8,8],[16]", many=True) == ("task_options.hidden", [[8, 8], [16]])
    assert parse_assignment("compressor.warm_start=true,false", many=True) == ("compressor.warm_start", [True, False])
    assert parse_assignment("lr=0.1", many=False) == ("lr", 0.1)
    for bad in ("rank", "=3", "rank="):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_assignment(bad, many=True)
    assert parse_seeds("0,1,2") == (0, 1, 2)
    for bad in ("", "a", "1,-1"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


@given(st.lists(st.one_of(st.integers(-5, 5), st.lists(st.integers(0, 9), max_size=3)), min_size=1, max_size=5))
def test_split_top_level_inverts_joining(values):
    text = ",".join(json.dumps(v).replace(" ", "") for v in values)
    assert [json.loads(part) for part in split_top_level(text)] == values


def test_example_configs_load_or_name_missing_data():
    configs = sorted((ROOT / "configs").glob("*.*"))
    assert len(configs) >= 3
    for path in configs:
        if "cifar10" in path.name or "wikitext2" in path.name:  # need a dataset: the error names its files
            with pytest.raises(ValueError, match="data_batch_1|wiki.train.tokens"):
                load_config(path)
        else:
            config = load_config(path)
            assert config.grid, f"{path.name} should demonstrate a sweep"


def test_from_mapping_checks_tables():
    with pytest.raises(ValueError, match="task_options"):
        from_mapping({"task": "synthetic-lowrank", "task_options": [1]})
