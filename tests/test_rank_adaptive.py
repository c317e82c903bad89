"""Accordion adaptive rank, both rules ("accordion": per layer from the workers' gradients, high after lr decays;
"accordion-global": one rank from the aggregated update): validation, decisions against slow reference loops,
history column, bitwise resume."""
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
RULE = {"rule": "accordion-global", "low_rank": 1, "high_rank": 3, "interval": 3, "threshold": 0.3}


def make(**rule):
    return compressors.make("powersgd", adaptive={**RULE, **rule}, min_compression_rate=0.0, error_feedback="none")


@pytest.mark.parametrize("key,value,match", [
    ("rule", "sometimes", r"adaptive\.rule='sometimes' is invalid; allowed: one of 'accordion', 'accordion-global'"),
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
        compressors.make("powersgd", adaptive={"rule": "accordion-global", "low_rank": 1})
    with pytest.raises(ValueError, match="missing"):
        compressors.make("powersgd", adaptive={"rule": "accordion", "low_rank": 1, "high_rank": 2})
    with pytest.raises(ValueError, match="lr_milestones"):  # a key of the per-layer rule only
        compressors.make("powersgd", adaptive={**RULE, "lr_milestones": [3]})
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


# -- "accordion": per layer, from each worker's own gradient, high rank after a learning-rate decay ----------
LAYERS = {"a": (12, 10), "b": (9, 14), "c": (12, 10), "bias": (12,)}
COMPRESSED = ("a", "b", "c")
LAYER_RULE = {"rule": "accordion", "low_rank": 1, "high_rank": 3, "interval": 3, "threshold": 0.5}


def make_layers(error_feedback="local", **rule):
    return compressors.make("powersgd", adaptive={**LAYER_RULE, **rule}, min_compression_rate=0.0,
                            error_feedback=error_feedback)


@pytest.mark.parametrize("key,value,match", [
    ("lr_milestones", 5, r"adaptive\.lr_milestones=5 is invalid"),
    ("lr_milestones", [3, -1], r"adaptive\.lr_milestones=\[3, -1\] is invalid"),
    ("lr_milestones", [2.0], r"adaptive\.lr_milestones=\[2\.0\] is invalid"),
    ("threshold", -0.5, r"adaptive\.threshold=-0\.5 is invalid"),
    ("interval", 0, r"adaptive\.interval=0 is invalid"),
])
def test_per_layer_rule_validates_its_keys(key, value, match):
    with pytest.raises(ValueError, match=match):
        make_layers(**{key: value})


def test_per_layer_rule_threshold_defaults_to_the_papers():
    assert make_layers().control.adaptive.threshold == 0.5
    rule = dict(LAYER_RULE)
    del rule["threshold"]
    assert compressors.make("powersgd", adaptive=rule).control.adaptive.threshold == 0.5


def phased_gradients(steps, workers, seed=0):
    """Per-layer scales that change by phases, differently per layer, so that layers disagree."""
    scale = {"a": lambda t: 1.0 if t < 6 else 4.0,  # jumps at step 6
             "b": lambda t: 1.0,  # steady
             "c": lambda t: 1.0 if t < 12 else 0.2,  # drops at step 12
             "bias": lambda t: 1.0}
    out = []
    for t in range(steps):
        gen = torch.Generator().manual_seed(1000 * seed + t)
        out.append({n: scale[n](t) * (0.3 + torch.randn((workers, *s), generator=gen, dtype=F64))
                    for n, s in LAYERS.items()})
    return out


def reference_layer_ranks(gradients, rule, workers):
    """Accordion per layer from its definition, with plain loops: per worker and layer, sum the raw gradients over
    the interval, take each worker's norm, average over workers; compare with the previous interval's."""
    high, low = rule["high_rank"], rule["low_rank"]
    milestones = set(rule.get("lr_milestones", []))
    ranks = {n: high for n in COMPRESSED}
    previous = {n: None for n in COMPRESSED}
    sums = {n: [None] * workers for n in COMPRESSED}
    used, norms_seen = [], []
    for t, grads in enumerate(gradients):
        used.append(dict(ranks))
        for n in COMPRESSED:
            for i in range(workers):
                g = grads[n][i].clone()
                sums[n][i] = g if sums[n][i] is None else sums[n][i] + g
        if (t + 1) % rule["interval"] == 0:
            norms = {}
            for n in COMPRESSED:
                total = 0.0
                for i in range(workers):
                    total += math.sqrt(sum(float(v) ** 2 for v in sums[n][i].flatten()))
                norms[n] = total / workers
                if previous[n] is None:
                    ranks[n] = high
                elif previous[n] == 0:
                    ranks[n] = high
                else:
                    ranks[n] = high if abs(previous[n] - norms[n]) / previous[n] >= rule["threshold"] else low
                previous[n] = norms[n]
                sums[n] = [None] * workers
            norms_seen.append(norms)
        if t + 1 in milestones:
            ranks = {n: high for n in COMPRESSED}
    return used, norms_seen


@pytest.mark.parametrize("error_feedback", ["local", "none"])
def test_per_layer_decisions_follow_the_reference_loop(error_feedback):
    """Layers take different decisions; the ranks used, the norms, and the bits match the slow reference. The norms
    are those of the raw gradients: with error feedback the compressed input differs, the rule's input must not."""
    workers, steps = 3, 18
    rule = {**LAYER_RULE, "lr_milestones": [13]}
    agg = make_layers(error_feedback=error_feedback, lr_milestones=[13])
    state = agg.init(LAYERS, workers=workers, seed=0, dtype=F64)
    comm = VirtualCollective(workers)
    gradients = phased_gradients(steps, workers)
    used, bits, norms = [], [], []
    for t, grads in enumerate(gradients):
        comm.ledger.begin_step()
        ranks_now = dict(state.rule.ranks)
        _, state = agg.aggregate(grads, state, comm)
        used.append(ranks_now)
        bits.append(sum(r.bits for r in comm.ledger.step_records))
        if (t + 1) % rule["interval"] == 0:
            norms.append(dict(state.rule.previous_norms))
        inner = state.stack.compressed.inner if error_feedback != "none" else state.stack.compressed
        assert inner.ranks == ranks_now  # the kernel ran at the rule's ranks
    expected, expected_norms = reference_layer_ranks(gradients, rule, workers)
    assert used == expected
    for got, want in zip(norms, expected_norms):
        assert got == pytest.approx(want, rel=1e-12)
    assert {r["a"] for r in used} == {1, 3} and {r["c"] for r in used} == {1, 3}
    assert any(r["a"] != r["b"] for r in used), "layers should disagree (the test would prove nothing otherwise)"
    dense = 12 * 64
    for t, (r, b) in enumerate(zip(used, bits)):
        decision = 3 * 64 if (t + 1) % rule["interval"] == 0 else 0  # the all-reduce of 3 per-layer norms
        assert b == agg.control.bits_at({n: LAYERS[n] for n in COMPRESSED}, r, F64) + dense + decision
    assert state.rule.decisions == steps // rule["interval"]


def test_high_rank_is_forced_after_each_decay_until_the_next_decision():
    """Steady gradients: every layer settles at the low rank; each milestone step (and the rest of its interval)
    runs at the high rank, then the rule decides again from the norms."""
    workers, steps, milestones = 2, 21, [10, 16]
    agg = make_layers(lr_milestones=milestones)
    state = agg.init(LAYERS, workers=workers, seed=0, dtype=F64)
    comm = VirtualCollective(workers)
    used = []
    for t in range(steps):
        gen = torch.Generator().manual_seed(t)
        grads = {n: 1.0 + 0.01 * torch.randn((workers, *s), generator=gen, dtype=F64) for n, s in LAYERS.items()}
        used.append(set(state.rule.ranks.values()))
        _, state = agg.aggregate(grads, state, comm)
    # intervals end after steps 2, 5, 8, ...: steps 0-5 high (first interval and the first decision), then low
    assert used[:6] == [{3}] * 6 and used[6:10] == [{1}] * 4
    assert used[10:12] == [{3}] * 2  # the decay at step 10 forces high up to the interval's end (after step 11)
    assert used[12:16] == [{1}] * 4
    assert used[16:18] == [{3}] * 2 and used[18:] == [{1}] * 3


def test_per_layer_contract_battery():
    shapes = {"w": (16, 12), "conv": (8, 2, 3, 3), "b": (6,)}
    options = dict(adaptive={**LAYER_RULE, "interval": 2, "lr_milestones": [1]}, min_compression_rate=0.0)
    # the ledger check runs apart: a decision step adds its all-reduce of the per-layer norms to the declared bits
    report = check_compressor("powersgd", shapes=shapes, **options,
                              checks=[c for c in compressors.testing.CHECKS if c != "ledger_matches_bits_per_step"])
    assert set(report.values()) == {"ok"}
    assert check_compressor("powersgd", shapes=shapes, adaptive=LAYER_RULE, min_compression_rate=0.0,
                            checks=["ledger_matches_bits_per_step"]) == {"ledger_matches_bits_per_step": "ok"}


def test_per_layer_rule_in_a_run_resumes_bitwise_and_logs_layer_ranks(tmp_path):
    e = tiny(compressor={"name": "powersgd", "min_compression_rate": 0.0,
                         "adaptive": {"rule": "accordion", "low_rank": 1, "high_rank": 3, "interval": 3,
                                      "threshold": 0.2, "lr_milestones": [12]}},
             steps=18, lr_milestones=[12])
    full = sim.run(e)
    layer_columns = [c for c in full.history.columns if c.startswith("rank/")]
    assert layer_columns and full.history["rank"].notna().all()
    assert (full.history.loc[full.history.step == 13, layer_columns] == 3.0).all(axis=None)  # step 13 = index 12
    assert full.history[layer_columns].nunique().max() == 2, "some layer should switch ranks in this run"
    run_interrupted(e, tmp_path, stop_at=11, every=4)
    assert_resume_is_bitwise(e, full, tmp_path)
