"""theory.collectives: the alpha-beta formulas against their defining invariants."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from theory import collectives as tc

ALL_REDUCE = list(tc.ALL_REDUCE.values())
OTHERS = [tc.ring_reduce_scatter, tc.ring_all_gather, tc.recursive_doubling_all_gather,
          tc.parameter_server_all_gather, tc.binomial_broadcast, tc.scatter_allgather_broadcast]
sizes = st.floats(0, 1e9)
links = st.floats(0, 1e-2)
workers = st.integers(1, 300)


def test_ring_bandwidth_factor_and_latency():
    for p in (2, 3, 8, 64):
        assert tc.ring_all_reduce(1000.0, p, 0.0, 1.0) == pytest.approx(2 * (p - 1) / p * 1000)
        assert tc.ring_all_reduce(0.0, p, 1.0, 1.0) == 2 * (p - 1)
        assert tc.rabenseifner_all_reduce(1000.0, p, 0.0, 1.0) == pytest.approx(tc.ring_all_reduce(1000.0, p, 0, 1))
        assert tc.ring_all_gather(10.0, p, 0.0, 1.0) == pytest.approx((p - 1) * 10)


def test_log_rounds():
    assert [tc.log2_ceil(p) for p in (1, 2, 3, 4, 5, 8, 9)] == [0, 1, 2, 2, 3, 3, 4]
    assert tc.recursive_doubling_all_reduce(7.0, 8, 1.0, 2.0) == 3 * (1 + 14)
    assert tc.tree_all_reduce(7.0, 8, 1.0, 2.0) == 6 * (1 + 14)
    assert tc.binomial_broadcast(7.0, 8, 1.0, 2.0) == 3 * (1 + 14)


@pytest.mark.parametrize("fn", ALL_REDUCE + OTHERS)
def test_one_worker_costs_nothing(fn):
    assert fn(1e6, 1, 1e-3, 1e-9) == 0.0


@pytest.mark.parametrize("fn", ALL_REDUCE + OTHERS)
@settings(max_examples=12, deadline=None)
@given(n=sizes, p=workers, alpha=links, beta=links, factor=st.floats(1.0, 10.0))
def test_monotone_in_every_argument(fn, n, p, alpha, beta, factor):
    base = fn(n, p, alpha, beta)
    assert fn(n * factor, p, alpha, beta) >= base
    assert fn(n, p, alpha * factor, beta) >= base
    assert fn(n, p, alpha, beta * factor) >= base
    assert fn(n, p + 1, alpha, beta) >= base * (1 - 1e-12)


@pytest.mark.parametrize("fn", ALL_REDUCE + OTHERS)
@settings(max_examples=8, deadline=None)
@given(n=st.floats(1, 1e9), p=st.integers(2, 64), beta=st.floats(1e-12, 1e-6))
def test_linear_in_bytes_without_latency(fn, n, p, beta):
    assert fn(2 * n, p, 0.0, beta) == pytest.approx(2 * fn(n, p, 0.0, beta), rel=1e-9)


def test_ring_is_bandwidth_optimal_among_all_reduces():
    # Patarasuk & Yuan: 2(p-1)/p n beta is the lower bound; at alpha = 0 nothing beats the ring.
    for p in (2, 3, 7, 16, 100):
        ring = tc.ring_all_reduce(1e6, p, 0.0, 1e-9)
        for fn in ALL_REDUCE:
            assert fn(1e6, p, 0.0, 1e-9) >= ring * (1 - 1e-12)


@pytest.mark.parametrize("op", ["all_reduce", "reduce_scatter", "all_gather", "broadcast"])
def test_bus_bandwidth_of_an_optimal_algorithm_is_the_link_bandwidth(op):
    # nccl-tests: busbw = algbw * factor is the link speed for bandwidth-optimal algorithms, whatever p.
    beta = 1 / 12.5e9
    for p in (2, 4, 8, 33):
        m = 1e6
        seconds, size = {
            "all_reduce": (tc.ring_all_reduce(m, p, 0, beta), m),
            "reduce_scatter": (tc.ring_reduce_scatter(m, p, 0, beta), m),
            "all_gather": (tc.ring_all_gather(m, p, 0, beta), p * m),  # algbw counts the gathered total
            "broadcast": (tc.scatter_allgather_broadcast(m, p, 0, beta) / (2 * (p - 1) / p), m),
        }[op]
        assert tc.bus_bandwidth(op, size, seconds, p) == pytest.approx(1 / beta)


@settings(max_examples=40, deadline=None)
@given(p=st.integers(2, 256), n=st.floats(1e3, 1e9), beta=st.floats(1e-12, 1e-6))
def test_crossover_without_latency_is_p_over_two(p, n, beta):
    assert tc.crossover_compression_ratio(n, p, 0.0, beta) == pytest.approx(p / 2)
    assert tc.all_gather_beats_ring_all_reduce(n, p / 2 * 1.01, p, 0.0, beta)
    assert not tc.all_gather_beats_ring_all_reduce(n, p / 2 * 0.99, p, 0.0, beta)


@settings(max_examples=40, deadline=None)
@given(p=st.integers(2, 256), n=st.floats(1e3, 1e9), alpha=st.floats(1e-7, 1e-3), beta=st.floats(1e-12, 1e-6))
def test_crossover_with_latency_is_exact_and_below_p_over_two(p, n, alpha, beta):
    rho = tc.crossover_compression_ratio(n, p, alpha, beta)
    assert rho < p / 2
    assert tc.all_gather_beats_ring_all_reduce(n, rho * 1.001, p, alpha, beta)
    assert not tc.all_gather_beats_ring_all_reduce(n, rho * 0.999, p, alpha, beta)


def test_crossover_edge_cases():
    assert tc.crossover_compression_ratio(1e6, 1, 1e-5, 1e-9) == math.inf
    assert not tc.all_gather_beats_ring_all_reduce(1e6, 1e9, 1, 1e-5, 1e-9)


@pytest.mark.parametrize("call, field", [
    (lambda: tc.ring_all_reduce(1.0, 0, 0.0, 1.0), "p"),
    (lambda: tc.ring_all_reduce(1.0, 2.5, 0.0, 1.0), "p"),
    (lambda: tc.ring_all_reduce(1.0, 2, -1.0, 1.0), "alpha"),
    (lambda: tc.ring_all_reduce(1.0, 2, 0.0, math.nan), "beta"),
    (lambda: tc.ring_all_gather(-1.0, 2, 0.0, 1.0), "n"),
    (lambda: tc.all_reduce(1.0, 2, 0.0, 1.0, algorithm="butterfly"), "algorithm"),
    (lambda: tc.bus_bandwidth_factor("gossip", 4), "op"),
    (lambda: tc.all_gather_beats_ring_all_reduce(1.0, 0.0, 2, 0.0, 1.0), "rho"),
])
def test_bad_input_names_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()
