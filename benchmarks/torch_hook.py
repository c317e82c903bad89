"""``powersgd_vs_torch_hook_ratio_resnet18_r{1,2,4}``: our PowerSGD aggregate over torch's ``powerSGD_hook``
compressing the same gradients: the paper's CIFAR-10 ResNet-18 parameter shapes (62 tensors, 11.2 M
parameters), one process, world size 1 on gloo, one bucket holding every gradient.

Both sides run the paper's algorithm with the same settings: rank r, one power iteration, warm start,
error feedback, min_compression_rate 2 (vectors and small matrices all-reduced uncompressed). torch's hook
gets its best batching setting (``batch_tensors_with_same_shape`` False and True, the faster median kept).
Our side runs with the virtual collective (``sim``'s setting) and with a ``DistributedCollective`` on the
same gloo group (real all-reduce calls, as the hook makes); the headline ratio keys on the slower of ours.

torch's hook consumes its bucket (error feedback is added into it, the result written over it), so the
bucket is refilled with the same gradients before every call, untimed.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd

import compressors
import sim
from sim.real.distributed import free_port
from sim.models import resnet18_cifar
from .timing import fmt_ms, interleaved, median, table

RANKS = (1, 2, 4)


def resnet18_shapes() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = resnet18_cifar()
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


class Bucket:
    """What ``powerSGD_hook`` reads of a ``dist.GradBucket``: the flat buffer and per-parameter views of it."""

    def __init__(self, grads: dict[str, torch.Tensor]):
        self.source = torch.cat([g.reshape(-1) for g in grads.values()])  # the gradients, kept pristine
        self.flat = self.source.clone()
        self.views, offset = [], 0
        for g in grads.values():
            self.views.append(self.flat[offset:offset + g.numel()].view(g.shape))
            offset += g.numel()

    def refill(self):
        self.flat.copy_(self.source)

    def buffer(self):
        return self.flat

    def gradients(self):
        return self.views

    def index(self):
        return 0

    def is_last(self):
        return True

    def set_buffer(self, tensor):
        self.flat.copy_(tensor)


def _torch_side(grads, rank: int, batched: bool):
    state = torch_powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                                         start_powerSGD_iter=2, min_compression_rate=2, use_error_feedback=True,
                                         warm_start=True, batch_tensors_with_same_shape=batched)
    bucket = Bucket(grads)

    def call():
        torch_powersgd.powerSGD_hook(state, bucket).wait()

    for _ in range(2):  # the hook's first start_powerSGD_iter calls are plain all-reduces
        bucket.refill()
        call()
    return call, bucket.refill


def _our_side(grads, rank: int, comm):
    agg = compressors.make("powersgd", rank=rank, error_feedback="local", min_compression_rate=2.0)
    batched = {n: g.unsqueeze(0) for n, g in grads.items()}  # (1, *shape): one worker in this process
    box = {"state": agg.init({n: tuple(g.shape) for n, g in grads.items()}, workers=1, seed=0)}

    def call():
        _, box["state"] = agg.aggregate(batched, box["state"], comm)

    return call


def measure(rank: int, grads, repeats: int) -> dict[str, float]:
    fns, setup = {}, {}
    fns["ours (virtual)"] = _our_side(grads, rank, sim.VirtualCollective(1))
    fns["ours (gloo)"] = _our_side(grads, rank, sim.DistributedCollective(1, keep_records=False))
    for batched in (False, True):
        fns[f"torch (batch={batched})"], setup[f"torch (batch={batched})"] = _torch_side(grads, rank, batched)
    samples = interleaved(fns, repeats=repeats, warmup=2, setup=setup)
    medians = {k: median(v) for k, v in samples.items()}
    # Per round (adjacent measurements): the slower of ours over the faster torch setting; then the median.
    rounds = [max(a, b) / min(c, d) for a, b, c, d in zip(samples["ours (virtual)"], samples["ours (gloo)"],
                                                         samples["torch (batch=False)"], samples["torch (batch=True)"])]
    return {**medians, "ratio": median(rounds)}


def run(quick: bool = False):
    shapes = resnet18_shapes()
    generator = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(s, generator=generator) for n, s in shapes.items()}
    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
    try:
        metrics, rows = {}, []
        for rank in RANKS:
            r = measure(rank, grads, 3 if quick else 7)
            metrics[f"powersgd_vs_torch_hook_ratio_resnet18_r{rank}"] = round(r["ratio"], 3)
            rows.append([rank, fmt_ms(r["ours (virtual)"]), fmt_ms(r["ours (gloo)"]),
                         fmt_ms(r["torch (batch=False)"]), fmt_ms(r["torch (batch=True)"]), f"{r['ratio']:.2f}"])
            print(f"  vs torch hook r={rank}: ours {fmt_ms(r['ours (virtual)'])} / {fmt_ms(r['ours (gloo)'])}, "
                  f"torch {fmt_ms(r['torch (batch=False)'])} / {fmt_ms(r['torch (batch=True)'])}, "
                  f"ratio {r['ratio']:.2f}", flush=True)
    finally:
        if started_here:
            dist.destroy_process_group()
    text = table(["rank", "ours, virtual comm", "ours, gloo comm", "torch hook, unbatched", "torch hook, batched",
                  "ratio (slower ours / faster torch, median of rounds)"], rows)
    return metrics, {"torch_hook": text}
