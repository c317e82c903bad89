"""The learning-rate protocol (sim.tune_lr), parallel sweeps equal to serial ones, and the differences plot."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

import sim
from sim.analysis.compare import final_value
from sim.analysis import protocol
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


@pytest.mark.filterwarnings("ignore:tune_lr.*on the edge")  # max_extensions=0 on purpose
def test_tune_lr_picks_the_argmax_of_the_mean_final_metric_and_is_deterministic():
    lrs = [0.01, 0.1, 0.5]
    # test_accuracy only because TINY has no validation split; the flag says so (see the val_* test below).
    best, table = sim.tune_lr(TINY, lrs, seeds=(0, 1), metric="test_accuracy", allow_test_metric=True,
                              max_extensions=0)
    assert table["lr"].tolist() == lrs and table["n"].tolist() == [2, 2, 2] and (table["diverged"] == 0).all()
    assert not table["added"].any() and table.attrs["extensions"] == 0
    # The reference: the same runs, scored by hand.
    for _, row in table.iterrows():
        scores = [final_value(sim.run(TINY.replace(lr=row["lr"], seed=s)).history["test_accuracy"]) for s in (0, 1)]
        assert row["mean"] == np.mean(scores) and row["std"] == pytest.approx(np.std(scores, ddof=1))
    assert best == table.loc[table["mean"].idxmax(), "lr"]
    again_best, again = sim.tune_lr(TINY, lrs, seeds=(0, 1), metric="test_accuracy", allow_test_metric=True,
                                    max_extensions=0)
    assert again_best == best
    pd.testing.assert_frame_equal(again, table, check_exact=True)
    # Lower is better for a loss: the argmin.
    loss_best, loss_table = sim.tune_lr(TINY, lrs, metric="train_loss", higher_is_better=False, max_extensions=0)
    assert loss_best == loss_table.loc[loss_table["mean"].idxmin(), "lr"]
    assert loss_table.attrs["seeds"] == [0, 1]  # two seeds by default


@pytest.mark.filterwarnings("ignore:tune_lr.*on the edge")  # max_extensions=0 on purpose
def test_diverged_rates_rank_last():
    huge = 1e20  # the second step's gradients overflow: NaN/Inf stops the run
    best, table = sim.tune_lr(TINY, [huge, 0.05], metric="train_loss", higher_is_better=False, max_extensions=0)
    row = table.set_index("lr").loc[huge]
    assert row["diverged"] == 2 and row["n"] == 0 and math.isnan(row["mean"])
    assert best == 0.05
    with pytest.raises(ValueError, match="every learning rate"):
        sim.tune_lr(TINY, [huge], metric="train_loss")


def test_best_lr_breaks_ties_toward_the_smaller_rate_and_skips_any_divergence():
    table = pd.DataFrame([summarise(0.05, [0.5, 0.7]), summarise(0.1, [0.7, 0.5]), summarise(0.2, [0.6, 0.6]),
                          summarise(0.4, [0.9, math.nan]), summarise(0.8, [0.1, 0.2])])
    assert table["mean"].tolist()[:3] == [0.6, 0.6, 0.6] and table["diverged"].tolist() == [0, 0, 0, 1, 0]
    assert best_lr(table) == 0.05  # 0.4 has the best finished score but one run diverged
    assert best_lr(table, higher_is_better=False) == 0.8
    assert best_lr(table.iloc[1:]) == 0.1


def test_tune_lr_rejects_bad_grids_seeds_and_metrics():
    for bad in ([], [0.1, 0.1], [0.0], [-1.0], "0.1", [float("nan")], [True]):
        with pytest.raises(ValueError, match="lrs="):
            sim.tune_lr(TINY, bad)
    for bad in ((), (0,), (1, 1), (0, -1), "01", (0, 1.5), 3):
        with pytest.raises(ValueError, match=r"seeds=.* is invalid; allowed: at least 2 distinct"):
            sim.tune_lr(TINY, [0.1], seeds=bad)
    with pytest.raises(ValueError, match="metric='accuracy' is invalid"):
        sim.tune_lr(TINY.replace(steps=2), [0.1], metric="accuracy")
    for test_metric in ("test_accuracy", "test_loss"):
        with pytest.raises(ValueError, match=rf"metric='{test_metric}' is invalid; .*test split.*allow_test_metric"):
            sim.tune_lr(TINY, [0.1], metric=test_metric)
    with pytest.raises(ValueError, match="max_extensions=-1 is invalid"):
        sim.tune_lr(TINY, [0.1], metric="train_loss", max_extensions=-1)


def test_validation_metric_without_a_validation_split_says_how_to_get_one():
    with pytest.raises(ValueError, match=r"metric='val_accuracy' is invalid; .*validation_fraction"):
        sim.tune_lr(TINY.replace(steps=2), [0.1])


def fake_history(experiment: sim.Experiment):
    """A run in no time: validation accuracy peaks at lr = 1 (in log scale), seeds add +-0.01; lr > 20 diverges."""
    if experiment.lr > 20:
        return None
    score = 0.9 - 0.1 * math.log10(experiment.lr) ** 2 + 0.01 * (-1) ** experiment.seed
    return pd.DataFrame({"step": [0, 10], "val_accuracy": [math.nan, score]})


def counting(monkeypatch) -> list:
    calls = []

    def run(experiment):
        calls.append((experiment.lr, experiment.seed))
        return fake_history(experiment)

    monkeypatch.setattr(protocol, "run_history_or_none", run)
    return calls


def test_a_best_rate_on_the_upper_edge_extends_the_grid_at_its_own_ratio(monkeypatch):
    calls = counting(monkeypatch)
    best, table = sim.tune_lr(TINY, [0.01, 0.03, 0.1], seeds=[0, 1, 2])
    # 0.1 is best -> add 0.1 * 0.1 / 0.03 = 0.333.. -> best again -> 1.11.. -> best again -> 3.7..: worse, stop.
    ratio = 0.1 / 0.03
    expected_added = [0.1 * ratio, 0.1 * ratio ** 2, 0.1 * ratio ** 3]
    assert table["lr"].tolist() == pytest.approx([0.01, 0.03, 0.1, *expected_added], rel=1e-11)
    assert table["added"].tolist() == [False] * 3 + [True] * 3
    assert best == pytest.approx(0.1 * ratio ** 2, rel=1e-11) and table.attrs["extensions"] == 3
    assert not table.attrs["on_edge"]
    assert len(calls) == 6 * 3 and {seed for _, seed in calls} == {0, 1, 2}  # every rate on every seed, once
    hand = {lr: np.mean([fake_history(TINY.replace(lr=lr, seed=s)).val_accuracy.iloc[-1] for s in (0, 1, 2)])
            for lr in table["lr"]}
    assert table["mean"].tolist() == pytest.approx(list(hand.values()))
    assert best == max(hand, key=hand.get)


def test_a_best_rate_on_the_lower_edge_extends_downward_and_the_limit_warns(monkeypatch):
    calls = counting(monkeypatch)
    with pytest.warns(UserWarning, match="still on the edge of the grid"):
        best, table = sim.tune_lr(TINY, [100.0, 1000.0, 10000.0], max_extensions=2)
    # Every rate above 20 diverges: the grid grows downward, 10 (best, on the edge) -> 1 (best, limit 2 reached).
    assert table["lr"].tolist() == [1.0, 10.0, 100.0, 1000.0, 10000.0]
    assert table["added"].tolist() == [True, True, False, False, False]
    assert table["diverged"].tolist() == [0, 0, 2, 2, 2] and best == 1.0
    assert table.attrs["on_edge"] and table.attrs["extensions"] == 2
    assert len(calls) == 5 * 2
    with pytest.raises(ValueError, match="every learning rate in .* diverged"):
        sim.tune_lr(TINY, [1000.0, 10000.0], max_extensions=1)  # 100 diverges too
    calls.clear()
    with pytest.warns(UserWarning, match=r"0.5 is still on the edge .* after 0 extension"):  # a tie: the smaller
        best, table = sim.tune_lr(TINY, [0.5, 2.0], max_extensions=0)  # 0: the grid as given
    assert table["lr"].tolist() == [0.5, 2.0] and not table["added"].any() and len(calls) == 4


def test_an_interior_best_rate_or_a_single_rate_is_not_extended(monkeypatch):
    calls = counting(monkeypatch)
    best, table = sim.tune_lr(TINY, [0.1, 1.0, 10.0])
    assert best == 1.0 and not table["added"].any() and len(calls) == 6
    best, table = sim.tune_lr(TINY, [0.3])
    assert best == 0.3 and len(table) == 1 and not table.attrs["on_edge"]


@pytest.mark.skipif("validation_fraction" not in {f.name for f in dataclasses.fields(sim.Experiment)},
                    reason="needs Experiment(validation_fraction=...), which logs val_accuracy on a held-out "
                           "part of the training set")
def test_tune_lr_scores_on_the_validation_split_end_to_end():
    base = TINY.replace(validation_fraction=0.2)
    best, table = sim.tune_lr(base, [0.03, 0.1, 0.3], max_extensions=1)
    assert table.attrs["metric"] == "val_accuracy" and table.attrs["seeds"] == [0, 1]
    assert (table["n"] == 2).all()
    for _, row in table.iterrows():  # scored on val_accuracy, by hand
        scores = [final_value(sim.run(base.replace(lr=row["lr"], seed=s)).history["val_accuracy"]) for s in (0, 1)]
        assert row["mean"] == pytest.approx(np.mean(scores))
    assert best in table["lr"].tolist()
    with pytest.raises(ValueError, match="validation_fraction"):
        sim.tune_lr(TINY.replace(validation_fraction=0.0, steps=2), [0.1])


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
