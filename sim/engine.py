"""Per-worker gradients: vectorized with torch.func over the worker axis, and a plain loop as the reference.

Parameters are one copy shared by all workers (vmap in_dims=None: expanded, not copied). Buffers (BatchNorm
running statistics) are per worker, (k, *shape), so each worker normalises with its own batch statistics and
updates its own running averages, as separate data-parallel processes would.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from .models.lstm import UnrolledLSTM

ENGINES = ("auto", "vmap", "loop")
#: Modules whose per-worker vmap costs more than a loop of W ordinary calls on the CPU (W = 16, B = 32, measured by
#: ``benchmarks/vmap_vs_loop.py``): vmap turns a convolution's weight gradient into a grouped convolution and
#: BatchNorm into per-worker statistics over a folded batch (0.8x the loop on digits-cnn); sequence models (an
#: embedding, linear layers on (B, T, d) inputs, a Python loop over time steps) batch poorly (0.45x on
#: charlm-lstm); nn.LSTM/GRU have no vmap batching rule at all (vmap loops, and fails in float64).
LOOP_MODULES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.RNNBase, nn.Embedding)
_REPORTED: set[str] = set()  # slow-fallback reports already given
_SLOW_FALLBACK = r"performance drop because we have not yet implemented the batching rule for (\S+?)\.? "
Tensors = dict[str, torch.Tensor]


class VmapEngine:
    def __init__(self, model: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.model = model

        def worker_loss(params, buffers, x, y):
            value = loss(functional_call(model, (params, buffers), (x,)), y)
            return value, value.detach()

        self._grads = vmap(grad(worker_loss, has_aux=True), in_dims=(None, 0, 0, 0))

    def gradients(self, params: Tensors, buffers: Tensors, x: torch.Tensor, y: torch.Tensor
                  ) -> tuple[Tensors, torch.Tensor, Tensors]:
        """x: (k, B, ...), y: (k, B, ...) -> grads {name: (k, *shape)}, losses (k,), new buffers (k, ...)."""
        self.model.train()
        buffers = {name: b.clone() for name, b in buffers.items()}  # updated in place by BatchNorm below
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.filterwarnings("always", message=_SLOW_FALLBACK)
                grads, losses = self._grads(params, buffers, x, y)
        except RuntimeError as error:
            if "vmap" not in str(error) and "batching rule" not in str(error).lower():
                raise
            raise ValueError(f"Experiment: engine='vmap' is invalid for this model; allowed: 'loop' (torch.func.vmap "
                             f"cannot batch it over workers: {str(error).split('. ')[0]}). Use "
                             "Experiment(engine='loop'): one autograd call per worker, the same gradients, slower"
                             ) from error
        self._report(caught)
        return grads, losses, buffers

    def _report(self, caught: list) -> None:
        """torch.func's "performance drop ... batching rule" warnings, once per process and in our words; any
        other warning is passed on unchanged."""
        slow = set()
        for w in caught:
            match = re.search(_SLOW_FALLBACK, str(w.message))
            if match:
                slow.add(match.group(1))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        message = ", ".join(sorted(slow))
        if slow and message not in _REPORTED:
            _REPORTED.add(message)  # once per process (catch_warnings resets Python's own once-registry)
            warnings.warn(f"engine='vmap': {message} has no batching rule in torch.func, so vmap runs it one worker "
                          "at a time: same gradients, less speed-up (time engine='loop' if this model is slow)",
                          stacklevel=3)


class LoopEngine:
    """The slow obvious reference: one autograd call per worker."""

    def __init__(self, model: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.model = model
        self.loss = loss

    def gradients(self, params, buffers, x, y):
        self.model.train()
        new_buffers = {name: b.clone() for name, b in buffers.items()}
        grads: list[tuple[torch.Tensor, ...]] = []
        losses = []
        for w in range(x.shape[0]):
            leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
            worker_buffers = {name: b[w] for name, b in new_buffers.items()}  # views: updated in place
            value = self.loss(functional_call(self.model, (leaves, worker_buffers), (x[w],)), y[w])
            grads.append(torch.autograd.grad(value, list(leaves.values())))
            losses.append(value.detach())
        stacked = {name: torch.stack([g[i] for g in grads]) for i, name in enumerate(params)}
        return stacked, torch.stack(losses), new_buffers


def resolve_engine(name: str, model: nn.Module) -> str:
    """The engine ``name`` stands for on this model: "auto" is a static rule on the model's modules, never a
    timing (which would make results depend on the machine's load): the loop for a model holding a convolution,
    BatchNorm, an embedding or a recurrent module (``LOOP_MODULES``, plus the project's ``UnrolledLSTM``), vmap
    otherwise (MLPs on flat inputs, where vmap is 2.5-3x the loop). Both engines compute the same
    gradients (up to summation order); each is deterministic, and the rule picks the same one every run."""
    if name != "auto":
        return name

    return "loop" if any(isinstance(m, LOOP_MODULES + (UnrolledLSTM,)) for m in model.modules()) else "vmap"


def make_engine(name: str, model: nn.Module, loss) -> VmapEngine | LoopEngine:
    """``name``: "auto" (``resolve_engine``), "vmap" or "loop"."""
    return VmapEngine(model, loss) if resolve_engine(name, model) == "vmap" else LoopEngine(model, loss)


@torch.no_grad()
def evaluate(model: nn.Module, params: Tensors, buffers: Tensors, x: torch.Tensor, y: torch.Tensor, loss,
             classification: bool, batch: int = 1024) -> tuple[float, float]:
    """(mean loss, accuracy or NaN) on a held-out set, in eval mode (BatchNorm uses running statistics).

    Every batch's loss and correct count stay on the device until one read at the end."""
    model.eval()
    losses, corrects, sizes = [], [], []
    for start in range(0, len(x), batch):
        xb, yb = x[start:start + batch], y[start:start + batch]
        out = functional_call(model, (params, buffers), (xb,))
        losses.append(loss(out, yb).detach().reshape(()).to(torch.float64))
        if classification:
            corrects.append((out.argmax(-1) == yb).sum().to(torch.float64))
        sizes.append(len(xb))
    model.train()
    values = torch.stack(losses + corrects).tolist()  # one transfer; float64 holds every value exactly
    total_loss = 0.0
    for value, size in zip(values, sizes):
        total_loss += value * size
    accuracy = int(sum(values[len(losses):])) / len(x) if classification else float("nan")
    return total_loss / len(x), accuracy
