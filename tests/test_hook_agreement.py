"""The DDP hook's own process group, its agreement riding on the compressor's collectives, failures anywhere
in a bucket skipping the whole step on every rank, the ranks' setup checked equal, sparse gradients, and a
loaded state placed on the bucket's device (2 gloo processes, one spawn for every scenario)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import compressors
from compressors.base import Aggregator
from compressors.ddp.setup import describe
from sim.real.distributed import spawn
from tests.test_distributed_hook import TINY_BUCKETS_MB, _batch, _model

pytestmark = pytest.mark.distributed

STEPS = 4
# DDP's first iteration puts everything in one bucket; from its rebuild (step 1) on, one bucket per tensor, each
# getting a fresh state at step 1: init call 1 is step 0's, call 3 the second bucket's of step 1.
BAD = 1


class FailingInit(Aggregator):
    """``inner``, except that its ``init`` raises at the ``nth`` call (counted from 1) on the ranks in ``ranks``
    (read from torch.distributed, not kept: the configuration must be the same on every rank)."""

    def __init__(self, inner: Aggregator, nth: int, ranks: tuple[int, ...]):
        self.inner, self.nth, self.ranks, self.name = inner, nth, ranks, inner.name
        self.inits = 0

    def init(self, shapes, workers, seed=0, dtype=torch.float32, device="cpu"):
        self.inits += 1
        if self.inits == self.nth and dist.get_rank() in self.ranks:
            raise MemoryError("injected: no memory for the compressor's state")
        return self.inner.init(shapes, workers, seed, dtype=dtype, device=device)

    def reduce(self, grads, state, comm, want_local=False):
        return self.inner.reduce(grads, state, comm, want_local)

    def bits_per_step(self, shapes):
        return self.inner.bits_per_step(shapes)


def _train(rank, aggregator, steps, seed=0, overlap=True, model=None, find_unused=False, count=False):
    model = model if model is not None else _model()
    ddp = DDP(model, bucket_cap_mb=TINY_BUCKETS_MB, find_unused_parameters=find_unused)
    state, hook = compressors.ddp_comm_hook(aggregator, model=model, overlap=overlap, seed=seed, keep_records=True)
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, foreach=False)
    out = {"skipped": [], "issued": [], "recorded": [], "error": None}
    issued = {"n": 0}
    original = dist.all_reduce, dist.all_gather_single

    def counted(fn):
        def call(*args, **kwargs):
            if kwargs.get("group") is state.comm.group:
                issued["n"] += 1
            return fn(*args, **kwargs)
        return call

    if count:
        dist.all_reduce, dist.all_gather_single = counted(original[0]), counted(original[1])
    try:
        for step in steps:
            opt.zero_grad()
            x, y = _batch(rank, step)
            issued["n"] = 0
            F.cross_entropy(ddp(x), y).backward()
            out["issued"].append(issued["n"])
            out["recorded"].append(len(state.comm.ledger.step_records))
            if all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters()):
                opt.step()
            else:
                out["skipped"].append(step)
    except Exception as error:  # raised by DDP where it waits for a bucket's future
        out["error"] = f"{type(error).__name__}: {error}"
    finally:
        dist.all_reduce, dist.all_gather_single = original
        state.close()
    out.update(params=[p.detach().clone() for p in model.parameters()], steps=state.steps,
               skipped_steps=state.skipped_steps, own_group=state.comm.group is not None
               and state.comm.group != dist.group.WORLD, buckets=len(state.buckets))
    return out


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.unused = _model(), nn.Linear(5, 5)

    def forward(self, x):
        return self.body(x)


class SparseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding, self.head = nn.Embedding(50, 8, sparse=True), nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.embedding(ids))


def _sparse_runs(rank: int) -> dict:
    out = {}
    for side in ("torch", "identity", "powersgd"):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = SparseNet()
        ddp = DDP(model, bucket_cap_mb=TINY_BUCKETS_MB)
        state = None
        if side == "torch":
            ddp.register_comm_hook(None, default_hooks.allreduce_hook)
        else:
            state, hook = compressors.ddp_comm_hook(side, model=model, keep_records=True)
            ddp.register_comm_hook(state, hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        for step in range(3 if side != "powersgd" else 1):
            ids = torch.randint(0, 50, (16,), generator=torch.Generator().manual_seed(10 * step + rank))
            opt.zero_grad()
            F.cross_entropy(ddp(ids), ids % 3).backward()
            opt.step()
            if side == "torch" and step == 0:
                out["torch_first"] = model.embedding.weight.detach().clone()
        out[side] = [p.detach().clone() for p in model.parameters()]
        if state is not None:
            out["tags"] = sorted({r.tag for r in state.comm.ledger.records})
            state.close()
    return out


def _checks(rank: int, world: int) -> dict:
    every, without = list(range(STEPS)), [s for s in range(STEPS) if s != BAD]
    out = {"counted": _train(rank, compressors.make("powersgd", rank=2), every, count=True)}
    for ranks in ((0,), (0, 1)):  # init fails at the 2nd bucket of step 1, on rank 0 or on both
        out["init", ranks] = (_train(rank, FailingInit(compressors.make("powersgd"), 3, ranks), every),
                              _train(rank, compressors.make("powersgd"), without))
    out["seeds"] = _train(rank, compressors.make("powersgd"), every, seed=rank)
    out["config"] = _train(rank, compressors.make("powersgd", rank=1 + rank), every)
    unused = {}
    for overlap in (True, False):
        torch.manual_seed(0)
        unused[overlap] = _train(rank, compressors.make("powersgd"), every, overlap=overlap, model=WithUnused(),
                                 find_unused=True)
    out["unused"] = unused
    out["sparse"] = _sparse_runs(rank)
    return out


@pytest.fixture(scope="module")
def checks():
    return spawn(_checks, 2, timeout=300)


def test_the_hook_runs_on_a_process_group_of_its_own(checks):
    for c in checks:
        assert c["counted"]["own_group"] and c["counted"]["error"] is None


def test_the_agreement_rides_on_the_compressors_collectives(checks):
    # From step 2 on no state is created (steps 0 and 1, DDP's rebuild, create them): the collectives issued on
    # the hook's group are exactly the compressor's (the ledger's records), none of the hook's own.
    for c in checks:
        counted = c["counted"]
        assert counted["skipped"] == [] and counted["buckets"] >= 3
        assert counted["issued"][2:] == counted["recorded"][2:], (counted["issued"], counted["recorded"])
        assert counted["recorded"][2] >= 6  # several buckets, each sending
        assert all(i > r for i, r in zip(counted["issued"][:2], counted["recorded"][:2]))  # creating: agree first


@pytest.mark.parametrize("ranks", [(0,), (0, 1)])
def test_a_state_creation_failing_skips_the_whole_step_on_every_rank(checks, ranks):
    for rank, c in enumerate(checks):
        bad, reference = c["init", ranks]
        assert bad["error"] is None and reference["error"] is None, (bad["error"], reference["error"])
        assert bad["skipped"] == [BAD]  # no collective mismatch, no error: the step skipped on every rank
        assert [s for s, _ in bad["skipped_steps"]] == [BAD] and bad["steps"] == reference["steps"] == STEPS - 1
        reason = bad["skipped_steps"][0][1]
        assert ("MemoryError" in reason) == (rank in ranks), reason
        for a, b in zip(bad["params"], reference["params"]):  # nothing of the step was kept, no later bucket
            assert torch.equal(a, b), float((a - b).abs().max())


def test_different_seeds_or_configurations_are_an_error_on_every_rank(checks):
    for c in checks:
        assert c["seeds"]["error"] is not None and "seed" in c["seeds"]["error"], c["seeds"]["error"]
        assert "seeds by rank: [0, 1]" in c["seeds"]["error"]
        assert c["config"]["error"] is not None and "compressor configuration" in c["config"]["error"]
        assert "seed" not in c["config"]["error"].split(";")[0]


def test_ddp_collectives_of_its_own_do_not_meet_the_hooks(checks):
    # find_unused_parameters=True: DDP all-reduces its unused-parameter map on its group while the thread
    # works on the hook's group. Overlapped equals synchronous bitwise, the same on both ranks.
    for c in checks:
        over, sync = c["unused"][True], c["unused"][False]
        assert over["error"] is None and sync["error"] is None, (over["error"], sync["error"])
        assert all(torch.equal(a, b) for a, b in zip(over["params"], sync["params"]))
    assert all(torch.equal(a, b) for a, b in zip(checks[0]["unused"][True]["params"],
                                                 checks[1]["unused"][True]["params"]))


def test_sparse_gradients_get_an_exact_dense_all_reduce_like_torchs_hook(checks):
    for c in checks:
        sparse = c["sparse"]
        assert "sparse" in sparse["tags"]
        for ours, theirs in zip(sparse["identity"], sparse["torch"]):  # 3 steps, every parameter
            assert torch.equal(ours, theirs), float((ours - theirs).abs().max())
        # PowerSGD compresses the head, not the table: after one step the table is the dense mean's
        table, first_torch_step = sparse["powersgd"][0], sparse["torch_first"]
        assert torch.equal(table, first_torch_step)


# -- without processes -------------------------------------------------------------------------------------------
def test_a_loaded_state_moves_to_the_buckets_device_on_first_use():
    model = nn.Linear(64, 32)  # compressed at rank 2: factors and memory on the device
    params = list(model.parameters())
    grads = {n: torch.randn(1, *p.shape) for n, p in sorted(model.named_parameters())}  # in the key's order
    saved_state, _ = compressors.ddp_comm_hook("powersgd", rank=2, model=model)
    key = tuple(sorted(grads))
    saved_state.new_entry(key, params, grads)
    saved_state.buckets.update(saved_state.created)
    saved = saved_state.state_dict()
    for device in ("cpu", "meta"):  # meta stands for the accelerator
        loaded, _ = compressors.ddp_comm_hook("powersgd", rank=2, model=model)
        loaded.load_state_dict(saved)
        on_device = {n: g.to(device) for n, g in grads.items()}
        assert loaded.needs_state(key, params, on_device)  # placed on first use
        entry = loaded.new_entry(key, params, on_device)
        fresh = loaded.aggregator.init({n: tuple(g.shape[1:]) for n, g in grads.items()}, workers=1, seed=0,
                                       device=device)
        placed, template = _leaves(entry["state"]), _leaves(fresh)
        assert len(placed) == len(template) > 0
        assert [t.device for t in placed] == [t.device for t in template]
        assert any(t.device.type == device for t in placed)
        if device == "cpu":  # the loaded values, not fresh ones
            assert all(torch.equal(a, b) for a, b in zip(placed, _leaves(saved_state.buckets[key]["state"])))


def _leaves(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _leaves(v)]
    if hasattr(tree, "__dataclass_fields__"):
        return [t for f in tree.__dataclass_fields__ for t in _leaves(getattr(tree, f))]
    return []


def test_the_configuration_description_tells_options_apart_and_nothing_else():
    for name in sorted(compressors.REGISTRY):  # two builds with the same options describe alike
        assert describe(compressors.make(name)) == describe(compressors.make(name)), name
    base = describe(compressors.make("powersgd", rank=2))
    for options in ({"rank": 1}, {"min_compression_rate": 3}, {"start_compressing_after_num_steps": 3},
                    {"error_feedback": "averaged"}, {"warm_start": False}):
        assert describe(compressors.make("powersgd", **{"rank": 2, **options})) != base, options
    assert describe(torch.device("cuda", 0)) == describe(torch.device("cuda", 1))  # each rank has its own GPU
