"""DistributedCollective on real gloo processes against VirtualCollective, and failures that must not hang.

One spawn computes everything (process start-up dominates the cost); the tests assert on its answers.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

import compressors
from compressors.comm import VirtualCollective
from sim.real.distributed import DistributedRunError, spawn
from compressors.comm import CollectiveError, DistributedCollective

pytestmark = pytest.mark.distributed

SHAPES = {"w": (6, 5), "v": (7,), "c": (3, 2, 2)}


def _global_grads(workers: int, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn((workers, *s), generator=g).to(dtype) for n, s in SHAPES.items()}  # (W, *s)


def _records(ledger):
    return [(r.op, r.bits, r.numel, r.dtype, r.workers, r.tag) for r in ledger]


def _collective_checks(rank: int, world: int) -> dict:
    out: dict = {}
    for k in (1, 2):
        comm = DistributedCollective(k)
        virtual = VirtualCollective(k * world)
        rows = slice(rank * k, (rank + 1) * k)
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            x = _global_grads(k * world, dtype)["w"]  # (W, 6, 5)
            real, ref = comm.all_reduce_mean(x[rows], tag="t"), virtual.all_reduce_mean(x, tag="t")
            out[("reduce_equal", k, str(dtype))] = bool(torch.equal(real, ref))
            out[("reduce_rel", k, str(dtype))] = float((real.double() - ref.double()).abs().max()
                                                      / ref.double().abs().max())
            out[("gather_equal", k, str(dtype))] = bool(torch.equal(comm.all_gather(x[rows], tag="g"),
                                                                    virtual.all_gather(x, tag="g")))
        calls = comm.ledger.calls
        out[("metric", k)] = comm.average_metric(float(rank + 1))
        out[("metric_unrecorded", k)] = comm.ledger.calls == calls
        out[("ledger_equal", k)] = _records(comm.ledger) == _records(virtual.ledger)
        out[("workers", k)] = (comm.workers, list(comm.local_workers))
        try:
            comm.all_reduce_mean(torch.zeros(k + 1, 3))
        except ValueError as error:
            out[("bad_rows", k)] = str(error)
    # W = 4 (2 processes x 2 emulated workers): one aggregate of every registered compressor on identical inputs.
    grads = _global_grads(4, seed=1)
    for name in sorted(compressors.REGISTRY):
        agg = compressors.make(name)
        comm, virtual = DistributedCollective(2), VirtualCollective(4)
        real_state = agg.init(SHAPES, workers=2, seed=3)
        ref_state = agg.init(SHAPES, workers=4, seed=3)
        for step in range(2):  # two steps: the second uses warm-start factors / error-feedback memory
            local = {n: g[rank * 2:(rank + 1) * 2] + step for n, g in grads.items()}  # (2, *s)
            real, real_state = agg.aggregate(local, real_state, comm)
            ref, ref_state = agg.aggregate({n: g + step for n, g in grads.items()}, ref_state, virtual)
            out[("w4", name, step)] = max(float((real[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30))
                                         for n in SHAPES)
        out[("w4_ledger", name)] = _records(comm.ledger) == _records(virtual.ledger)
    return out


@pytest.fixture(scope="module")
def checks():
    return spawn(_collective_checks, 2, timeout=240)


def test_two_processes_one_worker_each_are_bitwise_the_virtual_mean(checks):
    for rank_out in checks:
        for dtype in ("torch.float32", "torch.float64", "torch.float16", "torch.bfloat16"):
            # k = 1: the local sum is the row itself, x0 + x1 commutes exactly, the division comes last.
            assert rank_out[("reduce_equal", 1, dtype)], dtype
            assert rank_out[("gather_equal", 1, dtype)], dtype
            assert rank_out[("gather_equal", 2, dtype)], dtype


def test_emulated_workers_reduce_to_the_virtual_mean_within_rounding(checks):
    for rank_out in checks:
        # (x0 + x1) + (x2 + x3) vs torch's own summation order: one rounding per addition, 3 additions.
        assert rank_out[("reduce_rel", 2, "torch.float32")] < 4 * 2 ** -23
        assert rank_out[("reduce_rel", 2, "torch.float64")] < 4 * 2 ** -52
        assert rank_out[("reduce_rel", 2, "torch.bfloat16")] < 4 * 2 ** -7


def test_ledger_metric_and_worker_ids(checks):
    for rank, rank_out in enumerate(checks):
        for k in (1, 2):
            assert rank_out[("ledger_equal", k)]
            assert rank_out[("metric", k)] == 1.5
            assert rank_out[("metric_unrecorded", k)]
            assert rank_out[("workers", k)] == (2 * k, list(range(rank * k, (rank + 1) * k)))
            assert "leading worker axis of size" in rank_out[("bad_rows", k)]


def test_every_compressor_aggregates_like_the_simulator_with_emulated_workers(checks):
    names = sorted(compressors.REGISTRY)
    for rank_out in checks:
        for name in names:
            # Single steps on identical inputs are not chaotic: only the order of the 4-worker sums differs
            # (relative 1e-7 per sum, measured <= 1e-7); orthogonalization and division by small norms
            # (PowerSGD's Q, scaled sign) may amplify it by a conditioning factor, so 1e-4 leaves margin. The
            # half-precision casts sum in their payload dtype: 4 roundings of 2^-8 (bf16) or 2^-11 (fp16).
            tol = {"bf16": 4 * 2 ** -8, "fp16": 4 * 2 ** -11}.get(name, 1e-4)
            assert rank_out[("w4", name, 0)] < tol, name
            assert rank_out[("w4", name, 1)] < tol, name
            assert rank_out[("w4_ledger", name)], name


# -- failures: a clear error within a timeout, never a hang --------------------------------------------------
def _dead_and_hung_peer(rank: int, world: int) -> dict | None:
    import torch.distributed as dist

    spare = dist.new_group([0, 1])  # a second group: the timed-out default group may be unusable afterwards
    if rank == 1:
        time.sleep(2.5)  # hung: rank 0 times out meanwhile
        os._exit(0)  # killed: gone without a word (exit code 0, so the launcher keeps waiting for rank 0)
    out = {}
    for label, comm in (("hung", DistributedCollective(1, timeout=1.0)),
                        ("dead", DistributedCollective(1, group=spare, timeout=20.0))):
        if label == "dead":
            time.sleep(1.5)  # rank 1 is gone by now
        start = time.monotonic()
        try:
            comm.all_reduce_mean(torch.ones(1, 3), tag="probe")
            out[label] = ("no error", time.monotonic() - start)
        except CollectiveError as error:
            out[label] = (str(error), time.monotonic() - start)
    return out


def test_hung_and_dead_peers_raise_a_clear_collective_error():
    out = spawn(_dead_and_hung_peer, 2, timeout=120)[0]
    message, elapsed = out["hung"]
    assert "all_reduce_mean (tag 'probe') failed on rank 0 of 2" in message and "timeout 1s" in message
    assert elapsed < 10.0
    message, elapsed = out["dead"]
    assert "a peer process died" in message
    assert elapsed < 20.0  # gloo sees the closed connection long before the 20 s timeout


def _killed_mid_run(rank: int, world: int) -> None:
    if rank == 1:
        os.kill(os.getpid(), 9)  # SIGKILL: no exception, no cleanup
    DistributedCollective(1, timeout=300.0).all_reduce_mean(torch.ones(1, 2))  # would wait for rank 1


def _hangs(rank: int, world: int) -> None:
    time.sleep(600)


def test_launcher_reports_a_killed_process_and_terminates_the_rest():
    start = time.monotonic()
    with pytest.raises(DistributedRunError, match="process 1 terminated"):
        spawn(_killed_mid_run, 2, timeout=120)
    assert time.monotonic() - start < 60


def test_launcher_deadline_ends_a_hung_run():
    start = time.monotonic()
    with pytest.raises(DistributedRunError, match="did not finish within timeout=6s"):
        spawn(_hangs, 2, timeout=6)  # the children may still be importing: the deadline holds all the same
    assert time.monotonic() - start < 30


def test_invalid_options_name_the_field():
    with pytest.raises(ValueError, match="nproc"):
        spawn(_hangs, 0)
    with pytest.raises(ValueError, match="backend"):
        spawn(_hangs, 1, backend="mpi")
    with pytest.raises(ValueError, match="process group"):
        DistributedCollective(1)  # no process group in the test process
