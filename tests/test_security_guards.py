"""Numerical guards after the optimizer step, step sizes checked against the dtype, and results folders whose
record.json is of the wrong shape counted as incomplete runs."""
from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
import torch

import sim
from sim.workflow.store import HISTORY, RECORD, ResultsStore, load_results, run_id
from sim.workflow.sweep import sweep_to_dir

TINY = {"dim_in": 12, "dim_out": 10, "samples": 64, "test_samples": 8}


def tiny(**changes) -> sim.Experiment:
    base = dict(task="synthetic-lowrank", task_options=TINY, workers=2, steps=5, batch_size=4, eval_every=0,
                compressor={"name": "powersgd", "rank": 2}, seed=0)
    return sim.Experiment(**{**base, **changes})


# -- step sizes against the dtype ------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, dtype", [("lr", 1e39, "float32"), ("lr", 3.5e32, "float32"),
                                                 ("weight_decay", 1e33, "float32"), ("lr", 1e303, "float64")])
def test_step_sizes_beyond_the_dtype_are_refused_with_the_rule(field, value, dtype):
    limit = torch.finfo(getattr(torch, dtype)).max / 1e6
    with pytest.raises(ValueError, match=rf"Experiment: {field}=.* is invalid; allowed: at most {re.escape(f'{limit:.3g}')} for "
                                         rf"dtype='{dtype}' \(torch\.finfo\({dtype}\)\.max / 1e\+06"):
        tiny(**{field: value, "dtype": dtype})


def test_step_sizes_within_the_dtype_are_accepted():
    assert tiny(lr=3.4e32).lr == 3.4e32
    assert tiny(lr=1e39, dtype="float64").lr == 1e39  # finite and far from overflow in float64


# -- parameters checked after the optimizer step ------------------------------------------------------------------
def test_an_overflowing_lr_raises_naming_the_step_and_tensor():
    with pytest.raises(sim.NonFiniteGradientError, match=r"step 2: non-finite parameter after the optimizer step "
                                                         r"in \['weight'\] .*lr=1e\+30"):
        sim.run(tiny(lr=1e30))


def test_an_overflowing_lr_with_skip_step_keeps_the_parameters_and_shows_it_in_the_history():
    e = tiny(lr=1e30, nonfinite="skip_step")
    simulation = sim.Simulation(e)
    states = []
    result = sim.run(e, simulation=simulation, on_step=lambda s, state: states.append(state))
    assert result.history.skipped_steps.tolist() == [0, 1, 2, 3, 4]  # step 1 trains, every later one overflows
    after_first = states[0]
    for state in states[1:]:  # the parameters, momentum and compressor state of step 1, kept
        assert all(torch.equal(state.params[n], after_first.params[n]) for n in state.params)
        assert all(torch.equal(state.optimizer.momentum[n], after_first.optimizer.momentum[n])
                   for n in state.params)
    assert all(bool(torch.isfinite(p).all()) for p in result.params.values())
    # the reference: the unguarded update really overflows at step 2
    update = sim.run(tiny(lr=1e30, steps=1)).params["weight"]
    assert math.isfinite(float(update.abs().max())) and float(update.abs().max()) > 1e25


def test_the_guard_changes_nothing_for_a_healthy_run():
    e = tiny(steps=8, momentum=0.9, nonfinite="skip_step")
    result = sim.run(e)
    assert result.history.skipped_steps.iloc[-1] == 0
    assert result.history.train_loss.iloc[-1] < result.history.train_loss.iloc[0]


# -- results folders with malformed records --------------------------------------------------------------------------
MALFORMED = {
    "a list": [1, 2],
    "a number": 3,
    "no config": {"run_id": None, "index": 0, "label": "x", "overrides": {}, "seed": 0},
    "config of text": {"index": 0, "label": "x", "overrides": {}, "seed": 0, "config": "everything"},
    "seed of text": {"index": 0, "label": "x", "overrides": {}, "seed": "zero", "config": {}},
    "overrides a list": {"index": 0, "label": "x", "overrides": [], "seed": 0, "config": {}},
    "another run_id": {"run_id": "elsewhere", "index": 0, "label": "x", "overrides": {}, "seed": 0, "config": {}},
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_record_of_the_wrong_shape_counts_as_incomplete(tmp_path, kind):
    base = tiny(steps=2)
    table = sweep_to_dir(base, tmp_path, seeds=[0, 1], progress=False)
    good = table[table.seed == 0]
    victim = ResultsStore(tmp_path).folder(base.replace(seed=1))
    record = MALFORMED[kind]
    if isinstance(record, dict):
        record = {"run_id": victim.name, **record} if "run_id" not in record else record
        if "config" in record and record["config"] == {}:
            record["config"] = json.loads((victim / RECORD).read_text())["config"]
    (victim / RECORD).write_text(json.dumps(record))
    loaded = load_results(tmp_path)  # no crash: the malformed run is left out
    assert loaded.run_id.unique().tolist() == [run_id(base.replace(seed=0))]
    pd.testing.assert_frame_equal(loaded.reset_index(drop=True), good.reset_index(drop=True))
    again = sweep_to_dir(base, tmp_path, seeds=[0, 1], progress=False)  # the sweep redoes the incomplete run
    pd.testing.assert_frame_equal(again.reset_index(drop=True), table.reset_index(drop=True))


def test_an_unreadable_history_counts_as_incomplete(tmp_path):
    base = tiny(steps=2)
    sweep_to_dir(base, tmp_path, progress=False)
    folder = ResultsStore(tmp_path).folder(base)
    (folder / HISTORY).write_bytes(b"")
    assert load_results(tmp_path).empty
    assert not ResultsStore(tmp_path).is_complete(base)


def test_the_one_sync_parameter_check_equals_the_elementwise_test():
    from sim.simulation import nonfinite_any

    big = torch.full((4,), 3e38)  # finite elements whose float32 sum overflows: must not be reported
    cases = [
        ({"a": torch.ones(3), "b": torch.zeros(2, 2)}, []),
        ({"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])}, ["b"]),
        ({"a": big, "b": torch.tensor([float("-inf")]), "c": torch.ones(1)}, ["b"]),
        ({"a": big, "b": -big}, []),
        ({}, []),
    ]
    for tensors, expected in cases:
        assert nonfinite_any(tensors) == expected
        assert expected == [n for n, t in tensors.items() if not bool(torch.isfinite(t).all())]
