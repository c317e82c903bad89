"""The original ``powersgd`` package's API (epfml/powersgd), reproducing its README training loop exactly.

    powersgd = compressors.PowerSGD(list(model.parameters()), config=compressors.Config(
        rank=1, min_compression_rate=10, num_iters_per_step=2, start_compressing_after_num_steps=0))
    for batch in data:
        optimizer.zero_grad()          # optional: the result is the same with or without it
        loss(model, batch).backward()
        compressors.optimizer_step(optimizer, powersgd)

From the same model, data and optimizer this gives the package's trajectory (to rounding): the same initial
factors (``Config.seed`` 0 is the package's generator seed), the same alternation (the first compressed step
sends Q = R^T P^), each worker's own residual against its own message (the package since July 2022; before,
the residual was against the averaged approximation), uncompressed tensors all-reduced exactly with no residual,
and the first ``start_compressing_after_num_steps`` steps exact all-reduces. See ``package_kernel`` and
docs/package_api.md.

Deliberate deviations, each only where the package has a bug:

- Selection: a tensor is compressed iff its size over its average compressed size
  0.5 * num_iters_per_step * r * (n + m), with r = min(rank, n, m), exceeds ``min_compression_rate``,
  computed on the matrix view n x m = shape[0] x prod(shape[1:]) that is actually compressed. The package
  computes it on the raw shape (r = min(rank, *shape), sum of all dimensions): identical for matrices, but a
  conv kernel or a vector can be selected differently. A 0-d parameter is a 1 x 1 matrix (the package fails).
- A rank-1 factor is normalized per matrix (the package: by the norm of the whole same-shape batch).
- Factors take the parameters' dtype (the package: torch's default dtype, failing when they differ).
- A model with nothing worth compressing is all-reduced exactly (the package raises ``IndexError``).
- A factor that comes out all zero keeps its previous value (the package's rank-1 factor stays zero for good).
- The residual lives in this object's state, not in ``p.grad``: ``optimizer_step`` leaves every ``p.grad``
  zeroed, so the README loop (no ``zero_grad``) and a loop with ``zero_grad`` give the package's README result
  (with ``zero_grad`` the package itself would drop its residual).

Without an initialized process group the world is one process; under ``torch.distributed`` gradients are
averaged over the default group (or ``process_group``).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..comm import DistributedCollective, VirtualCollective
from ..options import MAX_SEED, check_choice, check_float, check_int
from ..orthogonalize import ORTHOGONALIZATIONS
from ..policies import compose
from ..serialization import check_same_structure, check_values, from_plain, to_plain
from .package_kernel import PackagePowerSGDKernel

_ORTH_ALIASES = {"gram-schmidt": "gram_schmidt"}  # the hyphenated spelling is accepted too


@dataclass(frozen=True)
class Config:
    """The package's Config, with its defaults (``rank`` has none there either), and two additions.

    ``orthogonalization`` ("qr", the package's, or "gram_schmidt") applies to factors of rank >= 2; a rank-1
    factor is always normalized, as in the package. ``seed`` seeds the generator of the initial factors
    (0: the package's).
    """

    rank: int
    min_compression_rate: float = 2
    num_iters_per_step: int = 1
    start_compressing_after_num_steps: int = 100
    orthogonalization: str = "qr"
    seed: int = 0

    def __post_init__(self):
        check_int("Config", "rank", self.rank, minimum=1)
        check_float("Config", "min_compression_rate", self.min_compression_rate, minimum=0.0)
        check_int("Config", "num_iters_per_step", self.num_iters_per_step, minimum=1)
        check_int("Config", "start_compressing_after_num_steps", self.start_compressing_after_num_steps, minimum=0)
        orth = _ORTH_ALIASES.get(self.orthogonalization, self.orthogonalization)
        check_choice("Config", "orthogonalization", orth, ORTHOGONALIZATIONS)
        object.__setattr__(self, "orthogonalization", orth)
        check_int("Config", "seed", self.seed, minimum=0, maximum=MAX_SEED)


class PowerSGD:
    """``aggregate(gradients) -> averaged approximations``, one list entry per parameter given at construction."""

    def __init__(self, params: Iterable[torch.Tensor], config: Config, process_group=None, timeout: float = 60.0):
        self.params = list(params)
        if not self.params:
            raise ValueError("PowerSGD: params is invalid; allowed: a non-empty list of parameters")
        if not isinstance(config, Config):
            raise ValueError(f"PowerSGD: config={config!r} is invalid; allowed: a compressors.Config")
        self.config = config
        kernel = PackagePowerSGDKernel(config.rank, config.num_iters_per_step, config.orthogonalization, config.seed)
        # The package compresses any tensor (vectors too) whose rate is high enough; residuals are per worker.
        self.aggregator = compose(kernel, error_feedback="local", compress_vectors=True,
                                  min_compression_rate=float(config.min_compression_rate),
                                  start_compressing_after_num_steps=config.start_compressing_after_num_steps)
        self.names = [str(i) for i in range(len(self.params))]
        first = self.params[0]
        self.state = self.aggregator.init({n: tuple(p.shape) for n, p in zip(self.names, self.params)}, workers=1,
                                          seed=config.seed, dtype=first.dtype, device=first.device)
        self.comm = _collective(process_group, timeout)

    def aggregate(self, gradients: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """The averaged (compressed) gradients; ``None`` counts as zero. Inputs are not modified."""
        if len(gradients) != len(self.params):
            raise ValueError(f"PowerSGD.aggregate: gradients has {len(gradients)} entries; allowed: one per "
                             f"parameter ({len(self.params)})")
        grads = {n: (g if g is not None else torch.zeros_like(p)).unsqueeze(0)  # (1, *shape)
                 for n, g, p in zip(self.names, gradients, self.params)}
        self.comm.ledger.begin_step()  # step_records: this step's collectives only (flat memory)
        update, self.state = self.aggregator.aggregate(grads, self.state, self.comm)
        return [update[n] for n in self.names]

    def state_dict(self) -> dict[str, Any]:
        return {"state": to_plain(self.state)}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output (untrusted: records only from registered types, every tensor checked
        before use, the structure that of this object's state, every number in range); ValueError otherwise,
        changing nothing."""
        if type(saved) is not dict or set(saved) != {"state"}:
            raise ValueError("PowerSGD.load_state_dict: saved is invalid; allowed: the dict state_dict() returns")
        state = from_plain(saved["state"], "$.state")
        check_same_structure(state, self.state, "$.state")
        check_values(state, self.state, 2**63 - 1, "$.state")
        self.state = state


def optimizer_step(optimizer: torch.optim.Optimizer, aggregator: PowerSGD) -> None:
    """Aggregate the gradients, step with the aggregate as ``p.grad``, then leave every ``p.grad`` zeroed."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    known = {id(p) for p in aggregator.params}
    if {id(p) for p in params} != known or len(params) != len(known):
        raise ValueError("optimizer_step: optimizer is invalid; allowed: an optimizer over exactly the parameters "
                         "given to PowerSGD(params, ...)")
    grads = [p.grad for p in aggregator.params]
    averaged = aggregator.aggregate(grads)
    for p, g in zip(aggregator.params, averaged):
        p.grad = g
    optimizer.step()
    for p, g in zip(aggregator.params, grads):  # hand back the caller's buffers, zeroed: memory is in our state
        p.grad = g.zero_() if g is not None else None


def _collective(process_group, timeout: float):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistributedCollective(1, group=process_group, timeout=timeout, keep_records=False)
    return VirtualCollective(1, keep_records=False)  # totals only: a training loop runs for long
