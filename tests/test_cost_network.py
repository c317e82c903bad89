"""sim.cost.Network and presets: agreement with theory, topology reductions, monotonicity, bad input."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.cost import ALGORITHMS, PRESETS, Network, preset, resolve_network
from theory import collectives as tc


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_flat_network_is_the_theory_formula(algorithm):
    net = Network(alpha=3e-6, bandwidth=5e9, algorithm=algorithm)
    for p in (1, 2, 5, 16):
        assert net.all_reduce_time(1e6, p) == tc.all_reduce(1e6, p, 3e-6, 1 / 5e9, algorithm)
    assert Network(alpha=3e-6, bandwidth=5e9).all_gather_time(1e4, 8) == tc.ring_all_gather(1e4, 8, 3e-6, 1 / 5e9)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("op", ["all_reduce", "all_gather"])
def test_single_node_reduces_hierarchical_to_flat(algorithm, op):
    hier = Network(alpha=50e-6, bandwidth=1.25e8, algorithm=algorithm, devices_per_node=8, intra_alpha=5e-6,
                   intra_bandwidth=1.5e11)
    flat_intra = Network(alpha=5e-6, bandwidth=1.5e11, algorithm=algorithm)
    flat_inter = Network(alpha=50e-6, bandwidth=1.25e8, algorithm=algorithm)
    for p in (1, 2, 3, 8):
        assert hier.time(op, 1e6, p) == flat_intra.time(op, 1e6, p)
    one_per_node = Network(alpha=50e-6, bandwidth=1.25e8, algorithm=algorithm, devices_per_node=1,
                           intra_alpha=5e-6, intra_bandwidth=1.5e11)
    assert one_per_node.time(op, 1e6, 16) == flat_inter.time(op, 1e6, 16)


def test_hierarchical_two_level_formula():
    net = PRESETS["dgx1-ethernet-10g"]
    a_in, b_in = net.intra_link()
    n, p, d = 4e7, 32, 8
    expected = (tc.ring_reduce_scatter(n, d, a_in, b_in) + tc.ring_all_reduce(n, p // d, net.alpha, net.beta)
                + tc.ring_all_gather(n / d, d, a_in, b_in))
    assert net.all_reduce_time(n, p) == pytest.approx(expected)
    # leaving the node costs: 16 workers on two nodes are slower than 8 on one
    assert net.all_reduce_time(n, 16) > net.all_reduce_time(n, 8)
    # and faster than a flat 10 Gbit/s network of 32 workers (the ring's 2(p-1)/p factor over nodes only)
    assert net.all_reduce_time(n, 32) < PRESETS["ethernet-10g"].all_reduce_time(n, 32)


networks = st.sampled_from([PRESETS[k] for k in PRESETS] + [Network(1e-5, 1e9, a) for a in ALGORITHMS])


@settings(max_examples=40, deadline=None)
@given(net=networks, n=st.floats(0, 1e9), nodes=st.integers(1, 16), factor=st.floats(1.0, 8.0),
       op=st.sampled_from(["all_reduce", "all_gather"]))
def test_monotone_in_bytes_alpha_beta_workers(net, n, nodes, factor, op):
    p = nodes * net.devices_per_node
    base = net.time(op, n, p)
    assert net.time(op, n * factor, p) >= base
    assert net.with_(alpha=net.alpha * factor).time(op, n, p) >= base
    assert net.with_(bandwidth=net.bandwidth / factor).time(op, n, p) >= base
    assert net.time(op, n, p + net.devices_per_node) >= base * (1 - 1e-12)


def test_preset_figures():
    assert preset("ethernet-10g").bandwidth == 1.25e9  # 10 Gbit/s in bytes/s
    assert preset("ethernet-1g").beta == pytest.approx(8e-9)
    assert preset("infiniband-200g").bandwidth == 2 * preset("infiniband-100g").bandwidth
    assert preset("nvlink").bandwidth > preset("pcie4").bandwidth > preset("pcie3").bandwidth
    for name, net in PRESETS.items():
        assert net.name == name and net.bandwidth > 0 and net.alpha >= 0


def test_json_round_trip(tmp_path):
    net = resolve_network({"preset": "ethernet-25g", "devices_per_node": 4, "intra": "pcie4", "algorithm": "tree",
                           "op_links": {"all_gather": {"alpha": 1e-4, "bandwidth": 1e8}}})
    path = net.save(tmp_path / "n.json")
    assert Network.load(path) == net
    assert resolve_network(str(path)) == net
    assert net.all_gather_time(1e6, 2) == tc.ring_all_gather(1e6, 2, net.intra_alpha, 1 / net.intra_bandwidth)
    assert net.all_gather_time(1e6, 8) != resolve_network("ethernet-25g").with_(
        devices_per_node=4, intra_alpha=net.intra_alpha, intra_bandwidth=net.intra_bandwidth,
        algorithm="tree").all_gather_time(1e6, 8)  # the calibrated override is used


def test_resolve_network_forms():
    net = preset("ethernet-10g")
    assert resolve_network(net) is net
    assert resolve_network("ethernet-10g") == net
    assert resolve_network({"alpha": 1e-6, "bandwidth": 1e9}).algorithm == "ring"
    assert resolve_network({"preset": "ethernet-10g", "algorithm": "rabenseifner"}).bandwidth == net.bandwidth


@pytest.mark.parametrize("value, field", [
    ({"alpha": 1e-6, "bandwidth": 0.0}, "bandwidth"),
    ({"alpha": 1e-6, "bandwidth": -1e9}, "bandwidth"),
    ({"alpha": -1e-6, "bandwidth": 1e9}, "alpha"),
    ({"alpha": 1e-6, "bandwidth": math.inf}, "bandwidth"),
    ({"alpha": 1e-6, "bandwidth": 1e9, "algorithm": "butterfly"}, "algorithm"),
    ({"alpha": 1e-6, "bandwidth": 1e9, "devices_per_node": 0}, "devices_per_node"),
    ({"alpha": 1e-6, "bandwidth": 1e9, "intra_bandwidth": 0}, "intra_bandwidth"),
    ({"alpha": 1e-6, "bandwidth": 1e9, "latency": 1}, "latency"),
    ({"alpha": 1e-6, "bandwidth": 1e9, "sync": -1e-3}, "sync"),
    ({"alpha": 1e-6, "bandwidth": 1e9, "op_links": {"all_reduce": {"alpha": 0, "bandwidth": 1, "knee_bytes": 8}}},
     "op_links"),
    ({"alpha": 1e-6, "bandwidth": 1e9, "op_links": {"all_reduce": {"alpha": 0, "bandwidth": 1, "knee_bytes": 0,
                                                                    "bandwidth_above_knee": 1}}}, "knee_bytes"),
    ({"alpha": 1e-6, "bandwidth": 1e9, "sync": math.nan}, "sync"),
    ({"bandwidth": 1e9}, "alpha"),
    ({"preset": "ethernet-11g"}, "preset"),
    ({"preset": "ethernet-10g", "intra": "nvlink9"}, "preset"),
    ({"alpha": 1e-6, "bandwidth": 1e9, "op_links": {"broadcast": {"alpha": 0, "bandwidth": 1}}}, "op_links"),
    ("infiniband-400g", "preset"),
    (3.5, "network"),
])
def test_bad_network_names_the_field(value, field):
    with pytest.raises(ValueError, match=field):
        resolve_network(value)


def test_bad_workers_name_the_field():
    net = preset("dgx1-ethernet-10g")
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="workers"):
            net.all_reduce_time(1e6, bad)
    with pytest.raises(ValueError, match="workers"):
        net.all_reduce_time(1e6, 12)  # spans nodes but is not a multiple of 8
    with pytest.raises(ValueError, match="op"):
        net.time("broadcast", 1e6, 4)


@pytest.mark.parametrize("op", ["all_reduce", "all_gather"])
def test_sync_adds_once_per_collective_and_never_for_one_worker(op):
    base = PRESETS["dgx1-ethernet-10g"]
    loaded = base.with_(sync=7e-4)
    for p in (2, 8, 16, 32):
        assert loaded.time(op, 1e6, p) == pytest.approx(base.time(op, 1e6, p) + 7e-4, rel=1e-12)
    assert loaded.time(op, 1e6, 1) == base.time(op, 1e6, 1) == 0.0  # one worker: nothing to wait for
    # the alpha-beta formulas themselves are untouched (theory agreement holds with sync set)
    assert loaded.all_reduce_time(1e6, 16) == base.all_reduce_time(1e6, 16)
    assert Network.from_dict(loaded.to_dict()) == loaded


@given(n=st.floats(1.0, 1e9), factor=st.floats(1.0, 8.0), p=st.integers(2, 16))
@settings(max_examples=40, deadline=None)
def test_knee_link_is_piecewise_and_monotone(n, factor, p):
    knee, fast, slow = 1e6, 4e9, 1e9
    net = Network(1e-5, 1e9, op_links={"all_reduce": {"alpha": 2e-5, "bandwidth": fast, "knee_bytes": knee,
                                                      "bandwidth_above_knee": slow}})
    beta_eff = (min(n, knee) / fast + max(0.0, n - knee) / slow) / n
    assert net.all_reduce_time(n, p) == pytest.approx(tc.ring_all_reduce(n, p, 2e-5, beta_eff), rel=1e-12)
    assert net.all_reduce_time(n * factor, p) >= net.all_reduce_time(n, p) * (1 - 1e-12)
