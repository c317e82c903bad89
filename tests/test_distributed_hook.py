"""compressors.ddp_comm_hook under real DistributedDataParallel on gloo (2 processes).

One spawn runs every scenario (process start-up dominates the cost); the tests assert on what it returns.
The reference for "the hook computes what the simulator computes" replays each step's bucket layout with
VirtualCollective(2) on both ranks' gradients: with two workers sums commute, so it must agree to rounding.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import compressors
from compressors.ddp import state_io as hook_state_io
from compressors.comm import VirtualCollective
from sim.real.distributed import spawn

pytestmark = pytest.mark.distributed

BATCH = 16
TINY_BUCKETS_MB = 0.0005  # 500 bytes: every parameter of the MLP below gets its own bucket


def _model(dtype=torch.float32, seed=0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.to(dtype)


def _batch(worker: int, step: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * step + worker)
    teacher = torch.randn(20, 5, generator=torch.Generator().manual_seed(7))
    x = torch.randn(BATCH, 20, generator=g)
    return x.to(dtype), (x @ teacher).argmax(1)


def _loss(model, worker, step, dtype):
    x, y = _batch(worker, step, dtype)
    return F.cross_entropy(model(x).float(), y)


def _train(model, rank, steps, dtype=torch.float32, hook_pair=None, bucket_cap_mb=25.0, first=0, momentum=0.0,
           optimizer_state=None, on_step=None):
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb)
    if hook_pair is not None:
        ddp.register_comm_hook(*hook_pair)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=momentum, foreach=False)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    losses = []
    for step in range(first, first + steps):
        opt.zero_grad()
        loss = _loss(ddp, rank, step, dtype)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step)
    return losses, opt


def _rel(a, b) -> float:
    return max(float((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-30))
               for x, y in zip(a, b))


def _against_reference(name: str, rank: int, dtype=torch.float32, steps: int = 4) -> float:
    """DDP + hook (tiny buckets) vs each step's bucket layout replayed with VirtualCollective(2)."""
    agg = compressors.make(name)
    model = _model(dtype)
    reference = copy.deepcopy(model)
    index_of = {id(p): i for i, p in enumerate(model.parameters())}
    layouts: list[tuple[int, tuple[int, ...]]] = []
    state, hook = compressors.ddp_comm_hook(agg)

    def recording_hook(s, bucket):
        layouts.append((bucket.index(), tuple(index_of[id(p)] for p in bucket.parameters())))
        return hook(s, bucket)

    ref_params = list(reference.parameters())
    ref_opt = torch.optim.SGD(ref_params, lr=0.1, foreach=False)
    ref_states: dict[int, tuple] = {}

    def replay(step):
        per_worker = []
        for worker in range(2):
            reference.zero_grad()
            _loss(reference, worker, step, dtype).backward()
            per_worker.append([p.grad.clone() for p in ref_params])
        update = [None] * len(ref_params)
        for index, members in layouts:
            grads = {str(i): torch.stack([per_worker[w][j] for w in range(2)]) for i, j in enumerate(members)}
            if index not in ref_states or ref_states[index][0] != members:  # the hook's own rule
                ref_states[index] = (members, agg.init({n: tuple(g.shape[1:]) for n, g in grads.items()},
                                                       workers=2, seed=0, dtype=dtype))
            out, new = agg.aggregate(grads, ref_states[index][1], VirtualCollective(2))
            ref_states[index] = (members, new)
            for i, j in enumerate(members):
                update[j] = out[str(i)]
        for p, u in zip(ref_params, update):
            p.grad = u.to(p.dtype)
        ref_opt.step()
        layouts.clear()

    _train(model, rank, steps, dtype, (state, recording_hook), TINY_BUCKETS_MB, on_step=replay)
    return _rel(list(model.parameters()), ref_params)


def _count_all_reduce():
    """Wrap dist.all_reduce (torch's hooks call it through the module) to count elements sent."""
    counter = {"numel": 0}
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        counter["numel"] += tensor.numel()
        return original(tensor, *args, **kwargs)

    return counter, original, counting


def _powersgd_vs_torch(rank: int, steps: int = 60) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd

    out = {}
    counter, original, counting = _count_all_reduce()
    sent: list[int] = []

    def per_step(_):
        sent.append(counter["numel"])
        counter["numel"] = 0

    torch_state = torch_psgd.PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=2,
                                           min_compression_rate=2, use_error_feedback=True, warm_start=True,
                                           random_seed=0)
    dist.all_reduce = counting
    try:
        losses, _ = _train(_model(), rank, steps, hook_pair=(torch_state, torch_psgd.powerSGD_hook),
                           bucket_cap_mb=100.0, on_step=per_step)
    finally:
        dist.all_reduce = original
    out["torch"] = (sent, losses)
    for seed in (0, 1):
        agg = compressors.make("powersgd", rank=2, variant="paper", error_feedback="averaged", warm_start=True,
                               orthogonalization="gram_schmidt", min_compression_rate=2,
                               start_compressing_after_num_steps=2)
        model = _model()
        state, hook = compressors.ddp_comm_hook(agg, seed=seed, keep_records=True, model=model)
        ours: list[int] = []
        losses, _ = _train(model, rank, steps, hook_pair=(state, hook), bucket_cap_mb=100.0,
                           on_step=lambda _: ours.append(sum(r.numel for r in state.comm.ledger.step_records)))
        out[f"ours{seed}"] = (ours, losses, len(state.buckets))
    return out


def _many_buckets(rank: int, steps: int = 100) -> dict:
    model = _model()
    state, hook = compressors.ddp_comm_hook(compressors.make("powersgd", rank=2), model=model)
    losses, _ = _train(model, rank, steps, hook_pair=(state, hook), bucket_cap_mb=TINY_BUCKETS_MB, momentum=0.9)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    return {"losses": losses, "buckets": len(state.buckets), "spread": float((gathered[0] - gathered[1]).abs().max())}


def _resume(rank: int) -> dict:
    """8 steps straight vs 4 steps, checkpoint (weights_only load), fresh DDP + hook, 4 more steps.

    The fresh DDP's first iteration uses its initial buckets, not the rebuilt ones that were saved: the
    hook's name-keyed states (model=) are found all the same."""
    name_options = {"rank": 2, "error_feedback": "local", "warm_start": True}
    model = _model()
    state, hook = compressors.ddp_comm_hook("powersgd", model=model, **name_options)
    _train(model, rank, 8, hook_pair=(state, hook), bucket_cap_mb=TINY_BUCKETS_MB, momentum=0.9)
    straight = [p.detach().clone() for p in model.parameters()]

    model = _model()
    state, hook = compressors.ddp_comm_hook("powersgd", model=model, **name_options)
    _, opt = _train(model, rank, 4, hook_pair=(state, hook), bucket_cap_mb=TINY_BUCKETS_MB, momentum=0.9)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain containers only

    model = _model(seed=5)  # different weights: everything must come from the checkpoint
    model.load_state_dict(saved["model"])
    state, hook = compressors.ddp_comm_hook("powersgd", model=model, **name_options)
    state.load_state_dict(saved["hook"])
    _train(model, rank, 4, hook_pair=(state, hook), bucket_cap_mb=TINY_BUCKETS_MB, first=4, momentum=0.9,
           optimizer_state=saved["opt"])
    resumed = [p.detach() for p in model.parameters()]

    model = _model()  # without loading the hook state the run must differ (the test can fail)
    model.load_state_dict(saved["model"])
    state, hook = compressors.ddp_comm_hook("powersgd", model=model, **name_options)
    _train(model, rank, 4, hook_pair=(state, hook), bucket_cap_mb=TINY_BUCKETS_MB, first=4, momentum=0.9,
           optimizer_state=saved["opt"])
    fresh = [p.detach() for p in model.parameters()]
    return {"resumed_equal": all(torch.equal(a, b) for a, b in zip(resumed, straight)),
            "fresh_equal": all(torch.equal(a, b) for a, b in zip(fresh, straight))}


def _identity_vs_no_hook(rank: int) -> bool:
    plain, hooked = _model(), _model()
    _train(plain, rank, 5, bucket_cap_mb=TINY_BUCKETS_MB, momentum=0.9)
    _train(hooked, rank, 5, hook_pair=compressors.ddp_comm_hook("identity"), bucket_cap_mb=TINY_BUCKETS_MB,
           momentum=0.9)
    return all(torch.equal(a, b) for a, b in zip(plain.parameters(), hooked.parameters()))


def _hook_checks(rank: int, world: int) -> dict:
    out = {"identity_equal": _identity_vs_no_hook(rank)}
    out["reference"] = {name: _against_reference(name, rank) for name in sorted(compressors.REGISTRY)}
    for dtype in (torch.float16, torch.bfloat16):
        out["reference", str(dtype)] = _against_reference("powersgd", rank, dtype)
    out["vs_torch"] = _powersgd_vs_torch(rank)
    out["many_buckets"] = _many_buckets(rank)
    out["resume"] = _resume(rank)
    return out


@pytest.fixture(scope="module")
def checks():
    return spawn(_hook_checks, 2, timeout=400)


def test_identity_hook_equals_ddp_without_a_hook(checks):
    # DDP divides by 2 then sums, we sum then divide: halving is exact, so bitwise equal.
    assert all(c["identity_equal"] for c in checks)


def test_every_compressor_through_the_hook_matches_the_simulator(checks):
    for c in checks:
        assert set(c["reference"]) == set(compressors.REGISTRY)
        for name, rel in c["reference"].items():
            assert rel <= 1e-6, (name, rel)  # W = 2: sums commute, so this is rounding-free up to 1e-6


def test_half_precision_gradients(checks):
    for c in checks:
        assert c["reference", "torch.float16"] <= 1e-6
        assert c["reference", "torch.bfloat16"] <= 1e-6


def test_powersgd_hook_sends_what_torchs_hook_sends_and_trains_as_well(checks):
    c = checks[0]
    torch_sent, torch_losses = c["vs_torch"]["torch"]
    ours_sent, ours_losses, buckets = c["vs_torch"]["ours0"]
    _, seed1_losses, _ = c["vs_torch"]["ours1"]
    assert buckets == 1
    assert ours_sent == torch_sent  # dense for 2 steps, then uncompressed biases + r (n + m) per matrix
    assert ours_sent[0] == sum(p.numel() for p in _model().parameters()) and ours_sent[-1] < ours_sent[0] / 3
    final = lambda losses: sum(losses[-10:]) / 10  # noqa: E731
    # Same algorithm (paper variant, averaged error feedback, warm start, Gram-Schmidt); the runs differ only
    # in the random initial Q and the error kept for uncompressed biases. That is the same kind of
    # difference as two of our own seeds, so the gap must be of the order of the seed-to-seed gap.
    seed_gap = abs(final(ours_losses) - final(seed1_losses))
    assert abs(final(ours_losses) - final(torch_losses)) <= max(3 * seed_gap, 0.05 * final(torch_losses))
    assert final(ours_losses) < 0.6 * ours_losses[0]


def test_many_small_buckets_train_100_steps_on_gloo(checks):
    for c in checks:
        m = c["many_buckets"]
        assert m["buckets"] >= 3  # several buckets, each with its own collectives, in the same order on both ranks
        assert len(m["losses"]) == 100 and all(torch.isfinite(torch.tensor(m["losses"])))
        assert sum(m["losses"][-10:]) < 0.5 * sum(m["losses"][:10])
        assert m["spread"] == 0.0  # both ranks hold identical parameters


def test_hook_state_save_and_load_resumes_exactly(checks):
    for c in checks:
        assert c["resume"]["resumed_equal"]
        assert not c["resume"]["fresh_equal"]


def test_hook_options_are_validated():
    with pytest.raises(ValueError, match="rank"):
        compressors.ddp_comm_hook("powersgd", rank=0)
    with pytest.raises(ValueError, match="options"):
        compressors.ddp_comm_hook(compressors.make("identity"), rank=2)
    state, _ = compressors.ddp_comm_hook("identity")
    saved = state.state_dict()
    assert {k: saved[k] for k in ("format_version", "seed", "calls", "steps", "buckets")} == {
        "format_version": hook_state_io.FORMAT_VERSION, "seed": 0, "calls": 0, "steps": 0, "buckets": []}
    assert len(saved["checksum"]) == 64  # a SHA-256 in hex


def test_hook_state_keeps_its_optimizer_step_count():
    """The warm-up counts optimizer steps: a resumed hook continues the count instead of starting over."""
    state, _ = compressors.ddp_comm_hook("powersgd", rank=1, start_compressing_after_num_steps=10)
    state.steps = 7
    saved = state.state_dict()
    fresh, _ = compressors.ddp_comm_hook("powersgd", rank=1, start_compressing_after_num_steps=10)
    fresh.load_state_dict(saved)
    assert fresh.steps == 7
    saved["steps"] = -1
    with pytest.raises(ValueError, match="checksum|steps"):
        fresh.load_state_dict(saved)
