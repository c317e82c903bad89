"""The demo's table on a tiny run: one row per configuration, the paired CI columns from sim.compare."""
from __future__ import annotations

import sim.cli.demo as demo


def test_demo_writes_summary_with_paired_intervals(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEFAULT", demo.DEFAULT.replace(eval_every=5, workers=2))
    summary = demo.main(["--task", "digits-mlp", "--steps", "6", "--seeds", "2", "--processes", "1",
                         "--out", str(tmp_path)])
    assert list(summary["compressor"]) == ["exact", "powersgd r=1", "powersgd r=2", "powersgd r=4"]
    assert summary.loc[0, "verdict"] == "baseline" and summary.loc[0, "compression_ratio"] == 1.0
    assert set(summary.loc[1:, "verdict"]) <= {"better", "worse", "not distinguishable"}
    assert (summary.loc[1:, "compression_ratio"] > 1).all()
    for name in ("summary.csv", "history.csv", "accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0
