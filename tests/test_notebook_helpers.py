"""The notebooks' reproducibility helpers (notebooks/_common.py): the margin rule of docs/protocol.md, the
rounding-spread table and the environment record."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "notebooks"))
import _common  # noqa: E402


@pytest.mark.parametrize("low, high, spread, margin, expected", [
    (0.011, 0.02, 0.01, None, "above 0"),
    (0.009, 0.02, 0.01, None, "too close to call"),        # clear of 0, but not by more than the spread
    (-0.03, -0.011, 0.01, None, "below 0"),
    (-0.03, -0.01, 0.01, None, "too close to call"),        # exactly the spread is not more than it
    (-0.002, 0.002, 0.001, 0.005, "within the margin"),
    (-0.0041, 0.002, 0.001, 0.005, "too close to call"),    # inside the margin, not inside margin - spread
    (-0.002, 0.002, 0.001, None, "too close to call"),      # no margin: equivalence is never read
    (math.nan, math.nan, 0.0, 0.005, "too close to call"),  # one seed: no interval
])
def test_margin_status(low, high, spread, margin, expected):
    assert _common.margin_status(low, high, spread, margin) == expected


def run(label, seed, losses, final):
    steps = range(1, len(losses) + 1)
    return pd.DataFrame({"label": label, "seed": seed, "step": list(steps), "train_loss": losses,
                         "test_accuracy": [math.nan] * (len(losses) - 1) + [final]})


def test_rounding_spread_pairs_runs_and_reports_the_largest_difference():
    original = pd.concat([run("a", 0, [1.0, 0.5], 0.80), run("a", 1, [1.0, 0.6], 0.82), run("b", 0, [2.0, 1.0], 0.7)])
    rerun = pd.concat([run("a", 0, [1.0, 0.5], 0.80), run("a", 1, [1.0, 0.61], 0.825)])
    table = _common.rounding_spread(original, rerun)
    assert list(zip(table.label, table.seed)) == [("a", 0), ("a", 1)]  # only runs present in both
    assert table["abs_diff"].tolist() == pytest.approx([0.0, 0.005])
    assert table["trajectory differs"].tolist() == [False, True]
    assert table.attrs["spread"] == pytest.approx(0.005)
    with pytest.raises(ValueError, match="shares no"):
        _common.rounding_spread(original, run("c", 0, [1.0], 0.5))


def test_record_environment_names_versions_cpu_and_threads(capsys):
    record = _common.record_environment(processes=2)
    for key in ("python", "numpy", "torch", "cpu", "cores", "torch threads (this process)"):
        assert key in record.index and str(record[key])
    assert "torch" in capsys.readouterr().out
