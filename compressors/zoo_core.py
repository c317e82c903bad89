"""Registry entries for the exact mean and PowerSGD (the other compressors register in their own modules)."""
from __future__ import annotations

from .base import Aggregator
from .error_feedback import ERROR_FEEDBACK_MODES
from .identity import Identity
from .options import MAX_SEED, check_bool, check_choice, check_float, check_int
from .orthogonalize import ORTHOGONALIZATIONS
from .policies import compose
from .powersgd import VARIANTS, PowerSGDKernel
from .registry import register


def check_policies(owner: str, error_feedback, min_compression_rate, start_compressing_after_num_steps):
    check_choice(owner, "error_feedback", error_feedback, ERROR_FEEDBACK_MODES)
    check_float(owner, "min_compression_rate", min_compression_rate, minimum=0.0)
    check_int(owner, "start_compressing_after_num_steps", start_compressing_after_num_steps, minimum=0)


@register("identity")
def make_identity(*, error_feedback: str = "none") -> Aggregator:
    """Exact mean via one packed all-reduce (no error, so error feedback keeps a zero memory)."""
    check_choice("identity", "error_feedback", error_feedback, ERROR_FEEDBACK_MODES)
    return compose(Identity(), error_feedback=error_feedback, min_compression_rate=0.0, compress_vectors=True)


@register("powersgd")
def make_powersgd(*, rank: int = 1, num_iters_per_step: int = 1, warm_start: bool = True, variant: str = "paper",
                  orthogonalization: str = "qr", epsilon: float = 1e-8, min_compression_rate: float = 2.0,
                  start_compressing_after_num_steps: int = 0, error_feedback: str = "local",
                  seed: int | None = None) -> Aggregator:
    """PowerSGD. Defaults: the paper's algorithm (variant "paper", local error feedback, warm start)."""
    owner = "powersgd"
    check_int(owner, "rank", rank, minimum=1)
    check_int(owner, "num_iters_per_step", num_iters_per_step, minimum=1)
    check_bool(owner, "warm_start", warm_start)
    check_choice(owner, "variant", variant, VARIANTS)
    check_choice(owner, "orthogonalization", orthogonalization, ORTHOGONALIZATIONS)
    check_float(owner, "epsilon", epsilon, minimum=0.0)
    check_policies(owner, error_feedback, min_compression_rate, start_compressing_after_num_steps)
    if seed is not None:
        check_int(owner, "seed", seed, minimum=0, maximum=MAX_SEED)
    kernel = PowerSGDKernel(rank, num_iters_per_step, warm_start, variant, orthogonalization, epsilon, seed)
    return compose(kernel, error_feedback=error_feedback, min_compression_rate=min_compression_rate,
                   start_compressing_after_num_steps=start_compressing_after_num_steps)
