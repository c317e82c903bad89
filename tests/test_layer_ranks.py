"""Per-layer ranks: name patterns and the spectral allocation of one bit budget."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

import compressors
import compressors.testing
import sim
from compressors.ranks.layers import SpectralAllocation, allocate
from compressors.testing import check_compressor
from compressors.comm import VirtualCollective

F64 = torch.float64
SHAPES = {"conv1.weight": (8, 2, 3, 3), "conv2.weight": (8, 8, 3, 3), "fc1.weight": (20, 30),
          "fc2.weight": (20, 30), "fc1.bias": (20,)}


def unit(shape, bits=32):
    n, m = compressors.matrix_view_shape(shape)
    return (n + m) * bits


def test_patterns_first_match_wins_and_unmatched_use_rank():
    agg = compressors.make("powersgd", rank=3, layer_ranks={"conv1*": 1, "conv*": 2, "fc1.*": 4},
                           min_compression_rate=0.0)
    state = agg.init(SHAPES, workers=2, seed=0)
    control = state.compressed.inner
    assert control.ranks == {"conv1.weight": 1, "conv2.weight": 2, "fc1.weight": 4, "fc2.weight": 3}
    comm = VirtualCollective(2)
    gen = torch.Generator().manual_seed(0)
    grads = {n: torch.randn((2, *s), generator=gen) for n, s in SHAPES.items()}
    comm.ledger.begin_step()
    agg.aggregate(grads, state, comm)
    expected = sum(r * unit(SHAPES[n]) for n, r in control.ranks.items()) + 20 * 32
    assert sum(r.bits for r in comm.ledger.step_records) == expected == agg.bits_per_step(SHAPES)
    assert agg.bits_per_phase(SHAPES)[0].bits == expected
    # same-shape tensors with different ranks are batched apart, and each gets its own rank
    assert set(control.kernel.q) == {"8x18", "8x72", "20x30r4", "20x30r3"}
    assert control.kernel.q["20x30r4"].shape == (1, 30, 4)


@pytest.mark.parametrize("bad,match", [({}, "layer_ranks={} is invalid"), ({"conv*": 0}, r"layer_ranks\['conv\*'\]=0"),
                                       ({"": 1}, "is not a pattern"), ([["conv*", 1]], "layer_ranks=")])
def test_bad_layer_ranks(bad, match):
    with pytest.raises(ValueError, match=match):
        compressors.make("powersgd", layer_ranks=bad)


def test_layer_ranks_with_a_schedule_are_refused():
    with pytest.raises(ValueError, match="layer_ranks=.* is invalid; allowed: None when rank_schedule is given"):
        compressors.make("powersgd", layer_ranks={"a": 1}, rank_schedule=[[0, 2]])


def test_layer_ranks_pass_the_contract_battery():
    shapes = {"w": (16, 12), "conv": (8, 2, 3, 3), "b": (6,), "big": (16, 12)}
    assert set(check_compressor("powersgd", shapes=shapes, layer_ranks={"w": 3, "conv": 2}, rank=1,
                                min_compression_rate=0.0).values()) == {"ok"}


# -- spectral allocation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [{"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 10.0, "b": 1.0, "c": 0.0},
                                     {"a": 0.0, "b": 0.0, "c": 0.0}, {"a": 1.0, "b": 3.0, "c": 2.0}])
@pytest.mark.parametrize("budget", [3 * 52 * 32, 5000, 12000, 10**7])
def test_allocation_stays_within_budget_fills_it_and_follows_the_weights(weights, budget):
    shapes = {"a": (20, 30), "b": (12, 12), "c": (8, 40)}
    costs = {n: unit(s) for n, s in shapes.items()}
    rule = SpectralAllocation(budget, 1, 6)
    if sum(costs.values()) > budget:
        with pytest.raises(ValueError, match="rank_allocation.budget_bits"):
            allocate(rule, shapes, costs, weights)
        return
    ranks = allocate(rule, shapes, costs, weights)
    spent = sum(ranks[n] * costs[n] for n in shapes)
    caps = {n: min(6, *compressors.matrix_view_shape(s)) for n, s in shapes.items()}
    assert spent <= budget and all(1 <= ranks[n] <= caps[n] for n in shapes)
    # maximal: no tensor below its cap could take one more rank unit within the budget
    assert all(ranks[n] == caps[n] or spent + costs[n] > budget for n in shapes)
    assert ranks == allocate(rule, shapes, costs, weights)  # deterministic
    heavy = max(weights, key=weights.get)  # a larger share never gives the heaviest layer fewer ranks
    assert ranks[heavy] >= allocate(rule, shapes, costs, {n: 1.0 for n in shapes})[heavy]


def test_too_small_budget_is_refused_at_init():
    agg = compressors.make("powersgd", rank_allocation={"rule": "spectral", "budget_bits": 100, "every": 5},
                           min_compression_rate=0.0)
    with pytest.raises(ValueError, match=r"rank_allocation\.budget_bits=100 is invalid; allowed: at least"):
        agg.init(SHAPES, workers=2, seed=0)


@pytest.mark.parametrize("bad,match", [
    ({"rule": "equal", "budget_bits": 10, "every": 1}, "rank_allocation.rule='equal'"),
    ({"rule": "spectral", "budget_bits": 0, "every": 1}, "rank_allocation.budget_bits=0"),
    ({"rule": "spectral", "budget_bits": 10, "every": 0}, "rank_allocation.every=0"),
    ({"rule": "spectral", "budget_bits": 10, "every": 1, "max_rank": 0}, "rank_allocation.max_rank=0"),
    ({"rule": "spectral", "every": 1}, "'budget_bits' is missing"),
    ({"rule": "spectral", "budget_bits": 10, "every": 1, "bugdet": 3}, "bugdet"),
])
def test_bad_allocations(bad, match):
    with pytest.raises(ValueError, match=match):
        compressors.make("powersgd", rank_allocation=bad)


def test_allocation_in_a_run_respects_the_budget_every_step_and_logs_ranks():
    base = sim.Experiment(task="digits-cnn", workers=2, steps=12, batch_size=8, eval_every=0, seed=0)
    shapes = {n: tuple(p.shape) for n, p in sim.Simulation(base).model.named_parameters()}
    spec = {"name": "powersgd", "rank_allocation": {"rule": "spectral", "budget_bits": 120000, "every": 3,
                                                   "max_rank": 4}, "min_compression_rate": 0.0}
    e = base.replace(compressor=spec)
    agg = e.make_compressor()
    chosen, rest = agg.partition.split(shapes)
    dense = compressors.Identity().bits_per_step(rest)
    result = sim.run(e)
    per_step = result.history["bits"].diff().fillna(result.history["bits"].iloc[0])
    assert (per_step - dense <= 120000).all()
    columns = [f"rank/{n}" for n in chosen]
    assert set(columns) <= set(result.history.columns)
    for (_, row), b in zip(result.history.iterrows(), per_step):
        ranks = {n: int(row[f"rank/{n}"]) for n in chosen}
        assert b == agg.control.bits_at(chosen, ranks) + dense
    again = sim.run(e)
    pd.testing.assert_frame_equal(again.history, result.history, check_exact=True)
    assert set(check_compressor("powersgd", shapes={"w": (16, 12), "v": (12, 20), "b": (4,)},
                                rank_allocation={"rule": "spectral", "budget_bits": 6000, "every": 1,
                                                 "max_rank": 3}, min_compression_rate=0.0,
                                checks=[c for c in compressors.testing.CHECKS
                                        if c != "ledger_matches_bits_per_step"]).values()) == {"ok"}
