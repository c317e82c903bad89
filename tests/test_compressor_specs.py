"""Compressor specs ("powersgd:rank=2") wherever a compressor is named: Experiment, config files, --set, --grid
and sim.sweep; labels are the readable spec and sim.compare pairs on them; a grid option that does not apply to
a compressor of the grid is refused, never dropped or applied."""
from __future__ import annotations

import pytest

import compressors
import sim
from reference import SPEC_BASE_OPTIONS, SPEC_CONFIG
from compressors.spec import parse_spec, spec_label, split_specs
from sim.cli.main import main
from sim.workflow.config import apply_overrides, from_mapping, parse_assignment

BASE = sim.Experiment(**SPEC_BASE_OPTIONS)
TOML = SPEC_CONFIG


@pytest.mark.parametrize("text, spec", [
    ("identity", {"name": "identity"}),
    ("powersgd:rank=2", {"name": "powersgd", "rank": 2}),
    ("powersgd:rank=2:warm_start=false", {"name": "powersgd", "rank": 2, "warm_start": False}),
    ("powersgd:rank=2,warm_start=False", {"name": "powersgd", "rank": 2, "warm_start": False}),
    ("powersgd:rank_schedule=[[0,4],[10,2]]:variant=alternating",
     {"name": "powersgd", "rank_schedule": [[0, 4], [10, 2]], "variant": "alternating"}),
    ('{"name": "topk", "ratio": 0.01}', {"name": "topk", "ratio": 0.01}),
    ({"name": "topk", "ratio": 0.01}, {"name": "topk", "ratio": 0.01}),
])
def test_spec_forms(text, spec):
    assert parse_spec(text) == spec
    assert compressors.make(spec["name"], **{k: v for k, v in spec.items() if k != "name"}) is not None


@pytest.mark.parametrize("bad", ["", "powersgd:rank", "rank=2", "powersgd:rank=2:rank=3", 3, {"rank": 2}, "{bad"])
def test_bad_specs_name_the_field(bad):
    with pytest.raises(ValueError, match=r"compressor=.*is invalid; allowed: a name, 'name:key=value"):
        parse_spec(bad)


def test_labels_and_lists_of_specs():
    assert spec_label("powersgd:rank=2") == "powersgd(rank=2)"
    assert spec_label({"name": "identity"}) == "identity"
    assert spec_label("powersgd:rank=2:warm_start=false") == "powersgd(rank=2, warm_start=False)"
    # inside a comma-separated list a key=value piece continues the spec before it
    assert split_specs("identity,powersgd:rank=2,warm_start=false,topk:ratio=0.01") == [
        "identity", "powersgd:rank=2,warm_start=false", "topk:ratio=0.01"]
    assert parse_assignment("compressor=identity,powersgd:rank=2:warm_start=false,"
                            '{"name":"topk","ratio":0.1}', many=True)[1] == [
        "identity", "powersgd:rank=2:warm_start=false", {"name": "topk", "ratio": 0.1}]


def test_experiment_and_config_take_specs():
    assert BASE.replace(compressor="topk:ratio=0.1").compressor == {"name": "topk", "ratio": 0.1}
    assert BASE.with_overrides({"compressor": "powersgd:rank=2", "compressor.warm_start": False}).compressor == {
        "name": "powersgd", "rank": 2, "warm_start": False}
    data = {"task": "synthetic-lowrank", "compressor": "powersgd:rank=2"}
    assert from_mapping(apply_overrides(data, {"compressor.warm_start": False})).experiment.compressor == {
        "name": "powersgd", "rank": 2, "warm_start": False}
    assert from_mapping(apply_overrides(data, {"compressor": {"name": "identity"}})).experiment.compressor == {
        "name": "identity"}
    with pytest.raises(ValueError, match="compressor 'powersgd': unknown option 'rnak'"):
        BASE.replace(compressor="powersgd:rnak=2")
    swept = from_mapping({**data, "sweep": {"grid": {"compressor": ["identity", {"name": "topk", "ratio": 0.1}]}}})
    assert swept.grid == {"compressor": ["identity", {"name": "topk", "ratio": 0.1}]}
    with pytest.raises(ValueError, match="config.sweep.grid: compressor.rank=.*absent when the grid names whole"):
        from_mapping({**data, "sweep": {"grid": {"compressor": ["identity"], "compressor.rank": [1]}}})


def test_grid_options_that_do_not_apply_are_refused():
    with pytest.raises(ValueError, match=r"compressor.rank=\[1, 2\] is invalid.*'identity' does not take 'rank'"):
        sim.sweep(BASE, grid={"compressor.name": ["identity", "powersgd"], "compressor.rank": [1, 2]})
    # the base's rank would be dropped for identity: refused, naming it
    with pytest.raises(ValueError, match=r"compressor.name=.*base compressor's option rank=1"):
        sim.sweep(BASE, grid={"compressor.name": ["identity", "powersgd"]})
    with pytest.raises(ValueError, match="compressor.warm_start=.*absent when the grid names whole compressors"):
        sim.sweep(BASE, grid={"compressor": ["identity", "powersgd:rank=2"], "compressor.warm_start": [True]})
    with pytest.raises(ValueError, match="is repeated"):
        sim.sweep(BASE, grid={"compressor": ["powersgd:rank=2", {"name": "powersgd", "rank": 2}]})


def test_grid_of_specs_in_python_labels_and_compare():
    table = sim.sweep(BASE, grid={"compressor": ["identity", "powersgd:rank=2"]}, seeds=[0, 1], progress=False)
    assert table["label"].unique().tolist() == ["identity", "powersgd(rank=2)"]
    # the compressor column holds the table each spec builds (as load_results shows it), the label the spec
    assert table.drop_duplicates("label")["compressor"].tolist() == [{"name": "identity"},
                                                                      {"name": "powersgd", "rank": 2}]
    compared = sim.compare(table, baseline="identity", metric="train_loss")
    assert compared["label"].tolist() == ["powersgd(rank=2)"] and compared["n"].tolist() == [2]


def test_cli_grid_and_set_of_specs(tmp_path, capsys):
    config = tmp_path / "specs.toml"
    config.write_text(TOML)
    out = tmp_path / "out"
    assert main(["sweep", str(config), "--grid", "compressor=identity,powersgd:rank=2,warm_start=false",
                 "--seeds", "0,1", "--out", str(out), "--no-progress"]) == 0
    table = sim.load_results(out)
    assert table["run"].unique().tolist() == ["identity", "powersgd(rank=2, warm_start=False)"]
    assert table.drop_duplicates("run")["compressor"].tolist() == [
        {"name": "identity"}, {"name": "powersgd", "rank": 2, "warm_start": False}]
    assert sim.compare(table, baseline="identity", metric="train_loss", by="run")["n"].tolist() == [2]
    assert main(["run", str(config), "--set", 'compressor={"name": "identity"}', "--out", str(tmp_path / "one"),
                 "--no-progress"]) == 0
    assert sim.load_results(tmp_path / "one")["run"].unique().tolist() == ["identity"]
    capsys.readouterr()
    assert main(["sweep", str(config), "--grid", "compressor.name=identity,powersgd", "--grid",
                 "compressor.rank=1,2", "--out", str(tmp_path / "bad")]) == 2
    assert "'identity' does not take 'rank'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_powersgd_rank_default_is_shown_and_an_explicit_rank_is_still_told_apart(capsys):
    assert compressors.options_of("powersgd")["rank"] == 1
    assert main(["list", "compressors"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("powersgd "))
    assert "rank=1," in line and "rank=null" not in line
    assert compressors.make("powersgd").bits_per_step({"w": (8, 6)}) == compressors.make(
        "powersgd", rank=1).bits_per_step({"w": (8, 6)})
    compressors.make("powersgd", rank_schedule=[[0, 2]])  # the default rank leaves the schedule in charge
    with pytest.raises(ValueError, match=r"powersgd: rank=1 is invalid; allowed: None \(leave it out\) when "
                                         "rank_schedule is given"):
        compressors.make("powersgd", rank=1, rank_schedule=[[0, 2]])
