"""Rank schedules: validation, exact per-step bits, warm start across rank changes, and the constant schedule
being bitwise the fixed-rank run."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compressors
import compressors.testing
import sim
import theory
from compressors.error_feedback import ErrorFeedbackState
from compressors.ranks.control import RankControlState, _grow
from compressors.testing import check_compressor
from compressors.comm import VirtualCollective

F64 = torch.float64
SHAPES = {"a": (12, 10), "b": (9, 14), "conv": (6, 2, 3, 3), "bias": (12,)}
SCHEDULE = [[0, 4], [2, 2], [5, 1], [7, 3]]


def grads_at(step, shapes=SHAPES, workers=3, dtype=F64):
    gen = torch.Generator().manual_seed(1000 + step)
    return {n: torch.randn((workers, *s), generator=gen, dtype=F64).to(dtype) for n, s in shapes.items()}


def control_state(state) -> RankControlState:
    """The RankControl state inside Partition(ErrorFeedback(.)) or Partition(.)."""
    inner = state.compressed
    return inner.inner if isinstance(inner, ErrorFeedbackState) else inner


def matrix_bits(shape, rank, bits=64):
    n, m = compressors.matrix_view_shape(shape)
    return theory.bits.svd_bits(n, m, rank, bits)  # min(r, n, m) (n + m) values: PowerSGD's P and Q


# -- validation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [[], [[1, 2]], [[0, 2], [0, 1]], [[0, 2], [5, 1], [3, 1]], [[0, 0]], [[0, -1]],
                                 [[0, 2.5]], [[0, True]], [(0, 2, 3)], "0:2", [[0, "2"]], 3])
def test_bad_schedules_raise_value_error_naming_the_field(bad):
    with pytest.raises(ValueError, match=r"powersgd: rank_schedule=.* is invalid; allowed: .*first step 0"):
        compressors.make("powersgd", rank_schedule=bad)


def test_rank_and_schedule_together_are_refused():
    with pytest.raises(ValueError, match=r"powersgd: rank=2 is invalid; allowed: None .*rank_schedule"):
        compressors.make("powersgd", rank=2, rank_schedule=[[0, 2]])
    with pytest.raises(ValueError, match=r"adaptive=.* is invalid; allowed: None when rank_schedule is given"):
        compressors.make("powersgd", rank_schedule=[[0, 2]], adaptive={"rule": "accordion", "low_rank": 1,
                                                                       "high_rank": 2, "interval": 2, "threshold": 0.5})


def test_schedule_accepts_lists_and_tuples_from_config_files():
    a = compressors.make("powersgd", rank_schedule=[[0, 4], [100, 2]])
    b = compressors.make("powersgd", rank_schedule=((0, 4), (100, 2)))
    assert a.control.schedule == b.control.schedule == ((0, 4), (100, 2))
    sim.Experiment(compressor={"name": "powersgd", "rank_schedule": [[0, 4], [100, 2]]})  # valid in a config


# -- bits ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["paper", "alternating"])
def test_ledger_sends_exactly_the_scheduled_ranks_bits_every_step(variant):
    agg = compressors.make("powersgd", rank_schedule=SCHEDULE, min_compression_rate=0.0, variant=variant,
                           num_iters_per_step=2)
    state = agg.init(SHAPES, workers=3, seed=0, dtype=F64)
    comm = VirtualCollective(3)
    phases = agg.bits_per_phase(SHAPES, dtype=F64)
    assert [(p.first_step, p.rank) for p in phases] == [tuple(p) for p in SCHEDULE]
    for step in range(10):
        comm.ledger.begin_step()
        _, state = agg.aggregate(grads_at(step), state, comm)
        rank = [r for first, r in SCHEDULE if first <= step][-1]
        expected = sum(matrix_bits(s, rank) for n, s in SHAPES.items() if n != "bias") * 2  # T = 2 iterations
        if variant == "alternating":
            expected //= 2  # one factor per iteration
        expected += 12 * 64  # the bias, all-reduced dense
        assert sum(r.bits for r in comm.ledger.step_records) == expected, step
        assert [p for p in phases if p.first_step <= step][-1].bits == expected
        assert control_state(state).ranks == {n: rank for n in SHAPES if n != "bias"}


def test_bits_per_step_is_the_first_phase_and_the_average_weights_the_phases():
    agg = compressors.make("powersgd", rank_schedule=[[0, 4], [100, 2], [300, 1]], min_compression_rate=0.0)
    phases = agg.bits_per_phase(SHAPES)
    assert agg.bits_per_step(SHAPES) == phases[0].bits
    assert agg.average_bits_per_step(SHAPES, 400) == (100 * phases[0].bits + 200 * phases[1].bits
                                                      + 100 * phases[2].bits) / 400
    assert agg.average_bits_per_step(SHAPES, 50) == phases[0].bits
    warm = compressors.make("powersgd", rank_schedule=[[0, 4], [100, 2]], min_compression_rate=0.0,
                            start_compressing_after_num_steps=10)
    dense = compressors.Identity().bits_per_step(SHAPES)
    assert warm.average_bits_per_step(SHAPES, 120) == (10 * dense + 100 * phases[0].bits + 10 * phases[1].bits) / 120
    with pytest.raises(ValueError, match="steps=0 is invalid"):
        agg.average_bits_per_step(SHAPES, 0)


# -- warm start across a change of rank ---------------------------------------------------------------------
@given(a=st.integers(3, 12), r_old=st.integers(0, 3), extra=st.integers(1, 3), seed=st.integers(0, 100))
@settings(max_examples=30, deadline=None)
def test_growing_keeps_old_columns_and_adds_orthonormal_ones_orthogonal_to_them(a, r_old, extra, seed):
    r_new = min(r_old + extra, a)
    if r_new <= r_old:
        return
    gen = torch.Generator().manual_seed(seed)
    factor = torch.randn((2, a, r_new), generator=gen, dtype=F64)  # (G, a, capacity)
    grown = _grow(factor, r_old, r_new, torch.Generator().manual_seed(seed + 1))
    assert torch.equal(grown[..., :r_old], factor[..., :r_old])
    fresh = grown[..., r_old:r_new]
    eye = torch.eye(r_new - r_old, dtype=F64).expand(2, -1, -1)
    torch.testing.assert_close(fresh.transpose(-1, -2) @ fresh, eye, atol=1e-10, rtol=0)
    if r_old:
        assert float((factor[..., :r_old].transpose(-1, -2) @ fresh).abs().max()) < 1e-9 * float(factor.abs().max())


def test_shrinking_keeps_the_leading_columns_and_growing_back_redraws_only_the_new_ones():
    agg = compressors.make("powersgd", rank_schedule=[[0, 3], [1, 1], [2, 3]], min_compression_rate=0.0,
                           error_feedback="none")
    shapes = {"a": (12, 10)}
    state = agg.init(shapes, workers=2, seed=0, dtype=F64)
    comm = VirtualCollective(2)
    _, s1 = agg.aggregate(grads_at(0, shapes, 2), state, comm)  # rank 3
    q_after_rank3 = control_state(s1).kernel.q["12x10"].clone()  # (1, 10, 3)
    _, s2 = agg.aggregate(grads_at(1, shapes, 2), s1, comm)  # rank 1: warm start from column 0
    q2 = control_state(s2).kernel.q["12x10"]
    assert torch.equal(q2[..., 1:], q_after_rank3[..., 1:])  # unused columns stay stored, untouched
    # what rank 1 computes is the fixed rank-1 step from the leading column
    fixed = compressors.make("powersgd", rank=1, min_compression_rate=0.0, error_feedback="none")
    fixed_state = fixed.init(shapes, workers=2, seed=0, dtype=F64)
    kernel = fixed_state.compressed._replace(q={"12x10": q_after_rank3[..., :1]})
    expected, _ = fixed.aggregate(grads_at(1, shapes, 2), fixed_state._replace(compressed=kernel), VirtualCollective(2))
    got, _ = agg.aggregate(grads_at(1, shapes, 2), s1, VirtualCollective(2))
    assert torch.equal(got["a"], expected["a"])
    _, s3 = agg.aggregate(grads_at(2, shapes, 2), s2, comm)  # rank 3 again: columns 1, 2 fresh
    assert control_state(s3).ranks == {"a": 3}


@pytest.mark.parametrize("error_feedback", ["local", "averaged"])
def test_error_feedback_conserves_the_signal_across_rank_changes(error_feedback):
    """sum_t update_t + mean_i e_i = sum_t mean_i g_i: the memory is carried through every change untouched."""
    agg = compressors.make("powersgd", rank_schedule=SCHEDULE, min_compression_rate=0.0,
                           error_feedback=error_feedback)
    state = agg.init(SHAPES, workers=3, seed=0, dtype=F64)
    comm = VirtualCollective(3)
    total_update = {n: torch.zeros(s, dtype=F64) for n, s in SHAPES.items()}
    total_grad = {n: torch.zeros(s, dtype=F64) for n, s in SHAPES.items()}
    for step in range(9):
        g = grads_at(step)
        update, state = agg.aggregate(g, state, comm)
        for n in SHAPES:
            total_update[n] += update[n]
            total_grad[n] += g[n].mean(0)
            assert torch.isfinite(update[n]).all()
    memory = state.compressed.memory
    for n in memory:
        torch.testing.assert_close(total_update[n] + memory[n].mean(0), total_grad[n], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("variant", ["paper", "alternating"])
def test_zero_gradients_give_zero_updates_and_no_nan_at_every_rank(variant):
    agg = compressors.make("powersgd", rank_schedule=SCHEDULE, min_compression_rate=0.0, variant=variant)
    state = agg.init(SHAPES, workers=3, seed=0, dtype=torch.float32)
    comm = VirtualCollective(3)
    for step in range(9):
        zeros = {n: torch.zeros((3, *s)) for n, s in SHAPES.items()}
        update, state = agg.aggregate(zeros, state, comm)
        assert all(torch.equal(u, torch.zeros_like(u)) for u in update.values()), step
        leaves = [control_state(state).kernel.p, control_state(state).kernel.q]
        assert all(torch.isfinite(t).all() for d in leaves for t in d.values()), step


def test_paper_update_is_the_projection_of_the_mean_at_every_rank():
    """The property suite's invariant at each phase: update = P^ P^^T mean(M), P^ orthonormal, rank <= r, and
    the error is at least the Eckart-Young optimum of that rank."""
    shapes = {"a": (12, 10)}
    agg = compressors.make("powersgd", rank_schedule=SCHEDULE, min_compression_rate=0.0, error_feedback="none",
                           epsilon=1e-15)
    state = agg.init(shapes, workers=3, seed=0, dtype=F64)
    comm = VirtualCollective(3)
    for step in range(9):
        g = grads_at(step, shapes)
        update, state = agg.aggregate(g, state, comm)
        rank = control_state(state).ranks["a"]
        p_hat = control_state(state).kernel.p["12x10"][0, :, :rank]  # (n, r)
        mean = g["a"].mean(0)
        torch.testing.assert_close(p_hat.T @ p_hat, torch.eye(rank, dtype=F64), atol=1e-9, rtol=0)
        torch.testing.assert_close(update["a"], theory.lowrank.powersgd_update(p_hat, mean), atol=1e-9, rtol=0)
        s = torch.linalg.svdvals(mean)
        assert float((mean - update["a"]).pow(2).sum()) >= float(s[rank:].pow(2).sum()) - 1e-9
        assert int((torch.linalg.svdvals(update["a"]) > 1e-9).sum()) <= rank


@pytest.mark.parametrize("schedule", [[[0, 1], [1, 3]], [[0, 3], [1, 1]], [[0, 2], [1, 4], [2, 1]]])
def test_contract_battery_holds_across_rank_changes(schedule):
    """Every check on runs that change rank after step 0; the ledger check (two steps against one declared
    bits_per_step, which is the first phase's) on the same schedule started two steps later."""
    shapes = {"w": (16, 12), "conv": (8, 2, 3, 3), "b": (6,)}
    others = [c for c in compressors.testing.CHECKS if c != "ledger_matches_bits_per_step"]
    assert set(check_compressor("powersgd", shapes=shapes, rank_schedule=schedule, min_compression_rate=0.0,
                                checks=others).values()) == {"ok"}
    later = [[0, schedule[0][1]]] + [[first + 2, r] for first, r in schedule[1:]]
    assert check_compressor("powersgd", shapes=shapes, rank_schedule=later, min_compression_rate=0.0,
                            checks=["ledger_matches_bits_per_step"]) == {"ledger_matches_bits_per_step": "ok"}


# -- the constant schedule is the fixed rank ----------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"variant": "alternating", "num_iters_per_step": 2},
                                     {"error_feedback": "averaged", "start_compressing_after_num_steps": 3}])
def test_constant_schedule_run_is_bitwise_the_fixed_rank_run(options):
    base = sim.Experiment(task="digits-mlp", workers=4, steps=12, batch_size=8, eval_every=6, seed=3)
    fixed = sim.run(base.replace(compressor={"name": "powersgd", "rank": 2, **options}))
    constant = sim.run(base.replace(compressor={"name": "powersgd", "rank_schedule": [[0, 2]], **options}))
    history = constant.history.drop(columns=["rank"])
    pd.testing.assert_frame_equal(history, fixed.history, check_exact=True)
    for name, p in fixed.params.items():
        assert torch.equal(p, constant.params[name])
    logged = constant.history["rank"]
    warm = options.get("start_compressing_after_num_steps", 0)
    assert logged.iloc[:warm].isna().all() and (logged.iloc[warm:] == 2).all()


def test_history_logs_the_scheduled_rank_and_bits():
    e = sim.Experiment(task="digits-mlp", workers=2, steps=8, batch_size=8, eval_every=0, seed=0,
                       compressor={"name": "powersgd", "rank_schedule": [[0, 3], [3, 1]], "min_compression_rate": 0})
    result = sim.run(e)
    assert list(result.history["rank"]) == [3, 3, 3, 1, 1, 1, 1, 1]
    agg = e.make_compressor()
    shapes = result.extras["final_state"].params
    phases = agg.bits_per_phase({n: tuple(p.shape) for n, p in shapes.items()})
    per_step = result.history["bits"].diff().fillna(result.history["bits"].iloc[0])
    assert list(per_step) == [phases[0].bits] * 3 + [phases[1].bits] * 5
