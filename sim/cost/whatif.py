"""What-if tables: time per step of each compressor on each network and worker count, priced from the
ledger of a real simulated step, and time to accuracy.

    sim.whatif("resnet18_cifar", compressors=["identity", {"name": "powersgd", "rank": 2}],
               workers=[4, 16, 64], networks=["ethernet-10g", "infiniband-100g"], compute="v100")

Bits are measured: every compressor runs one real ``aggregate`` on random gradients of the model's shapes
(after its warm-up steps) with 2 virtual workers, and its ledger is priced for p workers. That relabelling
is exact because one worker's payload does not depend on the number of workers for any registered
compressor (``tests/test_cost_whatif.py`` checks it); it keeps a 64-worker ResNet-18 table in memory.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import pandas as pd
import torch

from sim.collective import VirtualCollective

from .compute import (ACCELERATORS, ComputeTime, codec_from_flops, compute_from_flops, forward_flops,
                      measure_codec, measure_compute)
from .presets import resolve_network
from .step_time import BACKWARD_FRACTION, DDP_BUCKET_BYTES, step_time

PROBE_WORKERS = 2
CODECS = ("auto", "measure", "flops", "none")
#: example inputs of one worker's batch for models the table knows by name (the paper's per-worker batches)
PAPER_INPUTS = {
    "resnet18_cifar": lambda batch: torch.empty(batch, 3, 32, 32),  # paper: 128 images per worker
}
PAPER_BATCH = {"resnet18_cifar": 128}


@dataclasses.dataclass
class Source:
    shapes: dict[str, tuple[int, ...]]
    module: torch.nn.Module | None = None  # real weights (for measuring) or on the meta device (for FLOPs)
    example: torch.Tensor | None = None  # one worker's batch
    target: torch.Tensor | None = None
    loss: object = None
    label: str = "model"


def _paper_model(name: str):
    from sim.models import paper

    factory = getattr(paper, name, None)
    if factory is None or not callable(factory):
        raise ValueError(f"whatif: model={name!r} is invalid; allowed: resnet18_cifar, lstm_wikitext2, a module, "
                         "a factory, a dict of shapes or a sim.Experiment")
    return factory


def resolve_source(source, batch_size: int | None = None) -> Source:
    """A dict of shapes, an nn.Module, a factory, a paper model's name, or a sim.Experiment."""
    if isinstance(source, Mapping):
        return Source({str(n): tuple(int(d) for d in s) for n, s in source.items()}, label="shapes")
    if isinstance(source, str):
        factory = _paper_model(source)
        with torch.device("meta"):
            module = factory()
        example = None
        if source in PAPER_INPUTS:
            example = PAPER_INPUTS[source](batch_size or PAPER_BATCH[source]).to("meta")
        return Source(_shapes(module), module, example, label=source)
    if isinstance(source, torch.nn.Module):
        return Source(_shapes(source), source, label=type(source).__name__)
    if hasattr(source, "task") and hasattr(source, "make_compressor"):  # a sim.Experiment
        from sim.models import build
        from sim.tasks import load_task

        task = load_task(source.task, dict(source.task_options), source.torch_dtype)
        module = build(task.model, torch.Generator().manual_seed(source.seed), dtype=source.torch_dtype)
        batch = batch_size or source.batch_size
        return Source(_shapes(module), module, task.train_x[:batch], task.train_y[:batch], task.loss,
                      label=source.task)
    if callable(source):
        with torch.device("meta"):
            module = source()
        return Source(_shapes(module), module, label=getattr(source, "__name__", "model"))
    raise ValueError(f"whatif: experiment_or_shapes={source!r} is invalid; allowed: a dict of shapes, an "
                     "nn.Module, a model factory, a paper model name or a sim.Experiment")


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in module.named_parameters() if p.requires_grad}


def compressor_spec(value) -> dict:
    """A name, a dict {"name": ..., **options}, or "name:key=value,key=value" (values parsed as Python literals)."""
    if isinstance(value, Mapping):
        if "name" not in value:
            raise ValueError(f"whatif: compressors entry {value!r} is invalid; allowed: a dict with a 'name'")
        return dict(value)
    if isinstance(value, str):
        import ast

        name, _, rest = value.partition(":")
        spec: dict = {"name": name.strip()}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, sep, text = item.partition("=")
            if not sep:
                raise ValueError(f"whatif: compressors entry {value!r} is invalid; allowed: 'name:key=value,...'")
            try:
                spec[key.strip()] = ast.literal_eval(text.strip())
            except (ValueError, SyntaxError):
                spec[key.strip()] = text.strip()
        return spec
    raise ValueError(f"whatif: compressors entry {value!r} is invalid; allowed: a name, a dict or 'name:k=v'")


def label(spec: Mapping) -> str:
    options = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"{spec['name']}({options})" if options else str(spec["name"])


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


def _compute(compute, source: Source, precision: str, utilization: float) -> ComputeTime:
    if compute is None:
        if source.example is not None and source.module is not None and source.example.device.type != "meta":
            return measure_compute(source.module, source.example, source.target, source.loss)
        return ComputeTime(0.0, 0.0)
    if isinstance(compute, ComputeTime):
        return compute
    if isinstance(compute, (int, float)) and not isinstance(compute, bool):
        if not (math.isfinite(compute) and compute >= 0):
            raise ValueError(f"whatif: compute={compute!r} is invalid; allowed: seconds >= 0")
        return ComputeTime(compute * (1 - BACKWARD_FRACTION), compute * BACKWARD_FRACTION)
    if compute == "measure":
        if source.example is None or source.example.device.type == "meta":
            raise ValueError("whatif: compute='measure' is invalid for this source; allowed: a sim.Experiment "
                             "(its task gives a batch), or pass seconds or an accelerator name")
        return measure_compute(source.module, source.example, source.target, source.loss)
    if isinstance(compute, str) and compute in ACCELERATORS:
        if source.example is None:
            raise ValueError(f"whatif: compute={compute!r} needs an example batch to count FLOPs; allowed for "
                             f"{', '.join(PAPER_INPUTS)} and sim.Experiment; otherwise pass seconds")
        module = source.module
        example = source.example
        if example.device.type != "meta":
            with torch.device("meta"):
                module = _meta_copy(source)
            example = example.to("meta")
        return compute_from_flops(forward_flops(module, example), compute, precision, utilization)
    raise ValueError(f"whatif: compute={compute!r} is invalid; allowed: None, seconds, a ComputeTime, 'measure' "
                     f"or an accelerator ({', '.join(ACCELERATORS)})")


def _meta_copy(source: Source) -> torch.nn.Module:
    import copy

    return copy.deepcopy(source.module).to("meta")


def whatif(experiment_or_shapes, compressors=("identity", {"name": "powersgd", "rank": 2}), workers=(16,),
           networks=("ethernet-10g",), compute=None, codec: str = "auto", overlap: str = "buckets",
           precision: str = "fp32", utilization: float = 0.4, batch_size: int | None = None,
           bucket_bytes: float = DDP_BUCKET_BYTES, seed: int = 0) -> pd.DataFrame:
    """One row per (compressor, workers, network): seconds per step, its parts, communication share, and
    speedup over the exact all-reduce (identity, always computed as the baseline) at the same workers and
    network. ``compute``: None (measure a sim.Experiment's batch here, else 0), seconds, a ComputeTime,
    'measure', or an accelerator preset. ``codec``: 'auto' (FLOPs on that accelerator when ``compute`` names
    one, else measured here), 'measure', 'flops', 'none'."""
    import compressors as registry

    from .network import check_workers

    if codec not in CODECS:
        raise ValueError(f"whatif: codec={codec!r} is invalid; allowed: {', '.join(CODECS)}")
    workers = [check_workers(p) for p in (workers if isinstance(workers, (list, tuple)) else [workers])]
    nets = [resolve_network(n) for n in (networks if isinstance(networks, (list, tuple)) else [networks])]
    source = resolve_source(experiment_or_shapes, batch_size)
    specs = [compressor_spec(c) for c in compressors]
    if not any(s == {"name": "identity"} for s in specs):
        specs = [{"name": "identity"}] + specs
    timing = _compute(compute, source, precision, utilization)
    dense_bytes = sum(math.prod(s) for s in source.shapes.values()) * 4
    rows = []
    for spec in specs:
        aggregator = registry.make(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
        records = probe_ledger(aggregator, source.shapes, seed)
        codec_seconds = _codec(codec, compute, aggregator, source.shapes, precision, utilization)
        for p in workers:
            priced = [dataclasses.replace(r, workers=p) for r in records]
            for net in nets:
                t = step_time(net, priced, p, timing.total, codec_seconds, overlap,
                              timing.backward_fraction or BACKWARD_FRACTION, bucket_bytes, dense_bytes)
                rows.append({"compressor": label(spec), "workers": p, "network": net.name or "custom",
                             "mb_per_worker": t.bits / 8e6, "collectives": t.collectives,
                             "compute_s": t.compute, "codec_s": t.codec, "comm_s": t.comm,
                             "exposed_comm_s": t.exposed, "step_s": t.total, "comm_share": t.comm_share})
    table = pd.DataFrame(rows)
    baseline = table[table.compressor == "identity"].set_index(["workers", "network"]).step_s
    keys = list(zip(table.workers, table.network))
    table["speedup"] = [baseline[k] / s if s > 0 else 1.0 for k, s in zip(keys, table.step_s)]
    return table


def _codec(codec, compute, aggregator, shapes, precision, utilization) -> float:
    if codec == "none":
        return 0.0
    on_accelerator = isinstance(compute, str) and compute in ACCELERATORS
    if codec == "flops" or (codec == "auto" and on_accelerator):
        if not on_accelerator:
            raise ValueError(f"whatif: codec='flops' needs compute to name an accelerator "
                             f"({', '.join(ACCELERATORS)}), got compute={compute!r}")
        return codec_from_flops(aggregator, shapes, compute, precision, utilization)
    return measure_codec(aggregator, shapes)


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
