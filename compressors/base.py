"""The aggregator contract shared by every compressor, wrapper and policy.

An aggregator turns per-worker gradients ``{name: (W, *shape)}`` into one update ``{name: (*shape)}``
that every worker applies, communicating only through ``comm`` (a virtual or real collective).

State is explicit: ``init`` builds it, ``aggregate`` returns a new one, nothing is kept on the object.
Inputs are never mutated. Wrappers (error feedback, warm-up, partitions) nest their inner state.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from .comm.protocol import Comm

Shapes = Mapping[str, tuple[int, ...]]
Grads = Mapping[str, torch.Tensor]

TheoryClass = Literal["exact", "unbiased", "contractive", "nonexpansive", "biased"]


class Reduced(NamedTuple):
    """What one aggregation produced.

    update: {name: (*shape)}, identical on every worker.
    local:  {name: (k, *shape)}, each worker's own decompressed message C_i(x_i), or None when not asked for.
            Error feedback ("local", "local_scaled", "ef21") needs it; the mean over all workers of ``local`` equals ``update``
            for every compressor whose decoder is linear (all-reduce compressors, top-k, QSGD, ...).
    """

    update: dict[str, torch.Tensor]
    local: dict[str, torch.Tensor] | None


@dataclass(frozen=True)
class TheoryClaim:
    """What a compressor promises, checked by the property suite (``tests/test_theory_adversarial.py``).

    kind: "exact" (C(x) = x),
          "unbiased" (E C(x) = x, E||C(x)-x||^2 <= omega ||x||^2),
          "contractive" (||C(x)-x||^2 <= (1-delta) ||x||^2 with 0 < delta <= 1, deterministically or, when
          ``deterministic`` is False, in expectation over this step's fresh randomness),
          "nonexpansive" (||C(x)-x||^2 <= ||x||^2 for every x, deterministically, and nothing more: delta = 0,
          no contraction an error-feedback analysis could use; e.g. a projection onto a subspace chosen from
          earlier steps, as warm-started PowerSGD),
          "biased" (none of these: e.g. plain sign, whose scale is arbitrary).
    deterministic: False when the bound holds only in expectation over the randomness the compressor draws in
          this step; the input must not depend on that draw (earlier draws are fine: error feedback).
    magnitudes: (low, high) when the bound needs every nonzero |x_j| in [low, high] (a cast's normal range);
          None when it holds for every finite input whose squared norm neither overflows nor underflows the
          working dtype (every claim is stated in exact arithmetic, up to that dtype's rounding).
    per_worker: True when each worker's own message C_i(x_i) obeys the bound on x_i (what "local" error
          feedback needs for each worker's memory); False when only the update, as a function of the
          workers' mean x = mean_i x_i, does (PowerSGD: one projection, chosen from the mean, applied to every
          x_i, which is then only nonexpansive on each x_i).
    premise: the conditions in words (options, state), as listed in docs/theory_claims.md.
    """

    kind: TheoryClass
    omega: float | None = None
    delta: float | None = None
    deterministic: bool = True
    magnitudes: tuple[float, float] | None = None
    per_worker: bool = True
    premise: str = ""


class Aggregator(ABC):
    """Base class of every registered compressor. Subclasses implement ``init``, ``reduce`` and ``bits_per_step``.

    The signatures below are exactly how the simulator (``sim.run``), the DDP hook, the wrappers (error
    feedback, warm-up, partitions) and the cost model call them; an override must accept the same arguments
    (``compressors.register`` checks it). ``dtype``/``device`` are keyword-only with defaults: the simulator
    passes ``dtype=`` (the experiment's dtype), the DDP hook and ``compressors.PowerSGD`` pass ``dtype=`` and
    ``device=`` of the gradients, the cost model passes neither (float32 on the CPU). See
    docs/writing_a_compressor.md; ``compressors.testing.check_compressor`` runs the contract battery.
    """

    name: str = "aggregator"
    #: True if the aggregate needs only all-reduce (no all-gather).
    all_reducible: bool = True

    @abstractmethod
    def init(self, shapes: Shapes, workers: int, seed: int = 0, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> Any:
        """The initial state for tensors of the given shapes, shared by ``workers`` workers.

        shapes: {name: shape} of one worker's tensors (no worker axis). workers: the leading axis ``k`` of the
        gradients this state will see (the emulated workers of this process: W in the simulator, 1 in plain
        DDP). seed: shared randomness is drawn from it (identical on every worker). dtype, device: those of
        the gradients; per-worker state (error-feedback memory, warm-start factors) takes them. Called once
        before the first step (and again by a wrapper that rebuilds its inner state); callers may pass
        ``seed`` positionally and ``dtype``/``device`` only by keyword.
        """

    @abstractmethod
    def reduce(self, grads: Grads, state: Any, comm: Comm, want_local: bool = False) -> tuple[Reduced, Any]:
        """One aggregation: {name: (k, *shape)} -> ``Reduced`` and the new state (never mutate either input).

        ``want_local`` asks for each worker's own decompressed message as well (error feedback's "local"
        modes need it); callers pass it positionally or by keyword. Every collective goes through ``comm``.
        """

    @abstractmethod
    def bits_per_step(self, shapes: Shapes, *, dtype: torch.dtype = torch.float32) -> float:
        """Payload bits one worker sends per step, after any warm-up (averaged over a cycle if it alternates).

        ``dtype``: the gradients' dtype (keyword-only; the simulator passes the experiment's). It must equal
        what the ledger records for one step of ``reduce`` on these shapes.
        """

    def aggregate(self, grads: Grads, state: Any, comm: Comm) -> tuple[dict[str, torch.Tensor], Any]:
        reduced, state = self.reduce(grads, state, comm, want_local=False)
        return reduced.update, state

    def theory(self, shapes: Shapes) -> TheoryClaim:
        """The operator class this compressor claims on tensors of these shapes (see ``theory.operators``)."""
        raise NotImplementedError(f"{type(self).__name__} declares no theory class")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def dtype_bits(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() * 8


def matrix_view_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The matrix a tensor is compressed as: shape[0] x prod(shape[1:]) (a conv kernel is out x in*kh*kw)."""
    if len(shape) == 0:
        return (1, 1)
    rows = shape[0]
    cols = 1
    for s in shape[1:]:
        cols *= s
    return (rows, cols)


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_grads(owner: str, grads: Grads, expected: Shapes | None = None) -> int:
    """Every gradient has the same leading worker axis (and the shapes of ``expected``); returns its size."""
    if not grads:
        return 0
    sizes = {g.shape[0] if g.dim() > 0 else None for g in grads.values()}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"{owner}: grads must all carry the same leading worker axis, got sizes {sizes}")
    if expected is not None:
        for name, g in grads.items():
            if name not in expected:
                raise ValueError(f"{owner}: grads has a tensor {name!r} that init() was not told about")
            if tuple(g.shape[1:]) != tuple(expected[name]):
                raise ValueError(f"{owner}: grads[{name!r}] has shape {tuple(g.shape[1:])}, init() was told {tuple(expected[name])}")
    return sizes.pop()
