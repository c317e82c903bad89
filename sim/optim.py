"""Optimizers applied after aggregation (PowerSGD paper, Alg. 2): every worker applies the same rule to the
same aggregated update, so one copy of the parameters and of the optimizer state serves them all.

Functional: ``init(params) -> state``, ``step(params, update, state, lr) -> (params, state)``; the state is an
explicit NamedTuple of plain tensors (checkpointable, comparable). Each rule performs the same tensor
operations, in the same order, as its ``torch.optim`` counterpart's single-tensor path (``foreach=False``), so
fed the same gradients and learning rates the two agree to rounding (tests/test_optim_adam.py checks 1e-12 in
float64).

    sgd    weight decay, momentum, Nesterov          torch.optim.SGD
    adam   L2 weight decay added to the gradient     torch.optim.Adam  (Kingma & Ba 2015, Alg. 1)
    adamw  decoupled weight decay                    torch.optim.AdamW (Loshchilov & Hutter 2019, Alg. 2)

The learning rate comes from ``learning_rate`` (warm-up, then step decay, cosine or polynomial annealing),
shared by every optimizer. Weight decay skips the parameters named in ``no_decay`` (the patterns of
``Experiment.weight_decay_exclude`` resolved on the model by ``decay_excluded``), as torch.optim does for a
second parameter group with weight_decay 0. ``clip_by_global_norm`` (``Experiment.clip_grad_norm``) scales the
aggregated update before the optimizer sees it, as ``torch.nn.utils.clip_grad_norm_`` scales gradients.
"""
from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from compressors.options import check_bool, check_float, check_known_options, invalid
from compressors.serialization import register_record

Tensors = dict[str, torch.Tensor]

OPTIMIZERS = ("sgd", "adam", "adamw")
#: optimizer name -> its ``optimizer_options`` and their defaults (torch.optim's defaults).
OPTIMIZER_OPTIONS: dict[str, dict[str, Any]] = {
    "sgd": {},  # momentum and nesterov are Experiment fields
    "adam": {"betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False},
    "adamw": {"betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False},
}


@register_record
class SGDState(NamedTuple):
    momentum: Tensors  # (*shape) per parameter


@register_record
class AdamState(NamedTuple):
    step: int  # updates applied so far (skipped steps do not count), the t of the bias correction
    exp_avg: Tensors  # first moment m, (*shape) per parameter
    exp_avg_sq: Tensors  # second moment v, (*shape) per parameter
    max_exp_avg_sq: Tensors  # amsgrad: running max of v, (*shape); empty without amsgrad


@dataclass(frozen=True)
class SGD:
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    no_decay: frozenset[str] = frozenset()  # parameter names that get no weight decay

    def init(self, params: Tensors) -> SGDState:
        return SGDState({name: torch.zeros_like(p) for name, p in params.items()})

    def step(self, params: Tensors, update: Tensors, state: SGDState, lr: float) -> tuple[Tensors, SGDState]:
        """d = u + wd * theta; m <- mu m + d; step = d + mu m (Nesterov) or m; theta <- theta - lr * step.

        The same operations, in the same order, as ``torch.optim.SGD`` (fused ``add(alpha=)``: one pass each),
        so the big-batch oracle matches it to rounding and big models pay few passes over their parameters.
        """
        new_params, new_momentum = {}, {}
        for name, p in params.items():
            d = update[name].to(p.dtype)
            if self.weight_decay and name not in self.no_decay:
                d = d.add(p, alpha=self.weight_decay)
            if self.momentum:
                m = state.momentum[name].mul(self.momentum).add_(d)
                new_momentum[name] = m
                d = d.add(m, alpha=self.momentum) if self.nesterov else m
            else:
                new_momentum[name] = state.momentum[name]
            new_params[name] = p.add(d, alpha=-lr)
        return new_params, SGDState(new_momentum)


@dataclass(frozen=True)
class Adam:
    """Adam (``decoupled=False``, torch.optim.Adam) or AdamW (``decoupled=True``, torch.optim.AdamW).

    With g the aggregated update, t the step count, lr this step's learning rate:
        Adam:  g <- g + wd * theta                   AdamW: theta <- theta * (1 - lr * wd)
        m <- beta1 m + (1 - beta1) g   (as lerp(m, g, 1 - beta1), torch's form)
        v <- beta2 v + (1 - beta2) g^2
        theta <- theta - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    (amsgrad: v replaced by its running maximum in the denominator; Reddi et al. 2018.)
    """
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False
    amsgrad: bool = False
    no_decay: frozenset[str] = frozenset()  # parameter names that get no weight decay

    def init(self, params: Tensors) -> AdamState:
        zeros = lambda: {name: torch.zeros_like(p) for name, p in params.items()}  # noqa: E731
        return AdamState(0, zeros(), zeros(), zeros() if self.amsgrad else {})

    def step(self, params: Tensors, update: Tensors, state: AdamState, lr: float) -> tuple[Tensors, AdamState]:
        beta1, beta2 = self.betas
        t = state.step + 1
        bias_correction1 = 1 - beta1 ** float(t)  # torch keeps t as a float tensor and reads it with .item()
        bias_correction2 = 1 - beta2 ** float(t)
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2 ** 0.5
        new_params, exp_avgs, exp_avg_sqs, maxima = {}, {}, {}, {}
        for name, p in params.items():
            g = update[name].to(p.dtype)
            if self.weight_decay != 0 and name not in self.no_decay:
                if self.decoupled:
                    p = p.mul(1 - lr * self.weight_decay)
                else:
                    g = g.add(p, alpha=self.weight_decay)
            m = state.exp_avg[name].lerp(g, 1 - beta1)
            v = state.exp_avg_sq[name].mul(beta2).addcmul_(g, g, value=1 - beta2)
            if self.amsgrad:
                v_max = torch.maximum(state.max_exp_avg_sq[name], v)
                maxima[name] = v_max
                denom = (v_max.sqrt() / bias_correction2_sqrt).add_(self.eps)
            else:
                denom = (v.sqrt() / bias_correction2_sqrt).add_(self.eps)
            new_params[name] = p.addcdiv(m, denom, value=-step_size)
            exp_avgs[name], exp_avg_sqs[name] = m, v
        return new_params, AdamState(t, exp_avgs, exp_avg_sqs, maxima)


def check_optimizer_options(optimizer: str, options: Any) -> dict[str, Any]:
    """``optimizer_options`` for ``optimizer`` with defaults filled in; a ValueError names a bad key or value."""
    owner = "Experiment.optimizer_options"
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise invalid("Experiment", "optimizer_options", options, "a mapping of option names to values, e.g. "
                      '{"betas": [0.9, 0.999], "eps": 1e-8}')
    allowed = OPTIMIZER_OPTIONS[optimizer]
    if not allowed and options:
        name = next(iter(options))
        hint = " (momentum and nesterov are Experiment fields)" if name in ("momentum", "nesterov") else ""
        raise ValueError(f"{owner} for {optimizer!r}: unknown option {name!r}; allowed options: none{hint}")
    check_known_options(f"{owner} for {optimizer!r}", options, allowed)
    values = {**allowed, **options}
    if "betas" in allowed:
        betas = values["betas"]
        if (not isinstance(betas, (list, tuple)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise invalid(owner, "betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.999]")
        values["betas"] = (float(betas[0]), float(betas[1]))
        check_float(owner, "eps", values["eps"], minimum=0.0)
        check_bool(owner, "amsgrad", values["amsgrad"])
    return values


def make_optimizer(optimizer: str, options: Mapping[str, Any], *, momentum: float, nesterov: bool,
                   weight_decay: float, no_decay: Iterable[str] = ()) -> SGD | Adam:
    """The optimizer an Experiment names (its fields already validated); ``no_decay``: parameter names without
    weight decay."""
    no_decay = frozenset(no_decay)
    if optimizer == "sgd":
        return SGD(momentum, nesterov, weight_decay, no_decay)
    values = check_optimizer_options(optimizer, options)
    return Adam(values["betas"], float(values["eps"]), weight_decay, decoupled=optimizer == "adamw",
                amsgrad=values["amsgrad"], no_decay=no_decay)


def check_patterns(owner: str, field: str, patterns: Any) -> tuple[str, ...]:
    """A list of non-empty fnmatch patterns (strings) as a tuple; ValueError naming ``field`` otherwise."""
    if isinstance(patterns, (str, bytes)) or not isinstance(patterns, (list, tuple)) or not all(
            isinstance(p, str) and p for p in patterns):
        raise invalid(owner, field, patterns, 'a list of non-empty fnmatch patterns on parameter names, e.g. '
                                              '["*bias", "*norm*"]')
    return tuple(patterns)


def decay_excluded(names: Iterable[str], patterns: Iterable[str]) -> frozenset[str]:
    """The parameter names matching any pattern (``fnmatch.fnmatchcase``: case-sensitive, ``*`` also crosses
    dots). A pattern that matches no parameter warns (a ``UserWarning`` listing the names): it is most likely a
    typo, yet a protocol may share one list across models with and without, say, normalisation layers."""
    names = list(names)
    excluded = set()
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            warnings.warn(f"Experiment.weight_decay_exclude: pattern {pattern!r} matches no parameter of this "
                          f"model (its parameters: {shown})", UserWarning, stacklevel=3)
        excluded.update(matched)
    return frozenset(excluded)


def clip_by_global_norm(update: Tensors, max_norm: float) -> tuple[Tensors, torch.Tensor]:
    """(update scaled by min(1, max_norm / (norm + 1e-6)), norm), norm being the 2-norm of all tensors together
    as a 0-d tensor on their device (read by the caller with its other scalars: no host wait here).

    ``torch.nn.utils.clip_grad_norm_``'s arithmetic (its total norm is ``torch.nn.utils.get_total_norm``; the
    scale is clamped at 1 and always applied, a no-op multiplication below the threshold), on a dict of tensors
    and out of place: the aggregator's update may share storage with its state."""
    if not update:
        return update, torch.zeros(())
    total = torch.nn.utils.get_total_norm(list(update.values()), 2.0)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    return {name: u.mul(scale.to(u.device)) for name, u in update.items()}, total


LR_SCHEDULES = ("step", "cosine", "poly")


def learning_rate(step: int, base: float, warmup_steps: int, milestones: tuple[int, ...] = (), decay: float = 0.1,
                  *, schedule: str = "step", total_steps: int = 0, power: float = 1.0) -> float:
    """The learning rate of 0-based step ``step`` (the one that makes update ``step + 1``).

    Linear warm-up over the first ``warmup_steps`` steps, base * (step + 1) / warmup_steps (Goyal et al. 2017;
    torch's LinearLR from 1 / warmup_steps), then by ``schedule``:
        step    base, x ``decay`` at each milestone passed (milestones count steps from 0, warm-up included;
                torch's MultiStepLR, multiplied by the warm-up factor)
        cosine  base * (1 + cos(pi t / T)) / 2   (torch's CosineAnnealingLR with eta_min = 0, T_max = T)
        poly    base * (1 - t / T) ** power      (torch's PolynomialLR with total_iters = T)
    with t = step - warmup_steps and T = total_steps - warmup_steps: the annealed schedules start at ``base``
    right after the warm-up and would reach 0 at step ``total_steps``, one past the last step of the run.
    """
    if schedule == "step":
        lr = base * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base
        return lr * decay ** sum(1 for m in milestones if step >= m)
    if step < warmup_steps:
        return base * ((step + 1) / warmup_steps)
    t, horizon = step - warmup_steps, total_steps - warmup_steps
    if schedule == "cosine":
        return base * (1 + math.cos(math.pi * t / horizon)) / 2
    if schedule == "poly":
        return base * (1.0 - t / horizon) ** power
    raise invalid("learning_rate", "schedule", schedule, "one of " + ", ".join(map(repr, LR_SCHEDULES)))
