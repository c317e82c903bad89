"""``make gpu-check``: the CUDA checks, in at most 10 minutes on one GPU; a small CPU fallback without CUDA.

    python -m benchmarks.gpu_check               # CUDA if available, else the CPU fallback
    python -m benchmarks.gpu_check --cpu         # the CPU fallback (what ``make test`` runs)
    python -m benchmarks.gpu_check --out f.json  # also write the figures (atomically)

Three sections, each a table (and flat keys in the returned dict):

1. The simulator's step on the device: ResNet-18 (the PowerSGD paper's CIFAR-10 model, 11.2 M parameters) at
   W = 16 workers of B = 128 samples, against its floor, one plain SGD step on the concatenated W*B batch
   (the comparison ``benchmarks/overhead.py`` makes on the CPU). The simulated step is built from the
   simulator's own pieces on device-resident tensors: ``sim.engine.VmapEngine`` (per-worker gradients),
   the registered PowerSGD aggregate (rank 2, local error feedback, warm start) with a ``VirtualCollective``,
   and SGD with momentum; inputs are random CIFAR-shaped images (no data files on the machine needed).
2. Our PowerSGD kernel against torch's ``powerSGD_hook`` on the device: ResNet-18's gradient shapes in one
   bucket, in a process group (NCCL on CUDA), rank 2, error feedback, warm start; the faster torch batching setting.
3. ``compressors.ddp_comm_hook`` under DDP on NCCL, world size 1 and, where two GPUs exist, 2 (the fallback:
   2 gloo processes; section 2 runs in the first of these process groups): an MLP with several buckets,
   8 steps overlapped and synchronous (must agree bitwise: the synchronous future is CUDA-aware), a NaN batch
   on rank 0 at step 4 (must be skipped on every rank, the run going on finite), and the step time. Also:
   the hook's collectives run on a process group of its own (same backend); with ``find_unused_parameters``
   (DDP's own collectives on its group) overlapped and synchronous still agree bitwise; a state saved after
   4 steps and loaded (on the CPU) resumes on the device exactly; a sparse embedding's bucket gets the exact
   dense mean (against the mean of every rank's gradient, all-reduced by hand).

CUDA timings synchronise the device around every timed call. The fallback uses small sizes (W = 2, B = 1,
a few small shapes) and only checks that everything runs and agrees; its timings mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

import compressors
from compressors.comm import VirtualCollective
from sim.real.distributed import spawn
from sim.engine import VmapEngine
from sim.models import resnet18_cifar
from .timing import fmt_ms, interleaved, median, ratio_of_medians, table

FULL = {"workers": 16, "batch": 128, "repeats": 5, "shapes": "resnet18", "hook_width": 1024}
SMALL = {"workers": 2, "batch": 1, "repeats": 1, "shapes": "small", "hook_width": 64}


def synchronized(fn, device: torch.device):
    if device.type != "cuda":
        return fn

    def call():
        torch.cuda.synchronize(device)
        fn()
        torch.cuda.synchronize(device)

    return call


# -- 1. the simulator's step vs its floor ----------------------------------------------------------------------
def simulator_vs_floor(device: torch.device, workers: int, batch: int, repeats: int) -> dict[str, float]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = resnet18_cifar().to(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(workers, batch, 3, 32, 32, generator=generator).to(device)  # (W, B, 3, 32, 32)
    y = torch.randint(0, 10, (workers, batch), generator=generator).to(device)  # (W, B)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.expand(workers, *b.shape).clone() for n, b in model.named_buffers()}  # (W, ...) per worker
    engine = VmapEngine(model, F.cross_entropy)
    agg = compressors.make("powersgd", rank=2, error_feedback="local", warm_start=True)
    comm = VirtualCollective(workers)
    box = {"state": agg.init({n: tuple(p.shape) for n, p in params.items()}, workers=workers, seed=0,
                             dtype=torch.float32, device=device),
           "momentum": {n: torch.zeros_like(p) for n, p in params.items()}}

    def simulated():
        grads, _, _ = engine.gradients(params, buffers, x, y)  # {name: (W, *shape)}
        update, box["state"] = agg.aggregate(grads, box["state"], comm)
        for n, p in params.items():  # SGD, momentum 0.9, after aggregation (as the simulator's optimizer)
            box["momentum"][n].mul_(0.9).add_(update[n])
            p.sub_(0.1 * box["momentum"][n])

    floor_params = [p for p in model.parameters()]
    optimizer = torch.optim.SGD(floor_params, lr=0.1, momentum=0.9)
    flat_x, flat_y = x.reshape(-1, 3, 32, 32), y.reshape(-1)  # (W*B, ...)

    def floor():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(flat_x), flat_y).backward()
        optimizer.step()

    samples = interleaved({"sim": synchronized(simulated, device), "floor": synchronized(floor, device)},
                          repeats=repeats, warmup=1)
    finite = all(bool(torch.isfinite(p).all()) for p in params.values())
    return {"sim_s": median(samples["sim"]), "floor_s": median(samples["floor"]),
            "ratio": ratio_of_medians(samples, "sim", "floor"), "finite": finite}


# -- 2. our kernel vs torch's hook (inside a 1-process group) --------------------------------------------------
def _gradient_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    if kind == "small":
        return {"conv": (16, 8, 3, 3), "fc": (32, 64), "bias": (32,)}
    with torch.device("meta"):
        model = resnet18_cifar()
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def kernel_vs_torch_hook(device: torch.device, shapes_kind: str, repeats: int) -> dict[str, float]:
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd

    from compressors.comm import DistributedCollective
    from .torch_hook import Bucket

    generator = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(s, generator=generator).to(device) for n, s in _gradient_shapes(shapes_kind).items()}
    agg = compressors.make("powersgd", rank=2, error_feedback="local", min_compression_rate=2.0)
    batched = {n: g.unsqueeze(0) for n, g in grads.items()}  # (1, *shape)
    comm = DistributedCollective(1, keep_records=False)
    box = {"state": agg.init({n: tuple(g.shape) for n, g in grads.items()}, workers=1, seed=0,
                             dtype=torch.float32, device=device)}

    def ours():
        _, box["state"] = agg.aggregate(batched, box["state"], comm)

    fns, setup = {"ours": synchronized(ours, device)}, {}
    for batch_same_shape in (False, True):
        state = torch_powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=2,
                                             min_compression_rate=2, use_error_feedback=True, warm_start=True,
                                             batch_tensors_with_same_shape=batch_same_shape)
        bucket = Bucket(grads)
        for _ in range(2):  # past torch's warm-up (plain all-reduce)
            bucket.refill()
            torch_powersgd.powerSGD_hook(state, bucket).wait()
        name = f"torch (batch={batch_same_shape})"
        fns[name] = synchronized(lambda s=state, b=bucket: torch_powersgd.powerSGD_hook(s, b).wait(), device)
        setup[name] = bucket.refill
    samples = interleaved(fns, repeats=repeats, warmup=1, setup=setup)
    medians = {k: median(v) for k, v in samples.items()}
    faster = min(("torch (batch=False)", "torch (batch=True)"), key=medians.get)
    return {"ours_s": medians["ours"], "torch_s": medians[faster], "ratio": ratio_of_medians(samples, "ours", faster)}


# -- 3. the DDP hook on NCCL (gloo in the fallback) -------------------------------------------------------------
def _hook_model(width: int, device: torch.device) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                              nn.Linear(width, 10))
    return model.to(device)


class _WithUnused(nn.Module):
    def __init__(self, body: nn.Module, width: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            self.body, self.unused = body, nn.Linear(width, 10)

    def forward(self, x):
        return self.body(x)


def _hook_run(rank: int, device: torch.device, width: int, overlap: bool, nan_at: int | None, steps: int = 8,
              find_unused: bool = False, first: int = 0, saved: dict | None = None):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _hook_model(width, device)
    if find_unused:
        model = _WithUnused(model, width).to(device)
    if saved is not None:
        model.load_state_dict(saved["model"])
    layer_mb = width * width * 4 / 2**20
    cap = 1.5 * layer_mb if layer_mb >= 1 else 0.0005  # several buckets: 1.5 layers, or one per tensor when small
    ddp = DDP(model, bucket_cap_mb=cap, device_ids=[device] if device.type == "cuda" else None,
              find_unused_parameters=find_unused)
    state, hook = compressors.ddp_comm_hook("powersgd", rank=2, model=model, overlap=overlap)
    if saved is not None:
        state.load_state_dict(saved["hook"])
    ddp.register_comm_hook(state, hook)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
    generator = torch.Generator().manual_seed(rank)
    skipped, times = [], []
    for step in range(first + steps):
        if step < first:  # the same batches as a run from step 0
            torch.randn(32, width, generator=generator), torch.randint(0, 10, (32,), generator=generator)
            continue
        x = torch.randn(32, width, generator=generator)
        if step == nan_at and rank == 0:
            x[0, 0] = float("nan")
        x, y = x.to(device), torch.randint(0, 10, (32,), generator=generator).to(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), y).backward()
        if all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters()):  # skip-step guard
            optimizer.step()
        else:
            skipped.append(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    state.close()
    _hook_run.last = {"state": state, "model": model, "optimizer": optimizer}  # for the resume check
    return [p.detach().cpu() for p in model.parameters()], skipped, median(times[2:]), len(state.buckets)


def _hook_extras(rank: int, world: int, device: torch.device, width: int) -> dict[str, bool]:
    """The process group, DDP's own collectives, a resume on the device, a sparse bucket (see the docstring)."""
    import io

    import torch.distributed as dist

    out = {}
    unused = [_hook_run(rank, device, width, overlap, None, steps=4, find_unused=True)[0] for overlap in (True, False)]
    group = _hook_run.last["state"].comm.group
    out["own_group"] = (group is not None and group != dist.group.WORLD
                        and dist.get_backend(group) == dist.get_backend())
    out["unused_bitwise"] = all(torch.equal(a, b) for a, b in zip(*unused))
    straight = _hook_run(rank, device, width, True, None, steps=8)[0]
    _hook_run(rank, device, width, True, None, steps=4)
    last, buffer = _hook_run.last, io.BytesIO()
    torch.save({"model": last["model"].state_dict(), "optimizer": last["optimizer"].state_dict(),
                "hook": last["state"].state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True, map_location="cpu")  # the hook state comes back on the CPU
    resumed = _hook_run(rank, device, width, True, None, steps=4, first=4, saved=saved)[0]
    out["resume_exact"] = all(torch.equal(a, b) for a, b in zip(straight, resumed))
    out["sparse_exact"] = _sparse_bucket(rank, world, device)
    return out


def _sparse_bucket(rank: int, world: int, device: torch.device) -> bool:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import torch.distributed as dist

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        table = nn.Embedding(64, 16, sparse=True).to(device)
    reference = nn.Embedding(64, 16).to(device)
    reference.load_state_dict(table.state_dict())
    ddp = DDP(table, device_ids=[device] if device.type == "cuda" else None)
    state, hook = compressors.ddp_comm_hook("powersgd", rank=2, model=table)
    ddp.register_comm_hook(state, hook)
    ids = torch.randint(0, 64, (32,), generator=torch.Generator().manual_seed(rank)).to(device)
    ddp(ids).square().sum().backward()
    reference(ids).square().sum().backward()
    mean = reference.weight.grad.clone()
    dist.all_reduce(mean)
    mean /= world
    state.close()
    got = table.weight.grad
    return bool(got.is_sparse and torch.allclose(got.to_dense(), mean, rtol=1e-6, atol=1e-7))


def _hook_checks(rank: int, world: int, use_cuda: bool, width: int, shapes_kind: str, repeats: int,
                 with_kernel: bool) -> dict:
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    out = {}
    if with_kernel:
        out["kernel"] = kernel_vs_torch_hook(device, shapes_kind, repeats)
    overlapped, skipped, step_s, buckets = _hook_run(rank, device, width, True, None)
    synchronous, _, sync_s, _ = _hook_run(rank, device, width, False, None)
    nan_params, nan_skipped, _, _ = _hook_run(rank, device, width, True, nan_at=4)
    out["extras"] = _hook_extras(rank, world, device, width)
    out["hook"] = {"bitwise": all(torch.equal(a, b) for a, b in zip(overlapped, synchronous)),
                   "skipped": skipped, "nan_skipped": nan_skipped, "buckets": buckets,
                   "nan_finite": all(bool(torch.isfinite(p).all()) for p in nan_params),
                   "overlap_s": step_s, "sync_s": sync_s}
    return out


def main(argv=None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the small CPU fallback even where CUDA exists")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    use_cuda = torch.cuda.is_available() and not args.cpu
    sizes = FULL if use_cuda else SMALL
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    started = time.perf_counter()
    about = {"device": torch.cuda.get_device_name(0) if use_cuda else "cpu (fallback: small sizes)",
             "gpus": torch.cuda.device_count() if use_cuda else 0, "torch": torch.__version__}
    print("gpu-check:", about, flush=True)
    results: dict[str, object] = {"about": about}

    sim = simulator_vs_floor(device, sizes["workers"], sizes["batch"], sizes["repeats"])
    results[f"gpu_sim_overhead_ratio_resnet18_w{sizes['workers']}"] = round(sim["ratio"], 3)
    print(table(["simulated step (ResNet-18)", "W", "B", "simulated", "floor", "ratio"],
                [[str(device), sizes["workers"], sizes["batch"], fmt_ms(sim["sim_s"]), fmt_ms(sim["floor_s"]),
                  f"{sim['ratio']:.2f}"]]), flush=True)

    backend = "nccl" if use_cuda else "gloo"
    # CUDA: world size 1, and 2 where two GPUs exist; the fallback: 2 gloo processes only (one start-up less)
    worlds = ([1, 2] if torch.cuda.device_count() >= 2 else [1]) if use_cuda else [2]
    rows, hooks_ok = [], sim["finite"]
    for world in worlds:
        per_rank = spawn(_hook_checks, world, args=(use_cuda, sizes["hook_width"], sizes["shapes"], sizes["repeats"],
                                                    world == worlds[0]),
                         backend=backend, timeout=300, threads=1 if not use_cuda else None)
        hook = per_rank[0]["hook"]
        ok = all(r["hook"]["bitwise"] and r["hook"]["skipped"] == [] and r["hook"]["nan_skipped"] == [4]
                 and r["hook"]["nan_finite"] and r["hook"]["buckets"] >= 2 and all(r["extras"].values())
                 for r in per_rank)
        print(f"  hook on {backend}, world {world}: " + ", ".join(f"{k} {v}" for k, v in per_rank[0]["extras"].items()),
              flush=True)
        hooks_ok = hooks_ok and ok
        rows.append([backend, world, hook["buckets"], fmt_ms(hook["overlap_s"]), fmt_ms(hook["sync_s"]),
                     "yes" if ok else "NO"])
        results[f"gpu_hook_{backend}_w{world}_ok"] = ok
        results[f"gpu_hook_{backend}_w{world}_overlap_vs_sync"] = round(hook["overlap_s"] / hook["sync_s"], 3)
        if world == worlds[0]:
            kernel = per_rank[0]["kernel"]
            results[f"gpu_powersgd_vs_torch_hook_ratio_{sizes['shapes']}_r2"] = round(kernel["ratio"], 3)
            print(table(["kernel vs torch's powerSGD_hook", "ours", "torch (faster batching)", "ratio"],
                        [[f"{sizes['shapes']} shapes on {device}", fmt_ms(kernel["ours_s"]),
                          fmt_ms(kernel["torch_s"]), f"{kernel['ratio']:.2f}"]]), flush=True)
    print(table(["DDP hook backend", "world", "buckets", "step overlapped", "step synchronous",
                 "bitwise equal + NaN step skipped everywhere"], rows), flush=True)
    results["gpu_check_ok"] = bool(hooks_ok)
    results["gpu_check_seconds"] = round(time.perf_counter() - started, 1)
    print(f"gpu-check: {'ok' if hooks_ok else 'FAILED'} in {results['gpu_check_seconds']} s", flush=True)
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
            json.dump(results, f, indent=1, sort_keys=True)
        os.replace(f.name, args.out)
    return results


if __name__ == "__main__":
    raise SystemExit(0 if main()["gpu_check_ok"] else 1)
