"""The real-step prediction of scripts/write_cost_model_doc.py on one tiny real gloo run.

Timings are not asserted (machine-dependent); what is asserted could fail: the per-step stamps exist for every
step after the first and are positive, the prediction is finite and positive, its components add up, the
probed ledger sends exactly what the real run's ledger recorded, and the diagnostic collectives counted on a
simulated step are the ones ``sim.run``'s loop issues (4 scalars in 2 collectives plus the dense gradient).
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

import sim
from sim.cost import Network
from sim.real.forecast import expected_slowest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "write_cost_model_doc.py"


def _script():
    name = "write_cost_model_doc"
    if name not in sys.modules:  # dataclasses need the module registered while it executes
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.distributed
def test_prediction_of_a_tiny_real_run_adds_up():
    doc = _script()
    steps, nproc = 8, 2
    compressor = {"name": "powersgd", "rank": 2}
    experiment = doc.real_experiment("digits-mlp", nproc, compressor, steps=steps, batch=16)
    real = sim.run_distributed(experiment, nproc=nproc, backend="gloo", workers_per_process=1, timeout=120)

    stamped = real.extras["step_seconds"]
    assert len(stamped) == steps - 1 and all(t > 0 for t in stamped)
    assert len(doc.steady_steps(stamped, skip=2)) == steps - 1 - 2 - 1

    network = Network(alpha=50e-6, bandwidth=1e9, name="test")
    prediction, bits = doc.predict_real_step(experiment, network, nproc, cores=2, repeats=2)
    assert bits == real.extras["ledger_bits"] / steps  # the probe prices what the real run sent
    parts = (prediction.compute, prediction.codec, prediction.comm_ledger, prediction.comm_diagnostics)
    assert all(math.isfinite(x) and x > 0 for x in parts)
    assert prediction.comm == pytest.approx(prediction.comm_ledger + prediction.comm_diagnostics, rel=1e-12)
    assert prediction.total == pytest.approx(prediction.compute + prediction.codec + prediction.comm, rel=1e-12)
    assert math.isfinite(prediction.total) and prediction.total > 0


def test_diagnostic_records_and_cpu_share():
    doc = _script()
    experiment = sim.Experiment(task="digits-mlp", workers=4, steps=1, batch_size=4,
                                task_options={"hidden": [5]})
    records = doc.diagnostic_records(experiment, workers=4)
    # what sim.run's loop averages over processes each step: 4 float64 scalars batched two per collective
    # (train loss + first non-finite vote, memory norm + second vote), then the exact mean gradient
    shapes = [(5, 64), (5,), (10, 5), (10,)]
    scalars = [r for r in records if r.dtype == "float64"]
    assert len(scalars) == 2 and all(r.bits == 2 * 64 and r.numel == 2 for r in scalars)
    assert sorted(r.bits for r in records if r.dtype != "float64") == sorted(32 * math.prod(s) for s in shapes)
    assert all(r.op == "all_reduce" and r.workers == 4 for r in records)
    assert doc.cpu_share(2, cores=2) == 1.0 and doc.cpu_share(4, cores=2) == 2.0 and doc.cpu_share(4, cores=16) == 1.0
    assert doc.threads_per_process(4, cores=16) == 4 and doc.threads_per_process(4, cores=2) == 1


def test_expected_slowest_matches_order_statistics():
    doc = _script()
    samples = [1.0, 2.0, 3.0, 4.0]
    assert expected_slowest(samples, 1) == pytest.approx(2.5)  # p = 1: the mean
    # p = 2 by enumeration of all 16 ordered pairs of draws
    assert expected_slowest(samples, 2) == pytest.approx(sum(max(a, b) for a in samples for b in samples) / 16)
    assert expected_slowest([3.0] * 5, 4) == pytest.approx(3.0)  # no spread: no straggler penalty
    assert expected_slowest(samples, 8) <= max(samples)


def test_add_sync_fits_on_identity_runs_only_and_prices_every_run():
    import pandas as pd

    doc = _script()
    table = pd.DataFrame({
        "nproc": [2, 2, 2, 4, 4],
        "compressor": ["identity", "powersgd(rank=2)", "identity", "identity", "topk(ratio=0.01)"],
        "predicted": [5e-3, 8e-3, 20e-3, 9e-3, 13e-3],
        "measured": [5e-3 + 3 * 1e-3, 99.0, 20e-3 + 3 * 1e-3, 9e-3 + 3 * 2e-3, 0.0],  # held-out values unused
        "collectives": [3, 5, 3, 3, 5],
    })
    syncs = doc.add_sync(table)
    assert syncs == {2: pytest.approx(1e-3), 4: pytest.approx(2e-3)}  # the held-out runs' wild values did not move it
    assert list(table.held_out) == [False, True, False, False, True]
    assert table.predicted.tolist() == pytest.approx([8e-3, 13e-3, 23e-3, 15e-3, 23e-3])


@pytest.mark.distributed
def test_measure_real_steps_schedule_returns_rank0_rows_and_every_processes_local_samples():
    """The interleaved schedule (warm-up, then per round a local-work-only run and one run per compressor):
    rows in compressor order without the warm-up, real ledger bits per step, and local samples pooled over
    both processes and both rounds (steps - 1 stamped intervals each, minus the skipped and the last)."""
    doc = _script()
    compressors = ({"name": "identity"}, {"name": "topk", "ratio": 0.1})
    rows, local = doc.measure_real_steps("digits-mlp", 2, compressors, steps=8, repeats=2, timeout=180)
    assert [r["compressor"] for r in rows] == ["identity", "topk(ratio=0.1)"]
    per_run = 8 - 1 - doc.SKIP_STEPS - 1
    assert all(r["steps_timed"] == 2 * per_run and 0 < r["measured_q20"] <= r["measured"] for r in rows)
    assert len(local) == 2 * 2 * per_run and all(t > 0 for t in local)
    dense = sum(32 * math.prod(s) for s in sim.Simulation(doc.real_experiment("digits-mlp", 2, compressors[0], 8)).shapes.values())
    assert rows[0]["real_bits_per_step"] == dense  # identity sends the dense gradient once per step
    assert rows[1]["real_bits_per_step"] < dense
