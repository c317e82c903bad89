"""Accordion adaptive rank: validation, decisions against a slow reference, history column, bitwise resume."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import compressors
import sim
from compressors.ranks.adaptive import NO_NORM
from compressors.testing import check_compressor
from reference import assert_resume_is_bitwise, run_interrupted
from sim import checkpoint
from compressors.comm import VirtualCollective

F64 = torch.float64
SHAPES = {"a": (12, 10), "b": (9, 14), "bias": (12,)}
RULE = {"rule": "accordion", "low_rank": 1, "high_rank": 3, "interval": 3, "threshold": 0.3}


def make(**rule):
    return compressors.make("powersgd", adaptive={**RULE, **rule}, min_compression_rate=0.0, error_feedback="none")


@pytest.mark.parametrize("key,value,match", [
    ("rule", "sometimes", r"adaptive\.rule='sometimes' is invalid; allowed: one of 'accordion'"),
    ("low_rank", 0, r"adaptive\.low_rank=0 is invalid"),
    ("high_rank", 0, r"adaptive\.high_rank=0 is invalid"),
    ("interval", 0, r"adaptive\.interval=0 is invalid"),
    ("interval", 2.5, r"adaptive\.interval=2\.5 is invalid"),
    ("threshold", 0.0, r"adaptive\.threshold=0\.0 is invalid"),
    ("threshold", "big", r"adaptive\.threshold='big' is invalid"),
])
def test_every_key_is_validated(key, value, match):
    with pytest.raises(ValueError, match=match):
        make(**{key: value})


def test_high_below_low_unknown_and_missing_keys_are_refused():
    with pytest.raises(ValueError, match=r"adaptive\.high_rank=1 is invalid; allowed: an integer >= adaptive\.low_rank \(2\)"):
        make(low_rank=2, high_rank=1)
    with pytest.raises(ValueError, match="interva"):
        compressors.make("powersgd", adaptive={**RULE, "intervall": 3})
    with pytest.raises(ValueError, match="missing"):
        compressors.make("powersgd", adaptive={"rule": "accordion", "low_rank": 1})
    with pytest.raises(ValueError, match="adaptive=5 is invalid"):
        compressors.make("powersgd", adaptive=5)
    with pytest.raises(ValueError, match="rank=2 is invalid"):
        compressors.make("powersgd", rank=2, adaptive=RULE)


def reference_ranks(updates, rule):
    """Accordion from its definition: per interval, ||sum of updates||; critical iff relative change >= eta."""
    ranks, rank, previous, acc = [], rule["high_rank"], None, None
    for t, update in enumerate(updates):
        ranks.append(rank)
        flat = torch.cat([u.flatten() for u in update.values()])
        acc = flat.clone() if acc is None else acc + flat
        if (t + 1) % rule["interval"] == 0:
            norm = float(acc.norm())
            if previous is None:
                rank = rule["high_rank"]
            elif previous == 0:
                rank = rule["high_rank"] if norm > 0 else rule["low_rank"]
            else:
                critical = abs(previous - norm) / previous >= rule["threshold"]
                rank = rule["high_rank"] if critical else rule["low_rank"]
            previous, acc = norm, None
    return ranks


def test_decisions_follow_the_relative_change_of_the_accumulated_update_norm():
    """Gradients whose scale changes by phases: the rule must switch both ways; ranks match the reference."""
    agg = make()
    state = agg.init(SHAPES, workers=3, seed=0, dtype=F64)
    comm = VirtualCollective(3)
    scales = [1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3.1, 3, 3, 3, 3, 3, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    updates, used, bits = [], [], []
    for t, scale in enumerate(scales):
        gen = torch.Generator().manual_seed(t)
        g = {n: scale * torch.randn((3, *s), generator=gen, dtype=F64) for n, s in SHAPES.items()}
        comm.ledger.begin_step()
        update, state = agg.aggregate(g, state, comm)
        updates.append({n: update[n] for n in ("a", "b")})  # the compressed tensors the rule observes
        used.append(state.compressed.ranks["a"])
        bits.append(sum(r.bits for r in comm.ledger.step_records))
    expected = reference_ranks(updates, RULE)
    assert used == expected
    assert {1, 3} <= set(used)  # it did switch
    shapes = {"a": (12, 10), "b": (9, 14)}
    dense = 12 * 64
    for r, b in zip(used, bits):
        assert b == agg.control.bits_at(shapes, {n: r for n in shapes}, F64) + dense
    assert state.compressed.rule.decisions == len(scales) // RULE["interval"]
    assert state.compressed.rule.previous_norm != NO_NORM


def test_contract_battery():
    shapes = {"w": (16, 12), "conv": (8, 2, 3, 3), "b": (6,)}
    report = check_compressor("powersgd", shapes=shapes, adaptive={**RULE, "interval": 1},
                              min_compression_rate=0.0, checks=[c for c in compressors.testing.CHECKS
                                                                if c != "ledger_matches_bits_per_step"])
    assert set(report.values()) == {"ok"}
    assert check_compressor("powersgd", shapes=shapes, adaptive=RULE, min_compression_rate=0.0,
                            checks=["ledger_matches_bits_per_step"]) == {"ledger_matches_bits_per_step": "ok"}


def tiny(**changes) -> sim.Experiment:
    base = dict(task="digits-mlp", workers=3, steps=24, batch_size=8, eval_every=8, log_every=1, seed=1,
                compressor={"name": "powersgd", "adaptive": {**RULE, "interval": 2, "threshold": 0.1},
                            "min_compression_rate": 0.0})
    base.update(changes)
    return sim.Experiment(**base)


def test_rank_column_and_bits_agree_and_resume_is_bitwise(tmp_path):
    e = tiny()
    full = sim.run(e)
    ranks = full.history["rank"]
    assert ranks.notna().all() and set(ranks) <= {1.0, 3.0} and ranks.iloc[0] == 3.0
    assert len(set(ranks)) == 2, "this run should switch ranks (the test would prove nothing otherwise)"
    agg = e.make_compressor()
    shapes = {n: tuple(p.shape) for n, p in full.params.items()}
    chosen, rest = agg.partition.split(shapes)
    dense = compressors.Identity().bits_per_step(rest)
    per_step = full.history["bits"].diff().fillna(full.history["bits"].iloc[0])
    for r, b in zip(ranks, per_step):
        assert b == agg.control.bits_at(chosen, {n: int(r) for n in chosen}) + dense

    run_interrupted(e, tmp_path, stop_at=13, every=5)
    assert checkpoint.latest(tmp_path).name == "checkpoint-000000010.pt"
    assert_resume_is_bitwise(e, full, tmp_path)


def test_same_seed_same_decisions_and_norms_are_finite():
    a, b = sim.run(tiny(steps=12)), sim.run(tiny(steps=12))
    pd.testing.assert_frame_equal(a.history, b.history, check_exact=True)
    rule_state = a.extras["final_state"].aggregator.compressed.inner.rule
    assert math.isfinite(rule_state.previous_norm) and rule_state.previous_norm >= 0


@pytest.mark.parametrize("compressor", [
    {"name": "powersgd", "rank_schedule": [[0, 3], [5, 1], [9, 2]], "min_compression_rate": 0.0},
    {"name": "powersgd", "rank_allocation": {"rule": "spectral", "budget_bits": 60000, "every": 4, "max_rank": 3},
     "min_compression_rate": 0.0},
    {"name": "powersgd", "layer_ranks": {"1.*": 2}, "rank": 1, "start_compressing_after_num_steps": 2},
], ids=["schedule", "allocation", "layer_ranks"])
def test_every_rank_rule_resumes_bitwise(tmp_path, compressor):
    e = tiny(compressor=compressor, steps=14)
    full = sim.run(e)

    run_interrupted(e, tmp_path, stop_at=11, every=4)
    assert_resume_is_bitwise(e, full, tmp_path)
