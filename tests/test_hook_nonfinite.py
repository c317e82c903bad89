"""One NaN batch on one rank, or a compressor failing on one rank, under real DDP (2 gloo processes).

Every registered compressor runs 6 steps with several buckets; at step K rank 0's batch is NaN (or, for the
failure case, a compressor raises ``LinAlgError`` on rank 0 alone, between two of its collectives). A
skip-step guard (what GradScaler does) skips the optimizer step when any gradient is non-finite. The run
must then equal, bitwise, a run in which step K never happened: same parameters, no state poisoned, and
every rank must have seen the non-finite step (or the guard would have stepped on one rank only).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import compressors
from compressors.base import Aggregator
from sim.real.distributed import spawn
from tests.test_distributed_hook import TINY_BUCKETS_MB, _batch, _model

pytestmark = pytest.mark.distributed

STEPS, K = 6, 3  # K after DDP's bucket rebuild (iteration 1), with states that already carry memory


class FailsOnce(Aggregator):
    """``inner``, except that on rank 0, at the second call after ``arm()`` (the second bucket of that step),
    it raises after its first collective: a compressor's linear algebra failing on that rank alone while its
    peer already waits in the next collective."""

    def __init__(self, inner: Aggregator):
        self.inner, self.calls_left = inner, None
        self.name = inner.name

    def arm(self):
        self.calls_left = 2

    def init(self, shapes, workers, seed=0, dtype=torch.float32, device="cpu"):
        return self.inner.init(shapes, workers, seed, dtype=dtype, device=device)

    def reduce(self, grads, state, comm, want_local=False):
        if self.calls_left is not None:
            self.calls_left -= 1
        failing = comm.rank == 0 and self.calls_left == 0

        class Failing:
            def __getattr__(self, name):
                return getattr(comm, name)

            def all_reduce_mean(self, x, tag=""):
                out = comm.all_reduce_mean(x, tag)
                if failing:
                    raise torch.linalg.LinAlgError("injected: the algorithm failed to converge")
                return out

            def all_gather(self, x, tag=""):
                out = comm.all_gather(x, tag)
                if failing:
                    raise torch.linalg.LinAlgError("injected: the algorithm failed to converge")
                return out

        return self.inner.reduce(grads, state, Failing(), want_local)

    def bits_per_step(self, shapes):
        return self.inner.bits_per_step(shapes)


def _run(rank: int, aggregator, steps_taken, nan_at=None, overlap=True, nan=True):
    model = _model()
    ddp = DDP(model, bucket_cap_mb=TINY_BUCKETS_MB)
    state, hook = compressors.ddp_comm_hook(aggregator, model=model, overlap=overlap)
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, foreach=False)
    skipped = []
    for step in steps_taken:
        opt.zero_grad()
        x, y = _batch(rank, step)
        if step == nan_at and rank == 0 and nan:
            x = x.clone()
            x[0, 0] = float("nan")
        if step == nan_at and hasattr(aggregator, "arm"):
            aggregator.arm()
        F.cross_entropy(ddp(x), y).backward()
        if all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()):  # the skip-step guard
            opt.step()
        else:
            skipped.append(step)
    state.close()
    return {"params": [p.detach().clone() for p in model.parameters()], "skipped": skipped,
            "steps": state.steps, "skipped_steps": state.skipped_steps, "buckets": len(state.buckets)}


def _nan_checks(rank: int, world: int) -> dict:
    out = {}
    every_step, without_k = list(range(STEPS)), [s for s in range(STEPS) if s != K]
    for name in sorted(compressors.REGISTRY):
        out[name] = (_run(rank, compressors.make(name), every_step, nan_at=K),
                     _run(rank, compressors.make(name), without_k))
    out["powersgd, synchronous"] = (_run(rank, compressors.make("powersgd"), every_step, nan_at=K, overlap=False),
                                    _run(rank, compressors.make("powersgd"), without_k, overlap=False))
    for name in ("powersgd", "atomo", "topk"):
        out["fails", name] = (_run(rank, FailsOnce(compressors.make(name)), every_step, nan_at=K, nan=False),
                              _run(rank, compressors.make(name), without_k))
    return out


@pytest.fixture(scope="module")
def checks():
    return spawn(_nan_checks, 2, timeout=300)


def _assert_survived(case, results):
    bad, reference = results
    assert bad["skipped"] == [K], (case, bad["skipped"])  # every rank saw the NaN step, and only it
    assert reference["skipped"] == []
    assert bad["steps"] == reference["steps"] == STEPS - 1
    assert [s for s, _ in bad["skipped_steps"]] == [K]
    assert bad["buckets"] >= 3, case  # several buckets: the bad step's other buckets were rolled back too
    for a, b in zip(bad["params"], reference["params"]):
        assert torch.isfinite(a).all(), case
        assert torch.equal(a, b), (case, float((a - b).abs().max()))


def test_every_compressor_survives_one_nan_batch_on_one_rank(checks):
    for c in checks:
        assert {k for k in c if isinstance(k, str) and "," not in k} == set(compressors.REGISTRY)
        for name in compressors.REGISTRY:
            _assert_survived(name, c[name])
        _assert_survived("powersgd, synchronous", c["powersgd, synchronous"])


def test_a_compressor_failing_on_one_rank_is_a_nan_step_everywhere_not_a_hang(checks):
    for rank, c in enumerate(checks):
        for name in ("powersgd", "atomo", "topk"):
            _assert_survived(("fails", name), c["fails", name])
            reason = c["fails", name][0]["skipped_steps"][0][1]
            assert ("LinAlgError" in reason) == (rank == 0), reason  # the other rank learns it by agreement
