"""The learning-rate protocol (sim.tune_lr), parallel sweeps equal to serial ones, and the differences plot."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import sim
from sim.analysis.compare import final_value
from sim.analysis.protocol import best_lr, summarise

TINY = sim.Experiment(task="digits-mlp", workers=2, steps=20, batch_size=16, eval_every=0,
                      task_options={"hidden": [16]})


def test_parallel_sweep_equals_the_serial_one_row_for_row():
    grid = {"compressor": [{"name": "identity"}, {"name": "powersgd", "rank": 1}]}
    base = TINY.replace(steps=6)
    serial = sim.sweep(base, grid=grid, seeds=[0, 1], progress=False)
    parallel = sim.sweep(base, grid=grid, seeds=[0, 1], progress=False, processes=2)
    pd.testing.assert_frame_equal(parallel, serial, check_exact=True)
    assert serial["label"].tolist() == serial["run"].tolist()
    assert serial.groupby(["label", "seed"], sort=False).ngroups == 4


def test_sweep_rejects_a_bad_process_count():
    with pytest.raises(ValueError, match="processes=0 is invalid"):
        sim.sweep(TINY, seeds=[0], processes=0, progress=False)


def test_tune_lr_picks_the_argmax_of_the_mean_final_metric_and_is_deterministic():
    lrs = [0.01, 0.1, 0.5]
    best, table = sim.tune_lr(TINY, lrs, seeds=(0, 1))
    assert table["lr"].tolist() == lrs and table["n"].tolist() == [2, 2, 2] and (table["diverged"] == 0).all()
    # The reference: the same runs, scored by hand.
    for _, row in table.iterrows():
        scores = [final_value(sim.run(TINY.replace(lr=row["lr"], seed=s)).history["test_accuracy"]) for s in (0, 1)]
        assert row["mean"] == np.mean(scores) and row["std"] == pytest.approx(np.std(scores, ddof=1))
    assert best == table.loc[table["mean"].idxmax(), "lr"]
    again_best, again = sim.tune_lr(TINY, lrs, seeds=(0, 1))
    assert again_best == best
    pd.testing.assert_frame_equal(again, table, check_exact=True)
    # Lower is better for a loss: the argmin.
    loss_best, loss_table = sim.tune_lr(TINY, lrs, seeds=(0,), metric="train_loss", higher_is_better=False)
    assert loss_best == loss_table.loc[loss_table["mean"].idxmin(), "lr"]


def test_diverged_rates_rank_last():
    huge = 1e20  # the second step's gradients overflow: NaN/Inf stops the run
    best, table = sim.tune_lr(TINY, [huge, 0.05], seeds=(0,), metric="train_loss", higher_is_better=False)
    row = table.set_index("lr").loc[huge]
    assert row["diverged"] == 1 and row["n"] == 0 and math.isnan(row["mean"])
    assert best == 0.05
    with pytest.raises(ValueError, match="every learning rate"):
        sim.tune_lr(TINY, [huge], seeds=(0,))


def test_best_lr_breaks_ties_toward_the_smaller_rate_and_skips_any_divergence():
    table = pd.DataFrame([summarise(0.05, [0.5, 0.7]), summarise(0.1, [0.7, 0.5]), summarise(0.2, [0.6, 0.6]),
                          summarise(0.4, [0.9, math.nan]), summarise(0.8, [0.1, 0.2])])
    assert table["mean"].tolist()[:3] == [0.6, 0.6, 0.6] and table["diverged"].tolist() == [0, 0, 0, 1, 0]
    assert best_lr(table) == 0.05  # 0.4 has the best finished score but one run diverged
    assert best_lr(table, higher_is_better=False) == 0.8
    assert best_lr(table.iloc[1:]) == 0.1


def test_tune_lr_rejects_bad_grids():
    for bad in ([], [0.1, 0.1], [0.0], [-1.0], "0.1", [float("nan")], [True]):
        with pytest.raises(ValueError, match="lrs="):
            sim.tune_lr(TINY, bad)
    with pytest.raises(ValueError, match="seeds="):
        sim.tune_lr(TINY, [0.1], seeds=())
    with pytest.raises(ValueError, match="metric='accuracy' is invalid"):
        sim.tune_lr(TINY.replace(steps=2), [0.1], metric="accuracy")


def test_plot_differences_draws_one_bar_per_configuration():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.collections import LineCollection

    rows = [{"label": label, "seed": seed, "step": 1, "test_accuracy": base + shift + 0.01 * seed * (label == "b")}
            for label, shift in (("exact", 0.0), ("a", 0.02), ("b", -0.01), ("c", 0.0)) for seed in range(4)
            for base in [0.5 + 0.1 * seed]]
    comparison = sim.compare(pd.DataFrame(rows), baseline="exact")
    ax = sim.plot.plot_differences(comparison)
    bars = [c for c in ax.collections if isinstance(c, LineCollection)]
    horizontal = [seg for c in bars for seg in c.get_segments() if len(seg) == 2 and seg[0][1] == seg[1][1]]
    assert len(horizontal) == len(comparison) == 3
    label_at = {round(y): t.get_text() for y, t in zip(ax.get_yticks(), ax.get_yticklabels())}
    assert label_at[max(label_at)] == comparison["label"].iloc[0]  # the first configuration on top
    interval = comparison.set_index("label")
    for segment in horizontal:  # each bar spans its own configuration's interval
        name = label_at[round(segment[0][1])]
        low, high = sorted((segment[0][0], segment[1][0]))
        assert np.allclose([low, high], interval.loc[name, ["ci_low", "ci_high"]].astype(float), rtol=0, atol=1e-12)
    assert any(list(line.get_xdata()) == [0.0, 0.0] for line in ax.get_lines())  # the zero line
    with pytest.raises(ValueError, match="ci_low"):
        sim.plot.plot_differences(comparison.drop(columns="ci_low"))
