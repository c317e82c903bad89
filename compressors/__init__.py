"""Compressors for data-parallel SGD behind one aggregator contract.

    agg = compressors.make("powersgd", rank=2)
    state = agg.init({name: shape}, workers=W, seed=0)
    update, state = agg.aggregate(grads, state, comm)   # grads: {name: (W, *shape)} -> {name: (*shape)}

Wings (docs/design.md): kernels, policies, error feedback and the registry at this level; ``comm`` (the Comm
protocol, the virtual and the torch.distributed collective), ``ddp`` (the DDP hook and the original package's
API), ``ranks`` (rank schedules, adaptive and per-layer ranks). Importing this package registers every
built-in compressor (``zoo_core``: identity, powersgd; ``zoo``: fp16, topk, sign, qsgd, svd, ...).
"""
from . import testing, zoo, zoo_core
from .base import Aggregator, Reduced, TheoryClaim, dtype_bits, matrix_view_shape
from .comm import Comm
from .ddp import Config, HookState, PowerSGD, ddp_comm_hook, optimizer_step
from .degenerate import DenseConfigurationWarning
from .error_feedback import ERROR_FEEDBACK_MODES, ErrorFeedback, ErrorFeedbackState
from .identity import Identity
from .match_bits import match_bits
from .orthogonalize import orthogonalize
from .policies import Partition, Warmup, compose
from .powersgd import PowerSGDKernel, PowerSGDState
from .registry import REGISTRY, make, options_of, register
from .spec import parse_spec, spec_label
from .state_tree import iter_states, memory_norm

__all__ = [
    "make", "register", "REGISTRY", "options_of", "match_bits", "parse_spec", "spec_label",
    "Aggregator", "Comm", "Reduced", "TheoryClaim", "dtype_bits", "matrix_view_shape",
    "ERROR_FEEDBACK_MODES", "ErrorFeedback", "ErrorFeedbackState", "Identity", "orthogonalize",
    "Partition", "Warmup", "compose", "PowerSGDKernel", "PowerSGDState", "iter_states", "memory_norm",
    "HookState", "ddp_comm_hook", "Config", "PowerSGD", "optimizer_step", "DenseConfigurationWarning",
    "testing", "zoo", "zoo_core",
]
