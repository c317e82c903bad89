"""The shaped link (sim/real/link.py): a private network namespace whose loopback is rate-limited by tbf.

Tests that make a namespace need root and iproute2; elsewhere they skip, naming what is missing (CI runs as
root, so they run there).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

import sim
from sim.real import link as link_module
from sim.real.link import ShapedLink, LinkUnavailableError, missing_requirements, shaped_namespace

MISSING = missing_requirements()
needs_link = pytest.mark.skipif(bool(MISSING), reason="a shaped link needs " + " and ".join(MISSING))


@pytest.mark.parametrize("text, rate", [("100mbit", 1e8), ("1gbit", 1e9), ("2.5Mbit", 2.5e6), ("500kbit", 5e5)])
def test_rates_parse_in_tc_units(text, rate):
    link = ShapedLink.parse(text)
    assert link.rate_bits == rate
    assert link.burst_bytes > 64 * 1024  # above the loopback MTU, or big packets never pass
    assert link.limit_bytes >= link.burst_bytes
    assert link.beta == pytest.approx(8 / rate)
    assert ShapedLink.parse(link.label()) == link


@pytest.mark.parametrize("bad", ["fast", "100", "100mb", "-1mbit", "0mbit", "10kbit", 100, None])
def test_a_bad_rate_names_the_field_and_the_form(bad):
    with pytest.raises(ValueError, match="link=.*allowed"):
        ShapedLink.parse(bad)


def test_without_root_or_tools_the_error_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(link_module.shutil, "which", lambda tool: None if tool == "tc" else "/usr/sbin/" + tool)
    with pytest.raises(LinkUnavailableError, match="root.*`tc`"):
        with shaped_namespace(ShapedLink.parse("100mbit")):
            pass


def namespaces() -> set[str]:
    return set(os.listdir(link_module.NETNS_DIR)) if os.path.isdir(link_module.NETNS_DIR) else set()


@needs_link
def test_the_namespace_is_removed_on_exit_on_error_and_on_ctrl_c():
    with shaped_namespace(ShapedLink.parse("100mbit")) as name:
        assert name in namespaces()
        shown = subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "show", "dev", "lo"],
                               capture_output=True, text=True).stdout
        assert "tbf" in shown and "100Mbit" in shown
    assert name not in namespaces()
    for interruption in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(interruption)):
            with shaped_namespace(ShapedLink.parse("1gbit")) as name:
                assert name in namespaces()
                raise interruption
        assert name not in namespaces()


@needs_link
def test_a_namespace_left_by_a_killed_process_is_removed_next_time():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    stale = f"{link_module.PREFIX}{dead}-0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in link_module.remove_stale_namespaces()
        assert stale not in namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)


TRANSFER = textwrap.dedent("""
    import socket, threading, time
    size = {size}
    server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(1)
    def sink():
        conn, _ = server.accept(); got = 0
        while got < size:
            got += len(conn.recv(1 << 16))
        conn.sendall(b"k"); conn.close()
    threading.Thread(target=sink).start()
    client = socket.create_connection(server.getsockname())
    started = time.perf_counter(); client.sendall(b"x" * size); client.recv(1)
    print(time.perf_counter() - started)
""")


@needs_link
def test_bytes_cross_the_shaped_loopback_no_faster_than_its_rate():
    link, size = ShapedLink.parse("20mbit"), 2_500_000
    with shaped_namespace(link) as name:
        out = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", TRANSFER.format(size=size)],
                             capture_output=True, text=True, timeout=60)
    seconds = float(out.stdout.strip())
    fastest = (size - link.burst_bytes) * 8 / link.rate_bits  # the bucket lets its burst through at once
    assert seconds >= 0.9 * fastest, (seconds, fastest)


@needs_link
@pytest.mark.distributed
def test_a_run_over_the_link_follows_the_same_trajectory_and_leaves_nothing_behind():
    experiment = sim.Experiment(task="digits-mlp", workers=2, steps=4, eval_every=2,
                                compressor={"name": "powersgd", "rank": 2})
    shaped = sim.run_distributed(experiment, nproc=2, link="50mbit", timeout=300)
    assert not [n for n in namespaces() if n.startswith(f"{link_module.PREFIX}{os.getpid()}-")]
    plain = sim.run(experiment)
    assert shaped.extras["link"] == "50mbit"
    for name, p in plain.params.items():  # two processes sum exactly as the virtual collective (DESIGN.md)
        assert (shaped.params[name] == p).all(), name


def test_the_link_is_refused_with_nccl():
    with pytest.raises(ValueError, match="link=.*backend='gloo'"):
        sim.run_distributed(sim.Experiment(task="digits-mlp", workers=2, steps=1), nproc=2, backend="nccl",
                            link="100mbit")


# -- the forecast ----------------------------------------------------------------------------------------------
from sim.cost.network import Network  # noqa: E402
from sim.real.forecast import (Forecast, evaluations_until, expected_slowest, fit_sync, forecast,  # noqa: E402
                               one_step_records, price_comm, steps_to, with_wall_clock)

SMALL = sim.Experiment(task="digits-mlp", workers=2, steps=8, eval_every=2, compression_error_every=0,
                       compressor={"name": "powersgd", "rank": 2})


def test_steps_to_target_is_the_first_logged_step_reaching_it():
    import pandas as pd

    history = pd.DataFrame({"step": [2, 4, 6], "test_accuracy": [0.5, 0.8, 0.7]})
    assert steps_to(history, 0.75, "test_accuracy") == 4
    assert steps_to(history, 0.9, "test_accuracy") is None
    with pytest.raises(ValueError, match="metric='val_accuracy'"):
        steps_to(history, 0.5, "val_accuracy")
    assert evaluations_until(SMALL, 4) == 2 and evaluations_until(SMALL, None) == 0


def test_the_prediction_is_steps_times_the_priced_step():
    network = Network(alpha=1e-3, bandwidth=1e6, algorithm="ring")
    f = forecast(SMALL, target=0.0, nproc=2, network=network)  # any accuracy reaches 0: the first evaluation
    assert f.steps_to_target == 2
    assert f.compute_seconds > 0 and f.eval_seconds > 0
    # The step's collectives: PowerSGD's P and Q all-reduces (+ the exact one for the biases) and two votes.
    records = one_step_records(SMALL)
    assert [r.op for r in records] == ["all_reduce"] * len(records) and len(records) >= 2
    assert (f.comm_seconds, f.collectives) == pytest.approx(price_comm(network, records, SMALL.workers))
    by_hand = sum(network.time(r.op, r.bits / 8, 2) for r in records) + 2 * network.time("all_reduce", 16, 2)
    assert f.comm_seconds == pytest.approx(by_hand) and f.collectives == len(records) + 2
    assert f.predicted_seconds == pytest.approx(2 * (f.compute_seconds + f.comm_seconds) + 1 * f.eval_seconds)
    assert f.measured_seconds is None and f.relative_error is None
    # sync: every collective of the step pays it once more
    synced = f.with_sync(2e-3)
    assert synced.step_seconds == pytest.approx(f.step_seconds + 2e-3 * f.collectives)
    assert synced.network.sync == 2e-3 and synced.with_sync(0.0).step_seconds == pytest.approx(f.step_seconds)
    with pytest.raises(ValueError, match="sync"):
        f.with_sync(-1.0)


def test_fit_sync_recovers_the_per_collective_cost_from_measured_steps():
    from dataclasses import replace

    network = Network(alpha=1e-3, bandwidth=1e6, algorithm="ring")
    base = forecast(SMALL, target=0.0, nproc=2, network=network)
    runs = [replace(base, collectives=c, measured_step_seconds=base.step_seconds + 1.5e-3 * c) for c in (3, 5)]
    assert fit_sync(runs) == pytest.approx(1.5e-3, rel=1e-9)
    with pytest.raises(ValueError, match="measure=True"):
        fit_sync([base])


def test_the_wall_clock_column_adds_up_the_stamped_steps():
    import pandas as pd

    history = pd.DataFrame({"step": [1, 2, 4], "test_accuracy": [0.1, 0.2, 0.3]})
    timed = with_wall_clock(history, [0.2, 0.1, 0.4])  # steps 2, 3, 4; step 1 counts as the median (0.2)
    assert timed["seconds"].tolist() == pytest.approx([0.2, 0.4, 0.9])


def test_the_slowest_of_p_ranks_is_the_mean_for_one_and_grows_with_p():
    samples = [1.0, 2.0, 3.0, 4.0]
    assert expected_slowest(samples, 1) == pytest.approx(2.5)
    assert expected_slowest(samples, 1) < expected_slowest(samples, 2) < expected_slowest(samples, 4) <= 4.0


def test_forecast_arguments_are_validated_before_any_run():
    for bad, field in [({"nproc": 3}, "nproc"), ({"nproc": 1}, "nproc"), ({"target": float("nan")}, "target"),
                       ({"link": "fast"}, "link"), ({"network": "ethernet"}, "network")]:
        with pytest.raises(ValueError, match=field):
            forecast(SMALL, **{"target": 0.5, **bad})


@needs_link
@pytest.mark.distributed
def test_a_measured_forecast_runs_the_real_processes_over_the_link():
    network = Network(alpha=1e-4, bandwidth=50e6 / 8, algorithm="ring")
    f = forecast(SMALL, target=0.0, nproc=2, link="50mbit", network=network, measure=True, timeout=300)
    assert isinstance(f, Forecast) and f.link == "50mbit"
    assert f.real_steps_to_target == f.steps_to_target == 2  # the real run follows the simulated trajectory
    assert f.measured_seconds > 0 and f.relative_error is not None
    seconds = f.measured_history.set_index("step")["seconds"]
    assert seconds.is_monotonic_increasing and f.measured_seconds == seconds[f.real_steps_to_target]


def test_the_command_lines_refuse_a_bad_rate_in_one_line(capsys):
    from sim.cli.launch import main as launch
    from sim.cli.main import main

    assert main(["calibrate", "--link", "fast"]) == 2
    assert launch(["--experiment", '{"workers": 2, "steps": 1}', "--link", "fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("link='fast' is invalid" in line for line in err)
