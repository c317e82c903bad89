"""Compute time of a step: measured on this machine, or a model's FLOPs over an accelerator's FLOP rate;
and the encode/decode time of a compressor, measured or from its FLOP count.

FLOP-rate presets (dense peak, TFLOP/s) and memory bandwidth (GB/s), from the vendors' datasheets:

| accelerator | fp32 | fp16/bf16 tensor | memory | source |
|---|---|---|---|---|
| v100 | 15.7 | 125  | 900  | NVIDIA Tesla V100 SXM2 datasheet |
| t4   | 8.1  | 65   | 320  | NVIDIA T4 datasheet |
| a100 | 19.5 | 312  | 2039 | NVIDIA A100 80GB SXM datasheet (tf32 tensor: 156) |
| h100 | 67   | 989  | 3350 | NVIDIA H100 SXM5 datasheet (dense, without sparsity) |

Precision: a model trained on a tensor-core GPU runs its matmuls in fp16 or bf16 (mixed precision), so
``sim.whatif``'s default (``precision="auto"``) prices them at the fp16/bf16 tensor rate (the accelerator's
``training_precision``); ``precision="fp32"`` prices the fp32 peak, for training that keeps fp32 matmuls.

A training step costs ~3x the forward FLOPs (backward = 2x forward: Kaplan et al., "Scaling Laws for
Neural Language Models", 2020, sec. 2.1). Real training reaches a fraction of the peak (``utilization``,
default 0.4: an assumption in the range reported for convnet training; measure for anything that matters).
FLOPs are counted by ``torch.utils.flop_counter`` (matmuls and convolutions; QR and elementwise ops count 0,
so an encode/decode priced from FLOPs also pays ``memory_passes`` reads+writes of the gradient at the memory
bandwidth). Counting is deterministic; ``measure_*`` read this machine's clock (``sim.whatif`` uses them only
when asked, or when the compute itself is measured here). An exact aggregator's encode/decode is 0 in both.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from compressors import make
from compressors.comm import VirtualCollective

TRAIN_FLOPS_PER_FORWARD_FLOP = 3.0
UTILIZATION = 0.4
MEMORY_PASSES = 4  # gradient read to compress, message written, decompressed update written, EF residual


@dataclass(frozen=True)
class Accelerator:
    name: str
    fp32_tflops: float
    half_tflops: float
    memory_gbs: float
    source: str
    training_precision: str = "fp16"  # what training on it uses: mixed precision on its tensor cores

    def flop_rate(self, precision: str = "fp32") -> float:
        """FLOP/s at peak."""
        if precision == "fp32":
            return self.fp32_tflops * 1e12
        if precision in ("fp16", "bf16"):
            return self.half_tflops * 1e12
        raise ValueError(f"{self.name}: precision={precision!r} is invalid; allowed: 'fp32', 'fp16', 'bf16'")


ACCELERATORS = {
    "v100": Accelerator("v100", 15.7, 125.0, 900.0, "NVIDIA Tesla V100 SXM2 datasheet"),
    "t4": Accelerator("t4", 8.1, 65.0, 320.0, "NVIDIA T4 datasheet"),
    "a100": Accelerator("a100", 19.5, 312.0, 2039.0, "NVIDIA A100 80GB SXM datasheet", "bf16"),
    "h100": Accelerator("h100", 67.0, 989.0, 3350.0, "NVIDIA H100 SXM5 datasheet", "bf16"),
}
#: ``precision`` of ``sim.whatif``: "auto" is the accelerator's ``training_precision`` (mixed precision: fp16 on
#: v100 and t4, bf16 on a100 and h100, both at the tensor-core rate); "fp32" prices the fp32 (non-tensor) peak.
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve_precision(precision: str, name: str | None) -> str:
    """"auto" -> the accelerator's training precision ("fp32" when there is no accelerator: nothing is priced
    from FLOPs then); any other value of ``PRECISIONS`` as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"whatif: precision={precision!r} is invalid; allowed: {', '.join(PRECISIONS)} ('auto': "
                         "the accelerator's mixed precision, fp16 or bf16)")
    if precision != "auto":
        return precision
    return accelerator(name).training_precision if name is not None else "fp32"


def accelerator(name: str) -> Accelerator:
    if name not in ACCELERATORS:
        raise ValueError(f"compute: accelerator={name!r} is invalid; allowed: {', '.join(ACCELERATORS)}")
    return ACCELERATORS[name]


@dataclass(frozen=True)
class ComputeTime:
    forward: float  # seconds
    backward: float  # seconds

    @property
    def total(self) -> float:
        return self.forward + self.backward

    @property
    def backward_fraction(self) -> float:
        return self.backward / self.total if self.total > 0 else 0.0


def forward_flops(module: torch.nn.Module, example_input: torch.Tensor) -> float:
    """FLOPs of one forward pass on ``example_input`` (the whole batch), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add of matmuls and convolutions). Works on the
    meta device (nothing is computed), so any ``nn.Module`` with an example input can be counted cheaply."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(example_input)
    return float(counter.get_total_flops())


def compute_from_flops(flops_forward: float, name: str, precision: str = "fp32",
                       utilization: float = UTILIZATION) -> ComputeTime:
    """Forward F / (rate u), backward 2F / (rate u)."""
    if not 0 < utilization <= 1:
        raise ValueError(f"compute: utilization={utilization!r} is invalid; allowed: in (0, 1]")
    rate = accelerator(name).flop_rate(precision) * utilization
    return ComputeTime(flops_forward / rate, (TRAIN_FLOPS_PER_FORWARD_FLOP - 1) * flops_forward / rate)


def _median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_compute(module: torch.nn.Module, example_input: torch.Tensor, target: torch.Tensor | None = None,
                    loss_fn=None, repeats: int = 3) -> ComputeTime:
    """Median forward and backward seconds of one batch on this machine (the module's own device)."""
    loss_fn = loss_fn or (lambda out, tgt: out.float().square().mean() if tgt is None
                          else torch.nn.functional.cross_entropy(out, tgt))

    def forward():
        return loss_fn(module(example_input), target)

    def both():
        module.zero_grad(set_to_none=True)
        forward().backward()

    with torch.no_grad():
        t_forward = _median_seconds(lambda: forward(), repeats)
    t_both = _median_seconds(both, repeats)
    return ComputeTime(t_forward, max(t_both - t_forward, 0.0))


def _one_step(aggregator, shapes, seed: int):
    generator = torch.Generator().manual_seed(seed)
    state = aggregator.init(shapes, workers=1, seed=seed)
    grads = {n: torch.randn((1, *s), generator=generator) for n, s in shapes.items()}  # (1, *shape)
    comm = VirtualCollective(1)
    for _ in range(getattr(aggregator, "steps", 0)):  # past a Warmup wrapper's dense steps
        _, state = aggregator.aggregate(grads, state, comm)
    return lambda: aggregator.aggregate(grads, state, comm)


def measure_codec(aggregator, shapes, repeats: int = 3, seed: int = 0) -> float:
    """Encode + decode seconds of one step on this machine: one worker's ``aggregate`` (its collective is a
    no-op copy), minus the exact mean's (packing), floored at 0; exactly 0 for an exact aggregator. Warm-up
    steps are run through first. A clock on this machine: noisy on a shared CPU, and not the target GPU."""
    def seconds(agg):
        step = _one_step(agg, shapes, seed)
        return _median_seconds(step, repeats)

    if is_exact(aggregator, shapes):
        return 0.0
    return max(0.0, seconds(aggregator) - seconds(make("identity")))


def codec_flops(aggregator, shapes, seed: int = 0) -> float:
    """FLOPs (matmuls) of one worker's encode + decode, counted on a real ``aggregate``."""
    step = _one_step(aggregator, shapes, seed)
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def is_exact(aggregator, shapes) -> bool:
    """True when the aggregator declares the exact mean on these shapes (identity, or nothing compressed): it
    encodes nothing, so its encode/decode time is 0 by definition, whatever a clock or counter says."""
    try:
        return aggregator.theory(shapes).kind == "exact"
    except NotImplementedError:
        return False


def codec_from_flops(aggregator, shapes, name: str, precision: str = "fp32", utilization: float = UTILIZATION,
                     memory_passes: int = MEMORY_PASSES) -> float:
    """flops / (rate u) + passes * dense bytes / memory bandwidth on accelerator ``name``; exactly 0 for an
    aggregator that declares the exact mean (nothing to encode). Deterministic: a count, not a clock."""
    if is_exact(aggregator, shapes):
        return 0.0
    dense_bits = sum(_numel(s) for s in shapes.values()) * 32
    device = accelerator(name)
    rate = device.flop_rate(precision) * utilization
    return codec_flops(aggregator, shapes) / rate + memory_passes * dense_bits / 8 / (device.memory_gbs * 1e9)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
