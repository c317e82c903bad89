"""``ddp_hook_vs_torch_hook_step_ratio``: one DDP training step (forward, backward with the hook, SGD step)
with our PowerSGD hook over the same step with torch's ``powerSGD_hook``; 2 gloo processes on this machine.

The model is an MLP with 3.1 M parameters (12.6 MB of float32 gradients: 512 -> 1024 -> 1024 -> 1024 -> 512
-> 10), batch 64 per process. Both hooks run the paper's algorithm with the same settings: rank 2, one power
iteration, warm start, error feedback against the averaged approximation (what torch's hook keeps),
Gram-Schmidt (torch's choice for rank <= 2), min_compression_rate 2, compressing from the third step on.

Sides, all in the same two processes, timed in interleaved blocks (``timing.interleaved``; rank 0's clock):

- torch's hook with ONE bucket: on gloo it crashes with several (its Q all-reduce is issued from a future
  callback, in a different order per rank), so one bucket is where it works;
- ours, overlapped (the default), with one bucket and with 4 MB buckets (4 buckets);
- ours, synchronous (``overlap=False``), 4 MB buckets;
- plain all-reduce DDP (no hook), 4 MB buckets.

Keys: ``ddp_hook_vs_torch_hook_step_ratio`` (both with one bucket, where torch's hook works: the like-for-like
comparison); ``ddp_hook_many_buckets_vs_torch_hook_step_ratio`` (ours overlapped with 4 MB buckets, the setting
it is built for, over torch's with one bucket); ``ddp_hook_overlap_vs_sync_step_ratio``
(ours overlapped over ours synchronous, 4 MB buckets); ``ddp_hook_vs_allreduce_step_ratio`` (ours overlapped
over plain DDP, 4 MB buckets). Each ratio is the median over rounds of adjacent measurements.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd
from torch.nn.parallel import DistributedDataParallel as DDP

import compressors
from sim.real.distributed import spawn
from .timing import fmt_ms, interleaved, median, ratio_of_medians, table

WIDTHS = (512, 1024, 1024, 1024, 512, 10)
BATCH = 64
RANK = 2
START = 2  # compress from the third step on (both sides); every timed step compresses
MANY_MB = 4.0
ONE_MB = 100.0  # more than the model: one bucket
SIDES = {  # name -> (hook, bucket_cap_mb, overlap)
    "torch hook, 1 bucket": ("torch", ONE_MB, None),
    "ours overlapped, 1 bucket": ("ours", ONE_MB, True),
    "ours overlapped, 4 MB buckets": ("ours", MANY_MB, True),
    "ours synchronous, 4 MB buckets": ("ours", MANY_MB, False),
    "plain all-reduce, 4 MB buckets": (None, MANY_MB, None),
}


def _model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(WIDTHS[:-1], WIDTHS[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        return nn.Sequential(*layers[:-1])


def _ours():
    agg = compressors.make("powersgd", rank=RANK, variant="paper", error_feedback="averaged", warm_start=True,
                           orthogonalization="gram_schmidt", min_compression_rate=2,
                           start_compressing_after_num_steps=START)
    return agg


class Side:
    """One DDP model with its hook and optimizer; ``step()`` is one training step."""

    def __init__(self, rank: int, hook: str | None, bucket_cap_mb: float, overlap: bool | None):
        self.model = _model()
        self.ddp = DDP(self.model, bucket_cap_mb=bucket_cap_mb)
        self.state = None
        if hook == "torch":
            self.state = torch_powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=RANK,
                                                      start_powerSGD_iter=START, min_compression_rate=2,
                                                      use_error_feedback=True, warm_start=True, random_seed=0)
            self.ddp.register_comm_hook(self.state, torch_powersgd.powerSGD_hook)
        elif hook == "ours":
            self.state, ours_hook = compressors.ddp_comm_hook(_ours(), model=self.model, overlap=overlap)
            self.ddp.register_comm_hook(self.state, ours_hook)
        self.optimizer = torch.optim.SGD(self.ddp.parameters(), lr=0.01, momentum=0.9)
        generator = torch.Generator().manual_seed(rank)
        self.x = torch.randn(BATCH, WIDTHS[0], generator=generator)
        self.y = torch.randint(0, WIDTHS[-1], (BATCH,), generator=generator)

    def step(self):
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.ddp(self.x), self.y).backward()
        self.optimizer.step()

    def close(self):
        if hasattr(self.state, "close"):
            self.state.close()


def _measure(rank: int, world: int, repeats: int, inner: int) -> dict[str, list[float]]:
    sides = {name: Side(rank, *spec) for name, spec in SIDES.items()}
    for side in sides.values():  # past torch's and our warm-up, and DDP's bucket rebuild
        for _ in range(START + 1):
            side.step()
    buckets = {name: len(side.state.buckets) for name, side in sides.items()
               if isinstance(side.state, compressors.HookState)}
    samples = interleaved({name: side.step for name, side in sides.items()}, repeats=repeats, warmup=1,
                          inner=inner)
    for side in sides.values():
        side.close()
    return {"samples": samples, "buckets": buckets}


def run(quick: bool = False):
    results = spawn(_measure, 2, args=(3 if quick else 7, 2 if quick else 3), timeout=600, threads=1)
    samples = results[0]["samples"]  # rank 0's clock (the collectives keep both ranks in step)
    ours_many, ours_one = "ours overlapped, 4 MB buckets", "ours overlapped, 1 bucket"
    metrics = {
        "ddp_hook_vs_torch_hook_step_ratio": ratio_of_medians(samples, ours_one, "torch hook, 1 bucket"),
        "ddp_hook_many_buckets_vs_torch_hook_step_ratio": ratio_of_medians(samples, ours_many, "torch hook, 1 bucket"),
        "ddp_hook_overlap_vs_sync_step_ratio": ratio_of_medians(samples, ours_many, "ours synchronous, 4 MB buckets"),
        "ddp_hook_vs_allreduce_step_ratio": ratio_of_medians(samples, ours_many, "plain all-reduce, 4 MB buckets"),
    }
    metrics = {k: round(v, 3) for k, v in metrics.items()}
    torch_median = median(samples["torch hook, 1 bucket"])
    rows = [[name, fmt_ms(median(s)), f"{median(s) / torch_median:.2f}"] for name, s in samples.items()]
    for name, s in samples.items():
        print(f"  ddp hook {name}: {fmt_ms(median(s))} per step", flush=True)
    print("  " + ", ".join(f"{k} {v}" for k, v in metrics.items()), flush=True)
    text = table(["side (2 gloo processes, MLP 12.6 MB of gradients, PowerSGD rank 2)", "step (median)",
                  "over torch's hook"], rows)
    return metrics, {"ddp_hook": text}
