"""sim.real.calibrate (fit and a tiny real gloo run) and the `python -m sim` command line."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from sim.cli.main import SUBCOMMANDS, build_parser, main
from sim.cost import Network
from sim.real.calibrate import calibrate, design, fit_sync, measure
from theory import collectives as tc


def synthetic(alpha_ar, beta_ar, alpha_ag, beta_ag, noise=0.0):
    rng = np.random.default_rng(0)
    rows = []
    for p in (2, 3, 4):
        for n in [2**k for k in range(2, 26)]:
            ar = tc.ring_all_reduce(n, p, alpha_ar, beta_ar)
            ag = tc.ring_all_gather(n, p, alpha_ag, beta_ag)
            rows += [{"op": "all_reduce", "nproc": p, "bytes": n, "seconds": ar * (1 + noise * rng.standard_normal())},
                     {"op": "all_gather", "nproc": p, "bytes": n, "seconds": ag * (1 + noise * rng.standard_normal())}]
    return pd.DataFrame(rows)


def test_fit_recovers_alpha_beta_and_predicts_held_out_sizes():
    result = calibrate(measurements=synthetic(5e-5, 1e-9, 8e-5, 2e-9))
    links = result.joint.op_links
    assert links["all_reduce"]["alpha"] == pytest.approx(5e-5, rel=1e-6)
    assert links["all_reduce"]["bandwidth"] == pytest.approx(1e9, rel=1e-6)
    assert links["all_gather"]["bandwidth"] == pytest.approx(5e8, rel=1e-6)
    assert result.held_out_error() < 1e-6
    assert result.measurements.held_out.sum() == len(result.measurements) // 2
    # the saved Network prices like the measurements it was fitted on
    net = result.networks[3]
    assert net.all_gather_time(4096, 3) == pytest.approx(tc.ring_all_gather(4096, 3, 8e-5, 2e-9), rel=1e-6)


def test_fit_under_noise_stays_close():
    result = calibrate(measurements=synthetic(5e-5, 1e-9, 8e-5, 2e-9, noise=0.1))
    assert result.held_out_error() < 0.15


def test_design_is_the_ring_formula():
    a, b = design("all_reduce", 4, 1000)
    assert a * 2.0 + b * 3.0 == pytest.approx(tc.ring_all_reduce(1000, 4, 2.0, 3.0))


@pytest.mark.distributed
def test_tiny_real_gloo_measurement():
    data = measure(2, sizes=(4, 4096, 65536))
    assert list(data.columns[:4]) == ["op", "nproc", "bytes", "seconds"]
    assert len(data) == 6 and (data.seconds > 0).all()
    assert (data.seconds_min <= data.seconds).all() and (data.seconds <= data.seconds_median * 10).all()


def test_bad_calibration_input():
    with pytest.raises(ValueError, match="nproc"):
        measure(1)
    with pytest.raises(ValueError, match="backend"):
        measure(2, backend="mpi")


def test_cli_whatif_prints_and_writes(tmp_path, capsys):
    csv, png = tmp_path / "t.csv", tmp_path / "t.png"
    assert main(["whatif", "--model", "digits-mlp", "--rank", "1", "--workers", "2", "8", "--network",
                 "ethernet-1g", "nvlink", "--compute", "0.01", "--codec", "none", "--csv", str(csv),
                 "--png", str(png)]) == 0
    table = pd.read_csv(csv)
    assert len(table) == 8 and png.stat().st_size > 0
    assert "powersgd(rank=1)" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_naming_the_field(capsys):
    assert main(["whatif", "--model", "digits-mlp", "--network", "ethernet-3g", "--compute", "0"]) == 2
    assert "preset" in capsys.readouterr().err


def test_cli_is_extensible(monkeypatch):
    assert set(SUBCOMMANDS) >= {"whatif", "calibrate"}
    monkeypatch.setitem(SUBCOMMANDS, "run", (lambda p: p.add_argument("--steps", type=int), lambda a: a.steps, "r"))
    assert main(["run", "--steps", "7"]) == 7
    args = build_parser().parse_args(["calibrate", "--nproc", "2", "3"])
    assert args.nproc == [2, 3] and args.backend == "gloo"


def test_fit_sync_is_least_squares_through_the_origin():
    # exact data: every run's gap is 0.8 ms per collective
    assert fit_sync([2.4e-3, 4.0e-3], [3, 5]) == pytest.approx(8e-4, rel=1e-12)
    # the closed form against numpy's least squares on noisy gaps
    gaps, counts = np.array([2.0e-3, 4.5e-3, 1.1e-3]), np.array([3, 5, 2])
    (expected,), *_ = np.linalg.lstsq(counts[:, None].astype(float), gaps, rcond=None)
    assert fit_sync(gaps, counts) == pytest.approx(expected, rel=1e-12)
    assert fit_sync([-1e-3, -2e-3], [3, 5]) == 0.0  # over-predicted runs: no negative cost per collective
    for gaps, counts in (([], []), ([1e-3], [0]), ([1e-3, 2e-3], [3]), ([float("nan")], [3]), ([1e-3], [math.inf])):
        with pytest.raises(ValueError, match="fit_sync"):
            fit_sync(gaps, counts)


def test_fit_finds_a_bandwidth_knee_and_prices_it_through_network():
    """Synthetic gloo-like data whose per-byte cost rises 3x beyond 1 MiB: the knee, both bandwidths and alpha
    come back, the held-out sizes are predicted exactly, and the saved Network prices like the fit."""
    knee, alpha, beta, beta_above = 2.0**20, 6e-5, 1 / 3e9, 1 / 1e9
    rows = []
    for p in (2, 4):
        for n in [2**k for k in range(2, 26)]:
            a, b = design("all_reduce", p, n)
            per_byte = b / n
            t = a * alpha + per_byte * (min(n, knee) * beta + max(0, n - knee) * beta_above)
            rows.append({"op": "all_reduce", "nproc": p, "bytes": n, "seconds": t})
            rows.append({"op": "all_gather", "nproc": p, "bytes": n, "seconds": tc.ring_all_gather(n, p, alpha, beta)})
    result = calibrate(measurements=pd.DataFrame(rows))
    link = result.joint.op_links["all_reduce"]
    assert link["knee_bytes"] == knee
    assert link["alpha"] == pytest.approx(alpha, rel=1e-6)
    assert link["bandwidth"] == pytest.approx(3e9, rel=1e-6)
    assert link["bandwidth_above_knee"] == pytest.approx(1e9, rel=1e-6)
    assert result.held_out_error() < 1e-6
    for n in (4096, 2**20, 3 * 2**21):
        a, b = design("all_reduce", 4, n)
        expected = a * alpha + b / n * (min(n, knee) * beta + max(0, n - knee) * beta_above)
        assert result.networks[4].all_reduce_time(n, 4) == pytest.approx(expected, rel=1e-6)
    # data without a knee gets none (two exact fits tie on Akaike's criterion; the plain one wins)
    assert "knee_bytes" not in result.joint.op_links["all_gather"]
    # the knee survives the Network's save/load
    assert Network.from_dict(json.loads(json.dumps(result.networks[4].to_dict()))) == result.networks[4]


@pytest.mark.parametrize("seed", range(5))
def test_noise_does_not_buy_a_spurious_knee_that_corrupts_the_bandwidth(seed):
    """Knee-free data with 5% noise: a knee (two more parameters) must earn its place by Akaike's criterion, so
    the fitted bandwidth stays near the truth (a knee at a small size would leave the bandwidth below it
    unidentified: 0.9 GB/s for a 3 GB/s link before the criterion)."""
    data = synthetic(5e-5, 1 / 3e9, 8e-5, 2e-9)
    rng = np.random.default_rng(seed)
    data["seconds"] = data.seconds * (1 + 0.05 * rng.standard_normal(len(data)))
    link = calibrate(measurements=data).joint.op_links["all_reduce"]
    assert link["bandwidth"] == pytest.approx(3e9, rel=0.1)
