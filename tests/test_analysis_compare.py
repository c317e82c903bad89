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


def test_target_mode_censors_never_reached_runs_at_their_length():
    # Accuracy curves at steps 10..50; x = first step reaching 0.8, or the last step (50) when never reached.
    curves = {("exact", 0): [0.5, 0.8, 0.9, 0.9, 0.9], ("exact", 1): [0.5, 0.7, 0.8, 0.9, 0.9],
              ("exact", 2): [0.5, 0.6, 0.7, 0.8, 0.9], ("exact", 3): [0.1, 0.2, 0.3, 0.4, 0.5],
              ("a", 0): [0.8, 0.9, 0.9, 0.9, 0.9], ("a", 1): [0.5, 0.8, 0.8, 0.8, 0.8],
              ("a", 2): [0.5, np.nan, 0.8, 0.8, 0.8], ("a", 3): [0.5, 0.5, 0.9, 0.9, 0.9],
              ("never", 0): [0.1] * 5, ("never", 1): [0.1] * 5}
    rows = [{"label": label, "seed": seed, "step": 10 * (i + 1), "bits": 100 * (i + 1), "test_accuracy": value}
            for (label, seed), values in curves.items() for i, value in enumerate(values)]
    result = sim.compare(pd.DataFrame(rows), baseline="exact", target=0.8).set_index("label")
    # a vs exact: seeds 0..3 reach at (10, 20, 30, 30) vs (20, 30, 40, censored at 50).
    a = result.loc["a"]
    d = np.array([-10.0, -10.0, -10.0, -20.0])
    assert a["n"] == 4 and a["never_reached"] == 1 and (a["censored"], a["baseline_censored"]) == (0, 1)
    assert a["mean"] == pytest.approx(22.5) and a["baseline_mean"] == pytest.approx(35.0)
    assert (a["ci_low"], a["ci_high"]) == pytest.approx(hand_interval(d))
    # The censored baseline run can only make a look worse than it is, so only the "less" side is tested.
    assert a["p_value"] == pytest.approx(2 * stats.ttest_1samp(d, 0.0, alternative="less").pvalue)
    assert a["verdict"] == "better (censored)"  # fewer steps is better
    # never vs exact: censored at 50 on both seeds against 20 and 30; "better" is not testable, "worse" is.
    never = result.loc["never"]
    assert never["n"] == 2 and never["censored"] == 2 and never["baseline_censored"] == 0
    assert never["mean_diff"] == pytest.approx(25.0)
    p_greater = stats.ttest_1samp(np.array([30.0, 20.0]), 0.0, alternative="greater").pvalue
    assert never["p_value"] == pytest.approx(2 * p_greater)
    assert never["verdict"] == "not distinguishable (censored)"
    in_bits = sim.compare(pd.DataFrame(rows), baseline="exact", target=0.8, x="bits").set_index("label")
    assert in_bits.loc["a", "mean_diff"] == pytest.approx(10 * d.mean())
    assert in_bits.loc["never", "baseline_mean"] == pytest.approx(250.0) and in_bits.loc["never", "mean"] == 500.0


def test_censoring_never_flatters_the_method_that_fails_to_reach_the_target():
    # "lucky" reaches 90% at step 10 on 3 seeds and never on 2; the baseline always reaches it at step 30.
    # Dropping the never-reached pairs would call "lucky" faster on the 3 pairs left.
    reach = {"exact": [30, 30, 30, 30, 30], "lucky": [10, 10, 10, None, None], "slow": [60, 70, None, 80, 70]}
    rows = []
    for label, steps in reach.items():
        for seed, first in enumerate(steps):
            for step in range(10, 110, 10):
                rows.append({"label": label, "seed": seed, "step": step,
                             "test_accuracy": 0.95 if first is not None and step >= first else 0.5})
    result = sim.compare(pd.DataFrame(rows), baseline="exact", target=0.9).set_index("label")
    lucky = result.loc["lucky"]
    assert lucky["n"] == 5 and lucky["censored"] == 2 and lucky["mean_diff"] == pytest.approx((-60 + 140) / 5)
    assert not lucky["verdict"].startswith("better") and lucky["verdict"].endswith("(censored)")
    slow = result.loc["slow"]  # censored at 100: the difference 70 is a lower bound, "worse" holds
    assert slow["censored"] == 1 and slow["verdict"] == "worse (censored)"
    finite_only = sim.compare(pd.DataFrame(rows)[lambda t: t.seed < 3], baseline="exact", target=0.9)
    assert finite_only.set_index("label").loc["lucky", "verdict"] == "better"  # what dropping would have said
    with_margin = sim.compare(pd.DataFrame(rows), baseline="exact", target=0.9, equivalence_margin=1000.0)
    assert not with_margin.set_index("label")["verdict"].str.startswith("equivalent").any()


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


# --- p-values, equivalence (TOST), the Holm correction, one row per run ---------------------------------------

def hand_holm(p: list[float]) -> list[float]:
    """Holm's adjusted p-values straight from the definition: a double loop over the sorted p-values."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted = [0.0] * m
    for i, index in enumerate(order):
        adjusted[index] = max(min(1.0, (m - j) * p[order[j]]) for j in range(i + 1))
    return adjusted


def holm_rejects(p: list[float], alpha: float) -> set[int]:
    """Holm's step-down test: reject in ascending order while p_(k) <= alpha / (m - k + 1) (k from 1)."""
    m = len(p)
    rejected = set()
    for k, index in enumerate(sorted(range(m), key=lambda i: p[i])):
        if p[index] > alpha / (m - k):
            break
        rejected.add(index)
    return rejected


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 10), st.integers(0, 2 ** 32 - 1), st.floats(0.001, 0.05), st.sampled_from([0.9, 0.95]))
def test_p_values_and_tost_match_scipy_one_sided_paired_t_tests(n, seed, margin, confidence):
    rng = np.random.default_rng(seed)
    base = rng.normal(0.8, 0.05, n)
    configs = {"exact": base, "near": base + rng.normal(0.0, 0.01, n), "far": base + rng.normal(0.03, 0.02, n)}
    table = tidy({label: dict(enumerate(values.tolist())) for label, values in configs.items()})
    result = sim.compare(table, baseline="exact", confidence=confidence, equivalence_margin=margin)
    alpha = 1 - confidence
    for _, row in result.iterrows():
        config = configs[row["label"]]
        assert row["p_value"] == pytest.approx(stats.ttest_rel(config, base).pvalue, rel=1e-9, abs=1e-15)
        above = stats.ttest_rel(config + margin, base, alternative="greater").pvalue  # H1: mean diff > -margin
        below = stats.ttest_rel(config - margin, base, alternative="less").pvalue  # H1: mean diff < margin
        assert row["p_equivalence"] == pytest.approx(max(above, below), rel=1e-9, abs=1e-15)
        assert row["p_adjusted"] == row["p_value"] and row["p_equivalence_adjusted"] == row["p_equivalence"]
        # TOST at alpha rejects exactly when the (1 - 2 alpha) interval lies inside (-margin, margin).
        inner = stats.ttest_rel(config, base).confidence_interval(1 - 2 * alpha)
        if min(abs(inner.low + margin), abs(inner.high - margin)) > 1e-9:  # not on the boundary
            assert (row["p_equivalence"] < alpha) == (-margin < inner.low and inner.high < margin)
        differs = row["ci_low"] > 0 or row["ci_high"] < 0
        assert (row["p_value"] < alpha) == differs or abs(row["p_value"] - alpha) < 1e-9
        expected = ("better" if row["mean_diff"] > 0 else "worse") if differs else \
            "equivalent" if row["p_equivalence"] < alpha else "not distinguishable"
        assert row["verdict"] == expected


def test_a_difference_shown_inside_the_margin_is_reported_as_a_difference():
    base = np.array([0.80, 0.82, 0.78, 0.81, 0.79, 0.83])
    slightly = base - np.array([0.001, 0.0012, 0.0009, 0.0011, 0.001, 0.0008])  # 0.1 points lower, tight
    table = tidy({"exact": dict(enumerate(base)), "rank4": dict(enumerate(slightly)),
                  "same": dict(enumerate(base + np.array([1, -1, 1, -1, 1, -1]) * 1e-3))})
    result = sim.compare(table, baseline="exact", equivalence_margin=0.005).set_index("label")
    assert result.loc["rank4", "p_value"] < 0.05 and result.loc["rank4", "p_equivalence"] < 0.05  # both reject
    assert result.loc["rank4", "verdict"] == "worse"  # the difference test takes precedence
    assert result.loc["same", "verdict"] == "equivalent" and result.loc["same", "p_value"] > 0.05
    without = sim.compare(table, baseline="exact").set_index("label")
    assert math.isnan(without.loc["same", "p_equivalence"]) and without.loc["same", "verdict"] == "not distinguishable"
    wide = sim.compare(table, baseline="exact", equivalence_margin=0.0005).set_index("label")
    assert wide.loc["same", "verdict"] == "not distinguishable"  # +-0.1 point spread, +-0.05 point margin


def test_tost_with_no_spread_is_decided_by_the_constant_difference():
    table = tidy({"exact": {0: 0.5, 1: 0.6, 2: 0.7}, "inside": {0: 0.502, 1: 0.602, 2: 0.702},
                  "outside": {0: 0.51, 1: 0.61, 2: 0.71}, "same": {0: 0.5, 1: 0.6, 2: 0.7}})
    result = sim.compare(table, baseline="exact", equivalence_margin=0.005).set_index("label")
    assert result.loc["inside", "p_equivalence"] == 0.0 and result.loc["inside", "verdict"] == "better"
    assert result.loc["outside", "p_equivalence"] == 1.0 and result.loc["outside", "verdict"] == "better"
    assert result.loc["same", "p_value"] == 1.0 and result.loc["same", "p_equivalence"] == 0.0
    assert result.loc["same", "verdict"] == "equivalent"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12), st.floats(0.001, 0.2))
def test_holm_matches_its_definition_and_the_step_down_test(p, alpha):
    adjusted = sim.analysis.significance.holm(p)
    assert adjusted.tolist() == pytest.approx(hand_holm(p), abs=1e-12)
    if all(abs(a - alpha) > 1e-9 for a in adjusted):  # at a tie "<" and "<=" differ
        assert {i for i, a in enumerate(adjusted) if a <= alpha} == holm_rejects(p, alpha)
    try:
        from statsmodels.stats.multitest import multipletests
    except ImportError:
        return  # not a dependency: the hand references above are the oracle
    assert adjusted.tolist() == pytest.approx(multipletests(p, alpha, method="holm")[1].tolist(), abs=1e-12)


def test_holm_counts_comparisons_without_a_p_value_in_the_family():
    adjusted = sim.analysis.significance.holm([0.01, math.nan, 0.04])
    assert adjusted[0] == pytest.approx(0.03) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.08)


def test_holm_correction_adjusts_both_families_and_verdicts_follow_the_adjusted_p_values():
    base = np.random.default_rng(5).normal(0.8, 0.05, 6)
    z = np.array([-1.5, -0.5, 0.0, 0.2, 0.6, 1.2])
    z = (z - z.mean()) / z.std(ddof=1)  # differences mean + s z have t = mean sqrt(6) / s exactly
    s = 0.004
    t_values = {"a": 3.2, "b": 2.8, "c": 10.0, "d": 0.3, "e": -0.5}  # a, b: 0.01 < p < 0.05; c: p tiny
    configs = {name: base + t * s / math.sqrt(6) + s * z for name, t in t_values.items()}
    table = tidy({"exact": dict(enumerate(base)), **{k: dict(enumerate(v)) for k, v in configs.items()}})
    raw = sim.compare(table, baseline="exact", equivalence_margin=0.01)
    holm = sim.compare(table, baseline="exact", equivalence_margin=0.01, correction="holm")
    assert holm["p_value"].tolist() == raw["p_value"].tolist()
    assert holm["p_adjusted"].tolist() == pytest.approx(hand_holm(raw["p_value"].tolist()))
    assert holm["p_equivalence_adjusted"].tolist() == pytest.approx(hand_holm(raw["p_equivalence"].tolist()))
    for _, row in holm.iterrows():
        expected = ("better" if row["mean_diff"] > 0 else "worse") if row["p_adjusted"] < 0.05 else \
            "equivalent" if row["p_equivalence_adjusted"] < 0.05 else "not distinguishable"
        assert row["verdict"] == expected
    # Raw, a and b are "better"; over a family of 5, Holm keeps only c.
    assert raw.set_index("label").loc[["a", "b", "c"], "verdict"].tolist() == ["better"] * 3
    assert not holm.set_index("label").loc[["a", "b"], "verdict"].isin(["better", "worse"]).any()
    assert holm.set_index("label").loc["c", "verdict"] == "better"
    assert holm.attrs["correction"] == "holm" and holm.attrs["equivalence_margin"] == 0.01


def test_one_row_per_run_tables_compare_like_the_final_rows_of_a_history():
    rng = np.random.default_rng(11)
    finals = {label: dict(enumerate(rng.normal(0.8, 0.05, 5).tolist())) for label in ("exact", "a", "b")}
    history = tidy(finals)
    per_run = history.sort_values("step").groupby(["label", "seed"], as_index=False).last().drop(columns="step")
    assert "step" not in per_run and len(per_run) == 15
    pd.testing.assert_frame_equal(sim.compare(per_run, baseline="exact", equivalence_margin=0.02),
                                  sim.compare(history, baseline="exact", equivalence_margin=0.02))
    with pytest.raises(ValueError, match="configuration 'a' has two rows with seed 0; allowed: one row per"):
        sim.compare(pd.concat([per_run, per_run]), baseline="exact")


def test_new_arguments_are_validated():
    table = tidy({"exact": {0: 0.5, 1: 0.6}, "a": {0: 0.9, 1: 0.9}})
    for bad in (0, -0.01, math.inf, math.nan, True, "0.005"):
        with pytest.raises(ValueError, match=r"equivalence_margin=.* is invalid; allowed: None or a finite number > 0"):
            sim.compare(table, baseline="exact", equivalence_margin=bad)
    with pytest.raises(ValueError, match=r"correction='bonferroni' is invalid; allowed: one of None, 'holm'"):
        sim.compare(table, baseline="exact", correction="bonferroni")
    with pytest.raises(ValueError, match="config and reference are invalid with NaN/inf"):
        sim.analysis.paired_summary(np.array([1.0, math.inf]), np.array([1.0, 2.0]))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2 ** 32 - 1), st.integers(2, 8), st.floats(0.3, 0.9))
def test_censored_sides_never_get_the_verdicts_censoring_could_fake(seed, n, reach_rate):
    """Random reach steps, some never reached: the invariants of the censoring rule hold on every table."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in ("exact", "a", "b"):
        for s in range(n):
            first = int(rng.integers(1, 10)) * 10 if rng.random() < reach_rate else None
            for step in range(10, 110, 10):
                rows.append({"label": label, "seed": s, "step": step,
                             "test_accuracy": 0.9 if first is not None and step >= first else 0.1})
    result = sim.compare(pd.DataFrame(rows), baseline="exact", target=0.5, equivalence_margin=50.0)
    for _, row in result.iterrows():
        word = row["verdict"].removesuffix(" (censored)")
        assert row["verdict"].endswith("(censored)") == (row["never_reached"] > 0)
        if row["censored"]:
            assert word not in ("better", "equivalent")
        if row["baseline_censored"]:
            assert word not in ("worse", "equivalent")
        assert row["n"] == n  # nothing dropped
