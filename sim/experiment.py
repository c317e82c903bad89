"""``Experiment``: everything that defines a simulated run, validated at construction.

Frozen: derive variants with ``experiment.replace(**fields)`` or ``experiment.with_overrides({"compressor.rank": 2})``.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

import compressors
from compressors.options import MAX_SEED, check_bool, check_choice, check_float, check_int, check_known_options, invalid
from .cost import resolve_network
from .engine import ENGINES
from .optim import (LR_SCHEDULES, OPTIMIZERS, check_optimizer_options, check_patterns, decay_excluded, learning_rate,
    make_optimizer)
from .sharding import SHARDINGS
from .tasks import TASK_REGISTRY, validate_task

DTYPES = {"float32": torch.float32, "float64": torch.float64}
AUTOCAST = {None: None, "bfloat16": torch.bfloat16}  # Experiment.autocast -> the dtype of autocast regions
NONFINITE_POLICIES = ("raise", "skip_step")
NESTED_FIELDS = ("compressor", "task_options", "optimizer_options")  # tables of options: dotted keys reach inside
UPDATE_HEADROOM = 1e6  # lr and weight_decay are at most finfo(dtype).max / this (see Experiment._check_step_sizes)


@dataclass(frozen=True)
class Experiment:
    task: str = "digits-mlp"
    workers: int = 8
    steps: int = 300
    batch_size: int = 32  # per worker
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    lr_warmup_steps: int = 0
    lr_milestones: tuple[int, ...] = ()
    lr_decay: float = 0.1
    # "step": lr_milestones/lr_decay above; "cosine": lr -> 0 over the steps after the warm-up; "poly":
    # lr * (1 - t/T) ** lr_poly_power (t, T: steps since / after the warm-up). See sim.optim.learning_rate.
    lr_schedule: str = "step"
    lr_poly_power: float = 1.0
    weight_decay_exclude: tuple[str, ...] = ()  # fnmatch patterns on parameter names: no weight decay for those
    # Clip the aggregated update (the one every worker applies) to this global 2-norm before the optimizer; not
    # per-worker gradient clipping. None: off.
    clip_grad_norm: float | None = None
    # Hold out this fraction of the training set (a fixed split, the same for every seed: sim.tasks.split) and
    # log val_loss / val_accuracy on evaluated steps. 0: no validation split.
    validation_fraction: float = 0.0
    # applied to the aggregated update: "sgd" (momentum, nesterov above), "adam" or "adamw" (betas, eps, amsgrad
    # in optimizer_options; lr, weight_decay, warm-up and decay shared). See sim/optim.py.
    optimizer: str = "sgd"
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)
    # {"name": "powersgd", "rank": 2} or the spec string "powersgd:rank=2" (compressors.spec); stored as the mapping
    compressor: Mapping[str, Any] | str = field(default_factory=lambda: {"name": "identity"})
    task_options: Mapping[str, Any] = field(default_factory=dict)
    sharding: str = "iid"
    label_skew_alpha: float = 0.5  # Dirichlet concentration for sharding="label_skew"; smaller is more skewed
    seed: int = 0
    eval_every: int = 50  # evaluate on the test split every this many steps (and at the last step); 0: last only
    log_every: int = 1
    # "auto": the loop engine for models with convolutions, BatchNorm, embeddings or recurrent layers, vmap
    # otherwise (a static rule on the model, never a timing, so the same experiment always uses the same engine:
    # ``sim.engine.resolve_engine``). "vmap" / "loop" force one.
    engine: str = "auto"
    dtype: str = "float32"
    network: Any = None  # None, a preset name, a dict or a sim.cost.Network: adds a `sim_time` column
    nonfinite: str = "raise"  # NaN/Inf gradients: "raise" or "skip_step" (drop the step, keep state clean)
    # compression_error needs the exact mean gradient: free in the simulator, but on real processes a dense
    # all-reduce (untracked by the ledger) every measured step. 0: never; real-speed runs should use 0 or large.
    compression_error_every: int = 1
    keep_ledger: bool = False  # keep every ledger record of the run's collective; False: totals only (flat memory)
    # Where the whole run lives (model, task data, gradients, compressor and optimizer state): any torch device
    # string, e.g. "cuda", "cuda:1", "cpu"; "meta" runs shapes only (placement tests). Generator states stay on
    # the CPU. A placement, not part of the configuration: a checkpoint resumes on any device.
    device: str = "cpu"
    # None, or "bfloat16": forward and backward under torch.autocast on the run's device; parameters, optimizer,
    # error-feedback and compressor state stay in ``dtype`` (float32), and compressors see float32 gradients.
    autocast: str | None = None

    def __post_init__(self):
        own = "Experiment"
        if not isinstance(self.task_options, Mapping):
            raise invalid(own, "task_options", self.task_options, "a mapping of option names to values")
        validate_task(self.task, dict(self.task_options))
        check_int(own, "workers", self.workers, minimum=1)
        check_int(own, "steps", self.steps, minimum=1)
        check_int(own, "batch_size", self.batch_size, minimum=1)
        check_float(own, "lr", self.lr, minimum=0.0, min_inclusive=False)
        check_float(own, "momentum", self.momentum, minimum=0.0, maximum=1.0, max_inclusive=False)
        check_bool(own, "nesterov", self.nesterov)
        if self.nesterov and self.momentum == 0:
            raise invalid(own, "nesterov", True, "False when momentum == 0 (Nesterov needs momentum)")
        check_float(own, "weight_decay", self.weight_decay, minimum=0.0)
        check_int(own, "lr_warmup_steps", self.lr_warmup_steps, minimum=0)
        milestones = self.lr_milestones
        if not isinstance(milestones, (list, tuple)) or not all(
                isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in milestones):
            raise invalid(own, "lr_milestones", milestones, "a list of step numbers >= 0")
        object.__setattr__(self, "lr_milestones", tuple(sorted(milestones)))
        check_float(own, "lr_decay", self.lr_decay, minimum=0.0, maximum=1.0, min_inclusive=False)
        self._check_training_options()
        self._check_optimizer()
        self._check_compressor()
        check_choice(own, "sharding", self.sharding, SHARDINGS)
        check_float(own, "label_skew_alpha", self.label_skew_alpha, minimum=0.0, min_inclusive=False)
        check_int(own, "seed", self.seed, minimum=0, maximum=MAX_SEED)
        check_int(own, "eval_every", self.eval_every, minimum=0)
        check_int(own, "log_every", self.log_every, minimum=1)
        check_choice(own, "engine", self.engine, ENGINES)
        check_choice(own, "dtype", self.dtype, DTYPES)
        self._check_step_sizes()
        check_choice(own, "nonfinite", self.nonfinite, NONFINITE_POLICIES)
        check_bool(own, "keep_ledger", self.keep_ledger)
        check_int(own, "compression_error_every", self.compression_error_every, minimum=0)
        if self.network is not None:
            resolve_network(self.network)
        self._check_placement()

    def _check_placement(self):
        if not isinstance(self.device, str):
            raise invalid("Experiment", "device", self.device, 'a torch device string, e.g. "cpu", "cuda", "cuda:1"')
        try:
            torch.device(self.device)
        except (RuntimeError, ValueError):
            raise invalid("Experiment", "device", self.device, 'a torch device string, e.g. "cpu", "cuda", '
                          '"cuda:1", "meta"') from None
        check_choice("Experiment", "autocast", self.autocast, AUTOCAST)
        if self.autocast is not None and self.dtype != "float32":
            raise invalid("Experiment", "autocast", self.autocast, f"None with dtype={self.dtype!r} (autocast "
                          "computes in a 16-bit type around float32 parameters: use dtype='float32')")

    def _check_training_options(self):
        """lr_schedule and its options, weight_decay_exclude, clip_grad_norm, validation_fraction."""
        own = "Experiment"
        check_choice(own, "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_float(own, "lr_poly_power", self.lr_poly_power, minimum=0.0, min_inclusive=False)
        # A field of another schedule would be silently ignored: refuse it, as momentum with Adam.
        owners = {"lr_milestones": "step", "lr_decay": "step", "lr_poly_power": "poly"}
        for name, schedule in owners.items():
            if self.lr_schedule != schedule and getattr(self, name) != _FIELD_DEFAULTS[name]:
                raise invalid(own, name, getattr(self, name),
                              f"{_FIELD_DEFAULTS[name]!r} (the default) with lr_schedule={self.lr_schedule!r}: "
                              f"{name} applies only to lr_schedule={schedule!r}")
        object.__setattr__(self, "weight_decay_exclude",
                           check_patterns(own, "weight_decay_exclude", self.weight_decay_exclude))
        if self.clip_grad_norm is not None:
            check_float(own, "clip_grad_norm", self.clip_grad_norm, minimum=0.0, min_inclusive=False)
        check_float(own, "validation_fraction", self.validation_fraction, minimum=0.0, maximum=1.0,
                    max_inclusive=False)

    def _check_optimizer(self):
        check_choice("Experiment", "optimizer", self.optimizer, OPTIMIZERS)
        if self.optimizer != "sgd":  # momentum/nesterov are SGD's; Adam's moments are optimizer_options["betas"]
            for name in ("momentum", "nesterov"):
                default = _FIELD_DEFAULTS[name]
                if getattr(self, name) != default:
                    raise invalid("Experiment", name, getattr(self, name),
                                  f"{default!r} (the default) with optimizer={self.optimizer!r}: {name} applies only "
                                  "to optimizer='sgd'; Adam's averaging is optimizer_options['betas']")
        check_optimizer_options(self.optimizer, self.optimizer_options)  # raises naming the bad option
        options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.optimizer_options.items()}
        object.__setattr__(self, "optimizer_options", options)  # plain data: the same after a JSON round trip

    def make_optimizer(self, parameter_names: Iterable[str] = ()):
        """The optimizer; ``parameter_names`` (the model's) resolve ``weight_decay_exclude`` (a pattern matching
        none of them warns: ``sim.optim.decay_excluded``)."""
        no_decay = decay_excluded(parameter_names, self.weight_decay_exclude) if self.weight_decay_exclude else ()
        return make_optimizer(self.optimizer, self.optimizer_options, momentum=self.momentum, nesterov=self.nesterov,
                              weight_decay=self.weight_decay, no_decay=no_decay)

    def learning_rate(self, step: int) -> float:
        """The learning rate of 0-based step ``step`` under this experiment's schedule (``sim.optim.learning_rate``)."""
        return learning_rate(step, self.lr, self.lr_warmup_steps, self.lr_milestones, self.lr_decay,
                             schedule=self.lr_schedule, total_steps=self.steps, power=self.lr_poly_power)

    def _check_step_sizes(self):
        """lr and weight_decay must leave room in the run's dtype: at most finfo(dtype).max / UPDATE_HEADROOM.

        The parameter step is lr * (update + weight_decay * theta); with a larger lr an update of magnitude
        UPDATE_HEADROOM (1e6, well within what gradients reach early in training) already overflows to Inf, and
        lr = 1e39 is not even a float32 number. Smaller values that still overflow are caught after each step
        (the ``nonfinite`` policy)."""
        limit = torch.finfo(self.torch_dtype).max / UPDATE_HEADROOM
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if value > limit:
                raise invalid("Experiment", name, value, f"at most {limit:.3g} for dtype={self.dtype!r} "
                              f"(torch.finfo({self.dtype}).max / {UPDATE_HEADROOM:g}: lr * |update| must stay "
                              f"finite for updates up to {UPDATE_HEADROOM:g})")

    def _check_compressor(self):
        # a spec string ("powersgd:rank=2") or a mapping with a "name" key; stored as the mapping
        object.__setattr__(self, "compressor", compressors.parse_spec(self.compressor, "Experiment", "compressor"))
        object.__setattr__(self, "task_options", dict(self.task_options))
        self.make_compressor()  # raises ValueError naming the bad option

    def make_compressor(self) -> compressors.Aggregator:
        options = {k: v for k, v in self.compressor.items() if k != "name"}
        return compressors.make(self.compressor["name"], **options)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "Experiment":
        """From plain data (a JSON/YAML config file): unknown keys raise ValueError naming the closest field."""
        if not isinstance(config, Mapping):
            raise invalid("Experiment", "config", config, "a mapping of Experiment field names to values")
        check_known_options("Experiment", config, [f.name for f in dataclasses.fields(cls)])
        return cls(**config)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST[self.autocast]

    def replace(self, **changes) -> "Experiment":
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Experiment":
        """Apply dotted keys: "lr", "compressor.rank", "task_options.hidden", "optimizer_options.eps"
        ("compressor.name" switches it)."""
        fields = {f.name for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            head, _, rest = key.partition(".")
            check_known_options("Experiment", [head], fields)
            if rest:
                if head not in NESTED_FIELDS:
                    raise invalid("Experiment", key, value, "dotted keys only under "
                                  + ", ".join(f"'{n}.'" for n in NESTED_FIELDS))
                if head == "compressor" and isinstance(changes.get(head), str):  # a spec, then options on it
                    changes[head] = compressors.parse_spec(changes[head], "Experiment", key)
                nested = changes.setdefault(head, copy.deepcopy(dict(getattr(self, head))))
                nested[rest] = value
            else:
                changes[head] = value
        return self.replace(**changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["lr_milestones"] = list(self.lr_milestones)
        out["weight_decay_exclude"] = list(self.weight_decay_exclude)
        if self.network is not None and not isinstance(self.network, (str, dict)):
            out["network"] = dataclasses.asdict(self.network) if dataclasses.is_dataclass(self.network) else repr(self.network)
        return out


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Experiment) if f.default is not dataclasses.MISSING}


def registering_modules() -> list[str]:
    """Modules (other than this package's and a script's ``__main__``) that registered a task or a compressor:
    a spawned process starts fresh, so it imports them again to know those names (``sim.run_distributed``)."""

    found = [getattr(f, "__module__", None) for f in [*TASK_REGISTRY.values(), *compressors.REGISTRY.values()]]
    return sorted({m for m in found if m and m.split(".")[0] not in ("sim", "compressors", "__main__", "__mp_main__")})
