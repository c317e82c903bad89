"""Compressors for data-parallel SGD behind one aggregator contract.

    agg = compressors.make("powersgd", rank=2)
    state = agg.init({name: shape}, workers=W, seed=0)
    update, state = agg.aggregate(grads, state, comm)   # grads: {name: (W, *shape)} -> {name: (*shape)}
"""
from . import zoo_core  # noqa: F401  (registers identity and powersgd)
from . import zoo  # noqa: F401  (registers the compressor zoo: fp16, topk, sign, qsgd, svd, ...)
from .base import Aggregator, Comm, Reduced, TheoryClaim, dtype_bits, matrix_view_shape
from .error_feedback import ERROR_FEEDBACK_MODES, ErrorFeedback, ErrorFeedbackState
from .identity import Identity
from .orthogonalize import orthogonalize
from .policies import Partition, Warmup, compose
from .powersgd import PowerSGDKernel, PowerSGDState
from .registry import REGISTRY, make, options_of, register
from .state_tree import iter_states, memory_norm
from .ddp_hook import HookState, ddp_comm_hook
from .package_api import Config, PowerSGD, optimizer_step

__all__ = [
    "Aggregator", "Comm", "Reduced", "TheoryClaim", "dtype_bits", "matrix_view_shape",
    "ERROR_FEEDBACK_MODES", "ErrorFeedback", "ErrorFeedbackState", "Identity", "orthogonalize",
    "Partition", "Warmup", "compose", "PowerSGDKernel", "PowerSGDState",
    "REGISTRY", "make", "options_of", "register", "iter_states", "memory_norm",
]
__all__ += ["HookState", "ddp_comm_hook", "Config", "PowerSGD", "optimizer_step"]
from .match_bits import match_bits; __all__ += ["match_bits"]  # noqa: E402,E702  (the knob value for a bits budget)
from . import testing  # noqa: E402,F401  (compressors.testing.check_compressor: the contract battery, public)
from .degenerate import DenseConfigurationWarning; __all__ += ["DenseConfigurationWarning"]  # noqa: E402,E702
