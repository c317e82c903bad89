"""sim.compare against scipy's paired t interval and a hand-computed one; pairing by seed value; target mode."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import sim


def tidy(finals: dict[str, dict[int, float]], steps=(10, 20), noise_rng=None) -> pd.DataFrame:
    """A results table whose final (largest-step) test accuracy is finals[label][seed]; earlier steps differ."""
    rng = noise_rng or np.random.default_rng(123)
    rows = []
    for label, per_seed in finals.items():
        for seed, final in per_seed.items():
            for step in steps[:-1]:
                rows.append({"label": label, "seed": seed, "step": step, "test_accuracy": rng.normal(-5, 1)})
            rows.append({"label": label, "seed": seed, "step": steps[-1], "test_accuracy": final})
    return pd.DataFrame(rows)


def hand_interval(d: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """mean -+ t_{(1+c)/2, n-1} s / sqrt(n), s with n - 1 degrees of freedom (the textbook paired interval)."""
    n = len(d)
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * np.std(d, ddof=1) / math.sqrt(n)
    return d.mean() - half, d.mean() + half


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 12), st.integers(0, 2 ** 32 - 1), st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_matches_scipy_ttest_rel_and_hand_interval(n, seed, confidence):
    rng = np.random.default_rng(seed)
    base = rng.normal(0.8, 0.05, n)
    configs = {"exact": base, "a": base + rng.normal(0.01, 0.02, n), "b": rng.normal(0.7, 0.1, n)}
    table = tidy({label: dict(zip(range(100, 100 + n), values.tolist())) for label, values in configs.items()})
    result = sim.compare(table, baseline="exact", confidence=confidence)
    assert result["label"].tolist() == ["a", "b"]
    for _, row in result.iterrows():
        d = configs[row["label"]] - base
        reference = stats.ttest_rel(configs[row["label"]], base).confidence_interval(confidence)
        assert row["ci_low"] == pytest.approx(reference.low, rel=1e-9, abs=1e-12)
        assert row["ci_high"] == pytest.approx(reference.high, rel=1e-9, abs=1e-12)
        low, high = hand_interval(d, confidence)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high), rel=1e-9, abs=1e-12)
        assert row["mean_diff"] == pytest.approx(d.mean(), abs=1e-12)
        assert row["mean"] == pytest.approx(configs[row["label"]].mean())
        assert row["baseline_mean"] == pytest.approx(base.mean())
        assert row["n"] == n and row["never_reached"] == 0
        expected = "better" if low > 0 else "worse" if high < 0 else "not distinguishable"
        assert row["verdict"] == expected


def test_pairs_by_seed_value_not_row_position():
    base = {0: 0.5, 1: 0.9, 2: 0.1, 3: 0.7}
    config = {seed: value + 0.01 * (seed + 1) for seed, value in base.items()}  # d = 0.01, 0.02, 0.03, 0.04
    table = tidy({"exact": base, "a": dict(reversed(list(config.items())))})
    shuffled = table.sample(frac=1.0, random_state=7).reset_index(drop=True)
    result = sim.compare(shuffled, baseline="exact").iloc[0]
    d = np.array([0.01, 0.02, 0.03, 0.04])
    assert result["mean_diff"] == pytest.approx(d.mean())
    assert (result["ci_low"], result["ci_high"]) == pytest.approx(hand_interval(d))
    assert result["verdict"] == "better"  # tiny spread: paired, the gain is clear although seeds vary by 0.8


def test_final_value_is_the_last_step_where_the_metric_exists():
    table = pd.DataFrame({"label": ["exact"] * 3 + ["a"] * 3, "seed": [0] * 6, "step": [3, 1, 2, 1, 3, 2],
                          "test_accuracy": [np.nan, 0.1, 0.4, 0.2, np.nan, 0.5]})
    row = sim.compare(pd.concat([table, table.assign(seed=1, test_accuracy=table["test_accuracy"] + 1)]),
                      baseline="exact").iloc[0]
    assert row["mean_diff"] == pytest.approx(0.1) and row["n"] == 2  # steps 2: 0.5 - 0.4, NaN at step 3 ignored
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.1, 0.1))  # zero variance: [d, d]
    assert row["verdict"] == "better"


def test_only_shared_seeds_are_paired_and_one_pair_is_not_distinguishable():
    table = tidy({"exact": {0: 0.5, 1: 0.6, 2: 0.7}, "a": {1: 0.9, 2: 0.95, 5: 0.1}, "b": {2: 0.8, 9: 0.0}})
    result = sim.compare(table, baseline="exact").set_index("label")
    assert result.loc["a", "n"] == 2 and result.loc["a", "mean_diff"] == pytest.approx(0.275)
    assert result.loc["a", "mean"] == pytest.approx(0.925) and result.loc["a", "baseline_mean"] == pytest.approx(0.65)
    assert result.loc["b", "n"] == 1
    assert math.isnan(result.loc["b", "ci_low"]) and math.isnan(result.loc["b", "ci_high"])
    assert result.loc["b", "verdict"] == "not distinguishable" and result.loc["b", "mean_diff"] == pytest.approx(0.1)


def test_zero_differences_are_not_distinguishable_and_lower_is_better_flips_the_verdict():
    table = tidy({"exact": {0: 1.0, 1: 2.0, 2: 3.0}, "same": {0: 1.0, 1: 2.0, 2: 3.0},
                  "higher": {0: 1.5, 1: 2.4, 2: 3.6}})
    result = sim.compare(table, baseline="exact").set_index("label")
    assert (result.loc["same", "ci_low"], result.loc["same", "ci_high"]) == (0.0, 0.0)
    assert result.loc["same", "verdict"] == "not distinguishable" and result.loc["higher", "verdict"] == "better"
    as_loss = sim.compare(table.rename(columns={"test_accuracy": "test_loss"}), baseline="exact",
                          metric="test_loss", higher_is_better=False).set_index("label")
    assert as_loss.loc["higher", "verdict"] == "worse"


def test_target_mode_counts_never_reached_and_uses_finite_pairs():
    # Accuracy curves at steps 10..50; x = first step reaching 0.8.
    curves = {("exact", 0): [0.5, 0.8, 0.9, 0.9, 0.9], ("exact", 1): [0.5, 0.7, 0.8, 0.9, 0.9],
              ("exact", 2): [0.5, 0.6, 0.7, 0.8, 0.9], ("exact", 3): [0.1, 0.2, 0.3, 0.4, 0.5],
              ("a", 0): [0.8, 0.9, 0.9, 0.9, 0.9], ("a", 1): [0.5, 0.8, 0.8, 0.8, 0.8],
              ("a", 2): [0.5, np.nan, 0.8, 0.8, 0.8], ("a", 3): [0.9, 0.9, 0.9, 0.9, 0.9],
              ("never", 0): [0.1] * 5, ("never", 1): [0.1] * 5}
    rows = [{"label": label, "seed": seed, "step": 10 * (i + 1), "bits": 100 * (i + 1), "test_accuracy": value}
            for (label, seed), values in curves.items() for i, value in enumerate(values)]
    result = sim.compare(pd.DataFrame(rows), baseline="exact", target=0.8).set_index("label")
    # a vs exact: seeds 0, 1, 2 reach at (10, 20, 30) vs (20, 30, 40); seed 3: the baseline never does.
    assert result.loc["a", "never_reached"] == 1 and result.loc["a", "n"] == 3
    assert result.loc["a", "mean"] == pytest.approx(20.0) and result.loc["a", "baseline_mean"] == pytest.approx(30.0)
    assert (result.loc["a", "ci_low"], result.loc["a", "ci_high"]) == (-10.0, -10.0)
    assert result.loc["a", "verdict"] == "better"  # fewer steps is better
    assert result.loc["never", "never_reached"] == 2 and result.loc["never", "n"] == 0
    assert math.isnan(result.loc["never", "ci_low"]) and result.loc["never", "verdict"] == "not distinguishable"
    in_bits = sim.compare(pd.DataFrame(rows), baseline="exact", target=0.8, x="bits").set_index("label")
    assert in_bits.loc["a", "mean_diff"] == pytest.approx(-100.0)


def test_works_on_sweep_and_load_results_tables(tmp_path):
    from sim.workflow.sweep import sweep_to_dir

    base = sim.Experiment(task="synthetic-lowrank", workers=2, steps=3, eval_every=0)
    grid = {"compressor": [{"name": "identity"}, {"name": "powersgd", "rank": 1}]}
    swept = sim.sweep(base, grid=grid, seeds=[0, 1], progress=False)
    assert (swept["label"] == swept["run"]).all()
    labels = list(dict.fromkeys(swept["label"]))
    metric = "train_loss"
    from_sweep = sim.compare(swept, baseline=labels[0], metric=metric, higher_is_better=False)
    assert from_sweep["label"].tolist() == labels[1:] and from_sweep["n"].tolist() == [2]
    stored = sweep_to_dir(base, tmp_path, grid=grid, seeds=[0, 1], progress=False)
    names = list(dict.fromkeys(stored["run"]))
    from_store = sim.compare(stored, baseline=names[0], metric=metric, higher_is_better=False)
    assert from_store.columns[0] == "run" and from_store["n"].tolist() == [2]
    assert from_store["mean_diff"].tolist() == pytest.approx(from_sweep["mean_diff"].tolist(), rel=1e-6)


def test_errors_name_the_field_and_allowed_values():
    table = tidy({"exact": {0: 0.5, 1: 0.6}, "a": {2: 0.9, 3: 0.9}})
    with pytest.raises(ValueError, match=r"baseline='nope' is invalid; allowed: .*'exact', 'a'"):
        sim.compare(table, baseline="nope")
    with pytest.raises(ValueError, match="configuration 'a' shares no seed with baseline 'exact'"):
        sim.compare(table, baseline="exact")
    with pytest.raises(ValueError, match="metric='accuracy' is invalid"):
        sim.compare(table, baseline="exact", metric="accuracy")
    with pytest.raises(ValueError, match="by='compressor' is invalid"):
        sim.compare(table, baseline="exact", by="compressor")
    with pytest.raises(ValueError, match="confidence=95 is invalid"):
        sim.compare(table, baseline="exact", confidence=95)
    with pytest.raises(ValueError, match="x='sim_time' is invalid"):
        sim.compare(table, baseline="exact", target=0.5, x="sim_time")
    with pytest.raises(ValueError, match="by='options' is invalid; allowed: a column of hashable values"):
        sim.compare(table.assign(options=[{"rank": 1}] * len(table)), baseline="exact", by="options")
    with pytest.raises(ValueError, match="by='rank' is invalid; allowed: a column without missing values"):
        sim.compare(table.assign(rank=[1.0, None] * (len(table) // 2)), baseline=1.0, by="rank")
    doubled = pd.concat([table, table])
    with pytest.raises(ValueError, match="configuration 'exact' has two runs with seed 0"):
        sim.compare(doubled, baseline="exact")
