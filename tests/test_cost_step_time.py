"""sim.cost.step_time: pricing a ledger, overlap with backward, sequential latency, bad input."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compressors
from compressors.comm import LedgerRecord, VirtualCollective
from sim.cost import Network, preset, price_step, step_time
from theory import collectives as tc

NET = Network(alpha=20e-6, bandwidth=1.25e9, name="t")


def rec(op, nbytes, workers, tag=""):
    return LedgerRecord(op=op, bits=int(nbytes * 8), numel=int(nbytes // 4), dtype="float32", workers=workers, tag=tag)


def test_no_overlap_is_the_sum_of_theory_formulas():
    records = [rec("all_reduce", 4e6, 8), rec("all_gather", 1e4, 8)]
    expected = tc.ring_all_reduce(4e6, 8, NET.alpha, NET.beta) + tc.ring_all_gather(1e4, 8, NET.alpha, NET.beta)
    t = step_time(NET, records, 8, compute_seconds=0.1, codec_seconds=0.01, overlap="none")
    assert t.exposed == pytest.approx(expected) and t.total == pytest.approx(0.11 + expected)
    assert price_step(NET, records, 8, 0.1, overlap="none", codec_seconds=0.01) == pytest.approx(t.total)


def test_a_real_ledger_prices_to_theory():
    shapes = {"a": (64, 32), "b": (32,)}
    comm = VirtualCollective(4)
    agg = compressors.make("identity")
    grads = {n: torch.randn((4, *s), generator=torch.Generator().manual_seed(0)) for n, s in shapes.items()}
    agg.aggregate(grads, agg.init(shapes, 4), comm)
    dense_bytes = (64 * 32 + 32) * 4
    assert price_step("ethernet-10g", comm.ledger, 4) == pytest.approx(
        tc.ring_all_reduce(dense_bytes, 4, preset("ethernet-10g").alpha, preset("ethernet-10g").beta))


def test_sequential_collectives_pay_latency_each():
    # PowerSGD's P then Q: two all-reduces of n/2 cost 2(p-1) alpha more than one of n
    p = 16
    one = price_step(NET, [rec("all_reduce", 1e5, p)], p)
    two = price_step(NET, [rec("all_reduce", 5e4, p), rec("all_reduce", 5e4, p)], p)
    assert two - one == pytest.approx(2 * (p - 1) * NET.alpha)


def test_overlap_hides_communication_behind_backward():
    records = [rec("all_reduce", 100e6, 8)]  # 4 DDP buckets
    none = step_time(NET, records, 8, compute_seconds=0.3, overlap="none")
    buckets = step_time(NET, records, 8, compute_seconds=0.3)
    assert buckets.collectives == 4 and none.collectives == 1
    assert buckets.exposed < none.exposed
    # without compute there is nothing to hide behind; each bucket then pays its own latency
    bare = step_time(NET, records, 8, compute_seconds=0.0)
    assert bare.exposed == pytest.approx(none.exposed + 3 * 2 * 7 * NET.alpha)
    # with an endless backward only the last bucket's communication is exposed
    long = step_time(NET, records, 8, compute_seconds=100.0)
    last = tc.ring_all_reduce(100e6 - 3 * 25 * 2**20, 8, NET.alpha, NET.beta)
    assert long.exposed == pytest.approx(last)
    assert 0 < long.comm_share < buckets.comm_share < 1


@settings(max_examples=40, deadline=None)
@given(nbytes=st.floats(0, 2e8), factor=st.floats(1, 4), compute=st.floats(0, 1),
       overlap=st.sampled_from(["buckets", "none"]), p=st.integers(1, 64),
       op=st.sampled_from(["all_reduce", "all_gather"]))
def test_monotone_in_bytes_alpha_beta_workers(nbytes, factor, compute, overlap, p, op):
    def t(net=NET, n=nbytes, workers=p):
        return price_step(net, [rec(op, n, workers)], workers, compute, overlap=overlap, dense_bytes=2e8)
    base = t()
    assert t(n=nbytes * factor) >= base - 1e-12
    assert t(net=NET.with_(alpha=NET.alpha * factor)) >= base - 1e-12
    assert t(net=NET.with_(bandwidth=NET.bandwidth / factor)) >= base - 1e-12
    assert t(workers=p + 1) >= base - 1e-12


def test_all_gather_crossover_lands_where_theory_puts_it():
    n, p = 4e7, 16
    for alpha in (0.0, 2e-5):
        net = NET.with_(alpha=alpha)
        rho_star = tc.crossover_compression_ratio(n, p, alpha, net.beta)
        dense = price_step(net, [rec("all_reduce", n, p)], p, overlap="none")
        for rho, wins in ((rho_star * 1.01, True), (rho_star * 0.99, False)):
            gathered = price_step(net, [rec("all_gather", n / rho, p)], p, overlap="none")
            assert (gathered < dense) is wins
        if alpha == 0:
            assert rho_star == pytest.approx(p / 2)


def test_ledger_from_another_worker_count_is_rejected():
    with pytest.raises(ValueError, match="workers"):
        price_step(NET, [rec("all_reduce", 1e6, 8)], 16)
    with pytest.raises(ValueError, match="workers"):
        price_step(NET, [], 0)
    with pytest.raises(ValueError, match="op"):
        price_step(NET, [dataclasses.replace(rec("all_reduce", 1e6, 8), op="broadcast")], 8)


@pytest.mark.parametrize("kwargs, field", [
    ({"compute_seconds": -1.0}, "compute_seconds"),
    ({"codec_seconds": float("nan")}, "codec_seconds"),
    ({"overlap": "perfect"}, "overlap"),
    ({"backward_fraction": 1.5}, "backward_fraction"),
    ({"bucket_bytes": 0}, "bucket_bytes"),
])
def test_bad_options_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        step_time(NET, [rec("all_reduce", 1e6, 8)], 8, **kwargs)
    with pytest.raises(ValueError, match="network"):
        step_time("ethernet-10g", [], 8)
