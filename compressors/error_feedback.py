"""Error feedback as a wrapper around any aggregator.

Modes (same option name on every compressor, ``error_feedback=``):

- ``"none"``: no memory; the compressor's error is simply lost.
- ``"local"``: each worker keeps its own residual e_i <- x_i - C_i(x_i), with x_i = g_i + e_i and C_i the
  worker's own decompressed message (EF-SGD, Stich & Karimireddy 2019; PowerSGD paper, Algorithm 2).
- ``"averaged"``: each worker keeps e_i <- x_i - mean_j C_j(x_j), the residual against the aggregated
  update, as the PowerSGD paper's code does (and the ``powersgd`` package did before its July 2022 change;
  since then the package keeps ``"local"`` residuals, as ``compressors.PowerSGD`` does).
- ``"ef21"``: each worker keeps an estimate g_i and sends c_i = C(grad_i - g_i); g_i <- g_i + c_i and the
  update is g <- g + mean c_i, so g = mean_i g_i always (Richtarik, Sokolov, Fatkhullin 2021).
- ``"local_scaled"``: ``"local"`` around C / (1 + omega) when C is unbiased with variance omega, and around C
  itself otherwise. Error feedback needs a contraction; an unbiased C with omega >= 1 is none (the residual
  grows like omega^t), but C / (1 + omega) is one with delta = 1 / (1 + omega):
  E||C(x)/(1+w) - x||^2 = E||C(x)||^2/(1+w)^2 - 2||x||^2/(1+w) + ||x||^2 <= (1 - 1/(1+w)) ||x||^2, using
  E||C(x)||^2 <= (1+w) ||x||^2 (Stich, Cordonnier, Jaggi 2018, sec. 2; Beznosikov et al. 2020, Lemma 1).
  The scale is per tensor (omega depends on its shape) and applies to what every worker applies too, so
  the wire format and bits are unchanged.

Conservation (local and averaged, linear decoders): sum_t update_t + mean_i e_i = sum_t mean_i g_i.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from .base import Aggregator, Reduced, check_grads
from .options import check_choice
from .serialization import register_record

ERROR_FEEDBACK_MODES = ("none", "local", "averaged", "ef21", "local_scaled")


@register_record
class ErrorFeedbackState(NamedTuple):
    memory: dict[str, torch.Tensor]  # (k, *shape): residual e_i ("local"/"averaged") or estimate g_i ("ef21")
    estimate: dict[str, torch.Tensor]  # (*shape): ef21's global g = mean_i g_i; empty for the other modes
    inner: object


class ErrorFeedback(Aggregator):
    def __init__(self, inner: Aggregator, mode: str = "local"):
        self.mode = check_choice(type(inner).__name__, "error_feedback", mode, ERROR_FEEDBACK_MODES[1:])
        self.inner = inner
        self.all_reducible = inner.all_reducible
        self.name = inner.name

    def init(self, shapes, workers, seed=0, dtype=torch.float32, device="cpu"):
        memory = {n: torch.zeros((workers, *s), dtype=dtype, device=device) for n, s in shapes.items()}
        estimate = {n: torch.zeros(s, dtype=dtype, device=device) for n, s in shapes.items()} if self.mode == "ef21" else {}
        return ErrorFeedbackState(memory, estimate, self.inner.init(shapes, workers, seed, dtype=dtype, device=device))

    def reduce(self, grads, state, comm, want_local=False):
        check_grads("error_feedback", grads)
        if self.mode == "ef21":
            return self._reduce_ef21(grads, state, comm, want_local)
        if self.mode == "local_scaled":
            return self._reduce_local_scaled(grads, state, comm, want_local)
        corrected = {n: g + state.memory[n].to(g.dtype) for n, g in grads.items()}  # x_i = g_i + e_i
        if self.mode == "local" and not want_local and hasattr(self.inner, "reduce_residual"):
            # The kernel forms x_i - C_i(x_i) itself, into x_i (this wrapper's own temporary): one fused pass.
            reduced, inner_state, residuals = self.inner.reduce_residual(corrected, state.inner, comm)
            memory = {n: r.to(state.memory[n].dtype) for n, r in residuals.items()}
            return Reduced(reduced.update, None), ErrorFeedbackState(memory, state.estimate, inner_state)
        need_local = want_local or self.mode == "local"
        reduced, inner_state = self.inner.reduce(corrected, state.inner, comm, want_local=need_local)
        against = reduced.local if self.mode == "local" else reduced.update  # averaged: the update all apply
        if not want_local:
            # x_i is this wrapper's own temporary and nothing returned aliases it once ``local`` is dropped:
            # the residual overwrites it (same values as x - C, one allocation of W copies less).
            memory = {n: _residual_into(x, against[n], state.memory[n].dtype) for n, x in corrected.items()}
            return Reduced(reduced.update, None), ErrorFeedbackState(memory, state.estimate, inner_state)
        memory = {n: (x - against[n]).to(state.memory[n].dtype) for n, x in corrected.items()}
        return reduced, ErrorFeedbackState(memory, state.estimate, inner_state)

    def _reduce_ef21(self, grads, state, comm, want_local):
        differences = {n: g - state.memory[n].to(g.dtype) for n, g in grads.items()}  # grad_i - g_i
        reduced, inner_state = self.inner.reduce(differences, state.inner, comm, want_local=True)
        memory = {n: (state.memory[n] + reduced.local[n].to(state.memory[n].dtype)) for n in grads}
        estimate = {n: state.estimate[n] + reduced.update[n].to(state.estimate[n].dtype) for n in grads}
        update = {n: estimate[n].to(grads[n].dtype) for n in grads}
        local = {n: memory[n].to(grads[n].dtype) for n in grads} if want_local else None
        return Reduced(update, local), ErrorFeedbackState(memory, estimate, inner_state)

    def _reduce_local_scaled(self, grads, state, comm, want_local):
        corrected = {n: g + state.memory[n].to(g.dtype) for n, g in grads.items()}  # x_i = g_i + e_i
        reduced, inner_state = self.inner.reduce(corrected, state.inner, comm, want_local=True)
        scales = {n: self.contraction_scale({n: tuple(g.shape[1:])}) for n, g in grads.items()}
        update = {n: u * scales[n] if scales[n] != 1.0 else u for n, u in reduced.update.items()}
        local = {n: c * scales[n] if scales[n] != 1.0 else c for n, c in reduced.local.items()}
        memory = {n: (x - local[n]).to(state.memory[n].dtype) for n, x in corrected.items()}
        return Reduced(update, local if want_local else None), ErrorFeedbackState(memory, state.estimate, inner_state)

    def contraction_scale(self, shapes) -> float:
        """1 / (1 + omega) when the inner operator is unbiased with variance omega on these shapes, else 1."""
        claim = self.inner.theory(shapes)
        return 1.0 / (1.0 + claim.omega) if claim.kind == "unbiased" and claim.omega else 1.0

    def bits_per_step(self, shapes, **kwargs):
        return self.inner.bits_per_step(shapes, **kwargs)

    def theory(self, shapes):
        """The inner operator's class; for "local_scaled" around an unbiased one, the scaled operator's:
        a contraction (in expectation) with delta = 1 / (1 + omega)."""
        claim = self.inner.theory(shapes)
        if self.mode == "local_scaled" and claim.kind == "unbiased" and claim.omega:
            # same premise (magnitude range, per worker) as the unbiased bound it is derived from
            return dataclasses.replace(claim, kind="contractive", delta=1.0 / (1.0 + claim.omega), omega=None,
                                       deterministic=False)
        return claim

    def __repr__(self):
        return f"ErrorFeedback({self.inner!r}, mode={self.mode!r})"


def _residual_into(x: torch.Tensor, approximation: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x - approximation, written into x when the result keeps x's dtype and shape (else a new tensor)."""
    if x.dtype == dtype and approximation.dtype == dtype and torch.broadcast_shapes(x.shape, approximation.shape) == x.shape:
        return torch.sub(x, approximation, out=x)
    return (x - approximation).to(dtype)


def with_error_feedback(inner: Aggregator, mode: str) -> Aggregator:
    check_choice(type(inner).__name__, "error_feedback", mode, ERROR_FEEDBACK_MODES)
    return inner if mode == "none" else ErrorFeedback(inner, mode)
