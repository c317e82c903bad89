"""VirtualCollective: the mean over the worker axis, permutation invariance, identical results, byte accounting."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reference import reference_mean
from compressors.comm import VirtualCollective

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.uint8]


def integer_valued(workers, shape, seed, dtype=torch.float32):
    # small integers: every summation order is exact, so permutations must agree bitwise
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (workers, *shape), generator=gen).to(dtype)


@given(workers=st.integers(1, 6), shape=st.lists(st.integers(1, 4), max_size=3), seed=st.integers(0, 2**16))
def test_all_reduce_is_the_mean_and_permutation_invariant(workers, shape, seed):
    comm = VirtualCollective(workers)
    x = integer_valued(workers, shape, seed)
    out = comm.all_reduce_mean(x)
    assert out.shape == tuple(shape)
    assert torch.equal(out, reference_mean([x[i] for i in range(workers)]))
    perm = torch.randperm(workers, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(comm.all_reduce_mean(x[perm]), out)
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn((workers, *shape), generator=gen, dtype=torch.float64)
    assert torch.allclose(comm.all_reduce_mean(y[perm]), comm.all_reduce_mean(y), rtol=1e-12, atol=1e-14)


@given(workers=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_all_gather_gives_every_worker_every_row(workers, seed):
    comm = VirtualCollective(workers)
    x = integer_valued(workers, (3, 2), seed)
    saved = x.clone()
    out = comm.all_gather(x)
    assert torch.equal(out, x)  # worker order kept
    out.add_(1)  # a new tensor: what a worker does with the result never touches the sender's buffer
    assert torch.equal(x, saved)


def test_every_worker_receives_the_same_result():
    # The all-reduce returns ONE tensor (*s): there is no per-worker copy that could diverge; applying it on
    # W workers gives W identical rows.
    comm = VirtualCollective(4)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    out = comm.all_reduce_mean(x)
    assert out.shape == (5,)
    rows = out.expand(4, 5)
    assert all(torch.equal(rows[i], rows[0]) for i in range(4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_byte_accounting(dtype):
    comm = VirtualCollective(3)
    x = torch.zeros(3, 4, 5, dtype=dtype)
    comm.all_reduce_mean(x.float() if not dtype.is_floating_point else x, tag="a")
    comm.all_gather(x, tag="g")
    reduce_record, gather_record = comm.ledger.records
    bits = 20 * torch.empty((), dtype=dtype).element_size() * 8
    assert gather_record.op == "all_gather" and gather_record.bits == bits and gather_record.numel == 20
    assert gather_record.dtype == str(dtype).removeprefix("torch.") and gather_record.workers == 3
    assert gather_record.tag == "g"
    assert reduce_record.op == "all_reduce" and reduce_record.tag == "a" and reduce_record.numel == 20
    assert comm.ledger.calls == 2 and len(comm.ledger) == 2
    assert comm.ledger.total_bits == reduce_record.bits + gather_record.bits


def test_bits_are_what_one_worker_sends_not_the_total():
    one, eight = VirtualCollective(1), VirtualCollective(8)
    one.all_reduce_mean(torch.ones(1, 100))
    eight.all_reduce_mean(torch.ones(8, 100))
    assert one.ledger.total_bits == eight.ledger.total_bits == 100 * 32


def test_ledger_without_records_keeps_totals():
    comm = VirtualCollective(2, keep_records=False)
    for _ in range(5):
        comm.all_reduce_mean(torch.ones(2, 3))
    assert comm.ledger.calls == 5 and len(comm.ledger) == 5
    assert comm.ledger.total_bits == 5 * 3 * 32
    assert comm.ledger.records == []


@pytest.mark.parametrize("bad", [torch.ones(3, 2), torch.ones(5), torch.tensor(1.0)])
def test_bad_leading_axis_raises(bad):
    comm = VirtualCollective(4)
    with pytest.raises(ValueError, match="leading worker axis"):
        comm.all_reduce_mean(bad)
    with pytest.raises(ValueError, match="leading worker axis"):
        comm.all_gather(bad)
    assert comm.ledger.calls == 0  # nothing recorded for a refused call


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "4"])
def test_bad_worker_count_raises(workers):
    with pytest.raises(ValueError, match="workers"):
        VirtualCollective(workers)
