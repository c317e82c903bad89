"""What-if tables: time per step of each compressor on each network and worker count, priced from the
ledger of a real simulated step, and time to accuracy.

    sim.whatif("resnet50", compressors=["identity", {"name": "powersgd", "rank": 2}],
               workers=[4, 16, 64], networks=["ethernet-10g", "infiniband-100g"], compute="v100")

Bits are measured: every compressor runs one real ``aggregate`` on random gradients of the model's shapes
(after its warm-up steps) with 2 virtual workers, and its ledger is priced for p workers. That relabelling
is exact because one worker's payload does not depend on the number of workers for any registered
compressor (``tests/test_cost_whatif.py`` checks it); it keeps a 64-worker ResNet-18 table in memory.

Where each time comes from is a column of the table (``compute_source``, ``codec_source``, ``comm_source``):

- compute: ``"flops@v100"`` (the model's forward FLOPs on an example batch, counted by
  ``torch.utils.flop_counter``, x3 for training, over the accelerator's rate), ``"given"`` (seconds or a
  ComputeTime you passed), ``"measured-cpu"`` (timed here: None or "measure" with a sim.Experiment), ``"none"`` (0).
- codec (encode + decode): with an accelerator (``compute="v100"``, or seconds with ``accelerator="v100"``),
  ``"flops@v100"``: the compressor's own FLOPs on one aggregate of the real shapes over that accelerator's rate,
  plus its memory passes (``compute.codec_from_flops``); with seconds and no accelerator, ``"none"``: 0, since
  nothing here knows the target GPU; ``"measured-cpu"`` only when compute is itself measured here, or when
  asked (``codec="measure"``). No clock of this machine enters a table priced for a GPU unless asked, so two
  identical calls give identical tables. An exact aggregator (identity) has codec time exactly 0.
- comm: ``"ledger+network"``: the probed step's ledger priced on the network's alpha-beta model (``step_time``).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import pandas as pd
import torch

from compressors.comm import VirtualCollective
from compressors.degenerate import DENSE_SUFFIX, sends_dense, warn_if_dense
from compressors.options import MAX_SEED, check_float, check_int, closest
from compressors.spec import parse_spec, spec_label
from ..models import build
from ..tasks import load_task
from .compute import (ACCELERATORS, PRECISIONS, ComputeTime, codec_from_flops, compute_from_flops, forward_flops,
    measure_codec, measure_compute, resolve_precision)
from .network import check_workers
from .presets import resolve_network
from .step_time import BACKWARD_FRACTION, DDP_BUCKET_BYTES, OVERLAPS, step_time

import compressors as registry

PROBE_WORKERS = 2
CODECS = ("auto", "measure", "flops", "none")


def _images(size: int):
    return lambda batch: torch.empty(batch, 3, size, size, device="meta")


def _tokens(length: int):
    return lambda batch: torch.zeros(batch, length, dtype=torch.long, device="meta")


#: Models known by name: module (sim.models), file, and one worker's example batch (default size, builder).
#: Batches: resnet18_cifar 128 images (the PowerSGD paper); resnet50 32 images of 224x224 (Goyal et al. 2017,
#: 32 per GPU); vit_b16 32 images of 224x224, bert_base 32 sequences of 128 tokens (BERT's first pre-training
#: phase length), gpt2 8 sequences of 1024 tokens: assumptions, change them with ``batch_size``.
MODELS = {
    "resnet18_cifar": ("paper", 128, _images(32)),
    "lstm_wikitext2": ("paper", None, None),
    "resnet50": ("resnet", 32, _images(224)),
    "vit_b16": ("vit", 32, _images(224)),
    "bert_base": ("bert", 32, _tokens(128)),
    "gpt2": ("gpt2", 8, _tokens(1024)),
}


@dataclasses.dataclass
class Source:
    shapes: dict[str, tuple[int, ...]]
    module: torch.nn.Module | None = None  # real weights (for measuring) or on the meta device (for FLOPs)
    example: torch.Tensor | None = None  # one worker's batch
    target: torch.Tensor | None = None
    loss: object = None
    label: str = "model"


def named_model(name: str):
    import importlib

    if name not in MODELS:
        raise ValueError(f"whatif: model={name!r} is invalid{closest(name, MODELS)}; allowed: {', '.join(MODELS)}, "
                         "an nn.Module (with example_input for FLOPs), a factory, a dict of shapes or a sim.Experiment")
    family, batch, example = MODELS[name]
    return getattr(importlib.import_module(f"sim.models.{family}"), name), batch, example


def resolve_source(source, batch_size: int | None = None, example_input: torch.Tensor | None = None) -> Source:
    """A dict of shapes, an nn.Module (``example_input``: one worker's batch, for FLOPs), a factory, a named
    model (``MODELS``), or a sim.Experiment."""
    if isinstance(source, Mapping):
        return Source({str(n): tuple(int(d) for d in s) for n, s in source.items()}, label="shapes")
    if isinstance(source, str):
        factory, batch, example = named_model(source)
        with torch.device("meta"):
            module = factory()
        if example_input is None and example is not None:
            example_input = example(batch_size or batch)
        return Source(_shapes(module), module, example_input, label=source)
    if isinstance(source, torch.nn.Module):
        return Source(_shapes(source), source, example_input, label=type(source).__name__)
    if hasattr(source, "task") and hasattr(source, "make_compressor"):  # a sim.Experiment

        task = load_task(source.task, dict(source.task_options), source.torch_dtype)
        module = build(task.model, torch.Generator().manual_seed(source.seed), dtype=source.torch_dtype)
        batch = batch_size or source.batch_size
        return Source(_shapes(module), module, task.train_x[:batch], task.train_y[:batch], task.loss,
                      label=source.task)
    if callable(source):
        with torch.device("meta"):
            module = source()
        return Source(_shapes(module), module, example_input, label=getattr(source, "__name__", "model"))
    raise ValueError(f"whatif: experiment_or_shapes={source!r} is invalid; allowed: a dict of shapes, an "
                     f"nn.Module, a model factory, a model name ({', '.join(MODELS)}) or a sim.Experiment")


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in module.named_parameters() if p.requires_grad}


def compressor_spec(value) -> dict:
    """A name, a dict {"name": ..., **options}, or "name:key=value:key=value" (``compressors.spec``)."""
    return parse_spec(value, "whatif", "compressors")


def probe_ledger(aggregator, shapes, seed: int = 0, workers: int = PROBE_WORKERS):
    """The ledger records of one real step after the aggregator's warm-up, with ``workers`` virtual workers."""
    generator = torch.Generator().manual_seed(seed)
    state = aggregator.init(shapes, workers=workers, seed=seed)
    grads = {n: torch.randn((workers, *s), generator=generator) for n, s in shapes.items()}  # (W, *shape)
    for _ in range(getattr(aggregator, "steps", 0)):  # a Warmup wrapper's dense steps
        _, state = aggregator.aggregate(grads, state, VirtualCollective(workers))
    comm = VirtualCollective(workers)
    aggregator.aggregate(grads, state, comm)
    return list(comm.ledger)


def _measurable(source: Source) -> bool:
    return source.example is not None and source.module is not None and source.example.device.type != "meta"


def _compute(compute, source: Source, precision: str, utilization: float) -> tuple[ComputeTime, str]:
    """(forward and backward seconds, where they come from)."""
    if compute is None:
        if _measurable(source):
            return measure_compute(source.module, source.example, source.target, source.loss), "measured-cpu"
        return ComputeTime(0.0, 0.0), "none"
    if isinstance(compute, ComputeTime):
        return compute, "given"
    if isinstance(compute, (int, float)) and not isinstance(compute, bool):
        if not (math.isfinite(compute) and compute >= 0):
            raise ValueError(f"whatif: compute={compute!r} is invalid; allowed: seconds >= 0")
        return ComputeTime(compute * (1 - BACKWARD_FRACTION), compute * BACKWARD_FRACTION), "given"
    if compute == "measure":
        if not _measurable(source):
            raise ValueError("whatif: compute='measure' is invalid for this source; allowed: a sim.Experiment "
                             "(its task gives a batch) or a module with a real example_input, or pass seconds or "
                             "an accelerator name")
        return measure_compute(source.module, source.example, source.target, source.loss), "measured-cpu"
    if isinstance(compute, str) and compute in ACCELERATORS:
        if source.example is None or source.module is None:
            raise ValueError(f"whatif: compute={compute!r} needs an example batch to count FLOPs; allowed for the "
                             f"named models ({', '.join(n for n, m in MODELS.items() if m[2])}), a module with "
                             "example_input, and a sim.Experiment; otherwise pass seconds")
        module, example = source.module, source.example
        if example.device.type != "meta":
            module, example = _meta_copy(source), example.to("meta")
        return compute_from_flops(forward_flops(module, example), compute, precision, utilization), f"flops@{compute}"
    raise ValueError(f"whatif: compute={compute!r} is invalid; allowed: None, seconds, a ComputeTime, 'measure' "
                     f"or an accelerator ({', '.join(ACCELERATORS)})")


def _meta_copy(source: Source) -> torch.nn.Module:
    import copy

    return copy.deepcopy(source.module).to("meta")


def codec_source(codec: str, compute, compute_source: str, accelerator: str | None) -> str:
    """Where the encode/decode time comes from: "flops@<accelerator>", "measured-cpu" or "none" (0)."""
    target = compute if isinstance(compute, str) and compute in ACCELERATORS else accelerator
    if codec == "none":
        return "none"
    if codec == "measure":
        return "measured-cpu"
    if codec == "flops":
        if target is None:
            raise ValueError(f"whatif: codec='flops' needs an accelerator: compute= or accelerator= one of "
                             f"{', '.join(ACCELERATORS)} (got compute={compute!r}, accelerator=None)")
        return f"flops@{target}"
    if target is not None:  # auto
        return f"flops@{target}"
    return "measured-cpu" if compute_source == "measured-cpu" else "none"


def whatif(experiment_or_shapes, compressors=("identity", {"name": "powersgd", "rank": 2}), workers=(16,),
           networks=("ethernet-10g",), compute=None, codec: str = "auto", overlap: str = "buckets",
           precision: str = "auto", utilization: float = 0.4, batch_size: int | None = None,
           bucket_bytes: float = DDP_BUCKET_BYTES, seed: int = 0, accelerator: str | None = None,
           example_input: torch.Tensor | None = None) -> pd.DataFrame:
    """One row per (compressor, workers, network): seconds per step, its parts and where each comes from,
    communication share, and speedup over the exact all-reduce (identity, always computed as the baseline) at
    the same workers and network. ``does_it_pay(table)`` is the compact view; the long table is for CSV.

    experiment_or_shapes: a named model (``MODELS``: resnet18_cifar, lstm_wikitext2, resnet50, vit_b16,
    bert_base, gpt2), an nn.Module (``example_input``: one worker's batch, to count FLOPs), a factory, a dict of
    shapes, or a sim.Experiment. compressors: names, dicts or specs ("powersgd:rank=2", ``compressors.spec``).
    compute: None (measured here for a sim.Experiment, else 0), seconds on the
    target, a ComputeTime, 'measure', or an accelerator preset (FLOPs). accelerator: the target GPU when
    ``compute`` is seconds, so encode/decode is priced from FLOPs on it. codec: 'auto' (FLOPs on the
    accelerator when one is known, else measured here only if compute is measured here, else 0), 'flops',
    'measure' (this machine's clock), 'none' (0). precision: the FLOP rate FLOP counts are priced at: 'auto'
    (default: what training on that accelerator uses, mixed precision at the fp16/bf16 tensor-core rate),
    'fp32', 'fp16' or 'bf16'; the table's ``precision`` column says which was used. With 'auto' the
    compressor's encode/decode is priced at fp32 (mixed precision keeps fp32 gradients); an explicit precision
    prices both. Compressor configurations
    that send at least the dense bits are labelled "(dense)" and warn once.

    Every argument is checked (ValueError naming it) before the model is built or anything is counted.
    """
    target = check_arguments(compute, codec, overlap, precision, utilization, batch_size, bucket_bytes, seed,
                             accelerator)
    # mixed precision (torch.amp) keeps fp32 parameters and gradients: the model's matmuls run at the tensor-core
    # rate, the compressor's, on the fp32 gradients, at the fp32 rate
    codec_precision = "fp32" if precision == "auto" else precision
    precision = resolve_precision(precision, target)
    workers = [check_workers(p) for p in (workers if isinstance(workers, (list, tuple)) else [workers])]
    nets = [resolve_network(n) for n in (networks if isinstance(networks, (list, tuple)) else [networks])]
    if isinstance(compressors, (str, Mapping)) or not compressors:
        raise ValueError(f"whatif: compressors={compressors!r} is invalid; allowed: a non-empty list of names, "
                         "dicts or specs such as 'powersgd:rank=2'")
    specs = [compressor_spec(c) for c in compressors]
    if not any(s == {"name": "identity"} for s in specs):
        specs = [{"name": "identity"}] + specs
    aggregators = [registry.make(spec["name"], **{k: v for k, v in spec.items() if k != "name"}) for spec in specs]
    source = resolve_source(experiment_or_shapes, batch_size, example_input)
    timing, compute_from = _compute(compute, source, precision, utilization)
    codec_from = codec_source(codec, compute, compute_from, accelerator)
    # the precision matters only where a FLOP count is priced on an accelerator
    priced_at = precision if "flops@" in compute_from + codec_from else "none"
    dense_bytes = sum(math.prod(s) for s in source.shapes.values()) * 4
    rows = []
    for spec, aggregator in zip(specs, aggregators):
        records = probe_ledger(aggregator, source.shapes, seed)
        codec_seconds = _codec(codec_from, aggregator, source.shapes, codec_precision, utilization)
        name = spec_label(spec)
        if spec["name"] != "identity" and sends_dense(aggregator, source.shapes):
            warn_if_dense(aggregator, source.shapes, name)
            name += DENSE_SUFFIX
        for p in workers:
            priced = [dataclasses.replace(r, workers=p) for r in records]
            for net in nets:
                t = step_time(net, priced, p, timing.total, codec_seconds, overlap,
                              timing.backward_fraction or BACKWARD_FRACTION, bucket_bytes, dense_bytes)
                rows.append({"compressor": name, "workers": p, "network": net.name or "custom",
                             "mb_per_worker": t.bits / 8e6, "collectives": t.collectives,
                             "compute_s": t.compute, "codec_s": t.codec, "comm_s": t.comm,
                             "exposed_comm_s": t.exposed, "step_s": t.total, "comm_share": t.comm_share,
                             "compute_source": compute_from, "codec_source": codec_from,
                             "comm_source": "ledger+network", "precision": priced_at})
    table = pd.DataFrame(rows)
    baseline = table[table.compressor == "identity"].set_index(["workers", "network"]).step_s
    keys = list(zip(table.workers, table.network))
    table["speedup"] = [baseline[k] / s if s > 0 else 1.0 for k, s in zip(keys, table.step_s)]
    return table


def check_arguments(compute, codec, overlap, precision, utilization, batch_size, bucket_bytes, seed,
                    accelerator) -> str | None:
    """Every cheap check of ``whatif``'s arguments (before any model is built or probed); returns the target
    accelerator (``compute`` when it names one, else ``accelerator``) or None."""
    if codec not in CODECS:
        raise ValueError(f"whatif: codec={codec!r} is invalid; allowed: {', '.join(CODECS)}")
    if accelerator is not None and accelerator not in ACCELERATORS:
        raise ValueError(f"whatif: accelerator={accelerator!r} is invalid; allowed: None or {', '.join(ACCELERATORS)}")
    if overlap not in OVERLAPS:
        raise ValueError(f"whatif: overlap={overlap!r} is invalid; allowed: {', '.join(OVERLAPS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"whatif: precision={precision!r} is invalid; allowed: {', '.join(PRECISIONS)} ('auto': "
                         "the accelerator's mixed precision, fp16 or bf16)")
    check_float("whatif", "utilization", utilization, minimum=0.0, maximum=1.0, min_inclusive=False)
    if batch_size is not None:
        check_int("whatif", "batch_size", batch_size, minimum=1)
    check_float("whatif", "bucket_bytes", bucket_bytes, minimum=0.0, min_inclusive=False)
    check_int("whatif", "seed", seed, minimum=0, maximum=MAX_SEED)
    given = isinstance(compute, (int, float)) and not isinstance(compute, bool)
    if given and not (math.isfinite(compute) and compute >= 0):
        raise ValueError(f"whatif: compute={compute!r} is invalid; allowed: seconds >= 0")
    if not (compute is None or given or isinstance(compute, ComputeTime) or compute == "measure"
            or (isinstance(compute, str) and compute in ACCELERATORS)):
        raise ValueError(f"whatif: compute={compute!r} is invalid; allowed: None, seconds, a ComputeTime, 'measure' "
                         f"or an accelerator ({', '.join(ACCELERATORS)})")
    if codec == "flops" and not (isinstance(compute, str) and compute in ACCELERATORS) and accelerator is None:
        raise ValueError(f"whatif: codec='flops' needs an accelerator: compute= or accelerator= one of "
                         f"{', '.join(ACCELERATORS)} (got compute={compute!r}, accelerator=None)")
    return compute if isinstance(compute, str) and compute in ACCELERATORS else accelerator


def _codec(source: str, aggregator, shapes, precision, utilization) -> float:
    if source == "none":
        return 0.0
    if source == "measured-cpu":
        return measure_codec(aggregator, shapes)
    return codec_from_flops(aggregator, shapes, source.removeprefix("flops@"), precision, utilization)


def does_it_pay(table: pd.DataFrame) -> pd.DataFrame:
    """The compact view of a what-if table: speedup over the exact all-reduce, one row per compressor, one
    column per (network, workers). > 1: compression pays on that network at that scale."""
    for column in ("compressor", "network", "workers", "speedup"):
        if column not in table:
            raise ValueError(f"does_it_pay: column {column!r} is missing; allowed: a sim.whatif table")
    order = list(dict.fromkeys(table.compressor))
    wide = table.pivot_table(index="compressor", columns=["network", "workers"], values="speedup", sort=False)
    return wide.reindex(order)


def format_does_it_pay(table: pd.DataFrame) -> str:
    """``does_it_pay`` as text, with a line saying where each time column came from and at which precision FLOPs
    were priced."""
    wide = does_it_pay(table).map(lambda v: f"{v:.2f}x")
    wide.columns = [f"{net} x{p}" for net, p in wide.columns]
    sources = ", ".join(f"{c.removesuffix('_source')}: {'/'.join(dict.fromkeys(table[c]))}"
                        for c in ("compute_source", "codec_source", "comm_source") if c in table)
    with pd.option_context("display.width", 200, "display.max_columns", 100):
        body = wide.to_string()
    precision = [p for p in dict.fromkeys(table["precision"]) if p != "none"] if "precision" in table else []
    priced = (f"; FLOPs priced at {'/'.join(precision)}" + (" (mixed precision, tensor cores)" if precision != ["fp32"]
              else " (fp32 peak; precision='auto' prices mixed precision)")) if precision else ""
    return (f"does it pay? speedup per step over the exact all-reduce (>1.00x: compression pays)\n{body}\n"
            f"times from {sources}{priced}")


def time_to_accuracy(history: pd.DataFrame, target: float, step_time: float, metric: str = "test_accuracy",
                     step_column: str = "step") -> float:
    """Seconds to reach ``metric >= target``: (first logged step reaching it) x seconds per step.
    ``step_column`` counts steps completed (``sim.run``'s history: 1 after the first step). ``math.inf`` if
    never reached."""
    for column in (metric, step_column):
        if column not in history.columns:
            raise ValueError(f"time_to_accuracy: column {column!r} is missing; allowed: {', '.join(history.columns)}")
    if not (isinstance(step_time, (int, float)) and math.isfinite(step_time) and step_time >= 0):
        raise ValueError(f"time_to_accuracy: step_time={step_time!r} is invalid; allowed: seconds >= 0")
    reached = history[history[metric] >= target]
    if reached.empty:
        return math.inf
    return int(reached[step_column].iloc[0]) * float(step_time)
