"""The hook's guard pieces alone: the finiteness check and the replaying collective."""
from __future__ import annotations

import pytest
import torch

import compressors
from compressors.ddp.guard import ReplayCollective, all_finite, nonfinite_flag
from compressors.comm import VirtualCollective


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_matches_the_elementwise_check(dtype):
    big = torch.finfo(dtype).max / 4
    cases = [torch.zeros(7), torch.full((1000,), big, dtype=dtype), torch.full((1000,), -big, dtype=dtype),
             torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 1.0]),  # (finite sums that overflow)
             torch.tensor([float("inf"), float("-inf")]), torch.randn(513)]
    for x in cases:
        x = x.to(dtype)
        assert all_finite([x]) == bool(torch.isfinite(x).all()), (dtype, x[:3])
    assert not all_finite([torch.zeros(3, dtype=dtype), torch.tensor([float("nan")], dtype=dtype)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_nonfinite_flag_matches_the_elementwise_check_without_overflowing(dtype):
    big = torch.finfo(dtype).max  # a sum of these overflows; the flag must not call them non-finite
    cases = [torch.zeros(7), torch.full((1000,), big, dtype=dtype), torch.full((1000,), -big, dtype=dtype),
             torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 1.0]), torch.tensor([1.0, float("-inf")]),
             torch.randn(513), torch.empty(0)]
    for x in cases:
        x = x.to(dtype)
        flag = nonfinite_flag(x)
        assert flag.dim() == 0 and flag.dtype == torch.bool
        assert bool(flag) == (not bool(torch.isfinite(x).all())), (dtype, x[:3])


def test_replay_skips_exactly_the_collectives_already_issued():
    comm = VirtualCollective(2)
    agg = compressors.make("powersgd", rank=2)
    g = torch.Generator().manual_seed(0)
    grads = {"w": torch.randn(2, 64, 32, generator=g), "b": torch.randn(2, 32, generator=g)}
    state = agg.init({n: tuple(t.shape[1:]) for n, t in grads.items()}, workers=2, seed=0)
    counting = ReplayCollective(comm)
    update, _ = agg.aggregate(grads, state, counting)
    issued = counting.issued
    assert issued == len(comm.ledger.records) >= 3  # P, Q and the uncompressed bias
    expected, _ = agg.aggregate(grads, state, VirtualCollective(2))
    assert all(torch.equal(update[n], expected[n]) for n in grads)  # passing through changes nothing
    for skip in range(issued + 1):
        replay = ReplayCollective(comm, skip=skip)
        before = len(comm.ledger.records)
        agg.aggregate({n: torch.zeros_like(t) for n, t in grads.items()}, state, replay)
        assert replay.issued == issued  # the same sequence on zeros
        assert len(comm.ledger.records) - before == issued - skip  # only the rest was sent
