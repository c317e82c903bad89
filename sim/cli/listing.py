"""``python -m sim list tasks|compressors|optimizers|networks|accelerators|models``: what exists, with options.

    python -m sim list tasks                         # every task and its task_options with defaults
    python -m sim list compressors --json            # machine-readable
    python -m sim list tasks --import examples.own_model   # your registered tasks too

Everything is read from the live registries (``sim.tasks.TASK_REGISTRY``, ``compressors.REGISTRY``,
``sim.cost.PRESETS``, ...), so what a module registers appears as soon as it is imported.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from ..cost import ACCELERATORS, PRESETS
from ..cost.whatif import MODELS, named_model
from ..experiment import Experiment
from ..optim import OPTIMIZER_OPTIONS
from ..tasks import BUILT_IN_TASKS, TASK_REGISTRY, task_options
from .arguments import add_import_option
import compressors


def tasks() -> list[dict[str, Any]]:
    return [{"name": name, "options": task_options(name), "origin": "built-in" if name in BUILT_IN_TASKS else
             getattr(TASK_REGISTRY[name], "__module__", "registered")} for name in TASK_REGISTRY]


def compressor_list() -> list[dict[str, Any]]:
    return [{"name": name, "options": compressors.options_of(name)} for name in sorted(compressors.REGISTRY)]


def optimizers() -> list[dict[str, Any]]:
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(Experiment)}
    shared = ["lr", "weight_decay", "weight_decay_exclude", "lr_warmup_steps", "lr_schedule", "lr_milestones",
              "lr_decay", "lr_poly_power", "clip_grad_norm"]
    fields = {name: shared + (["momentum", "nesterov"] if name == "sgd" else []) for name in OPTIMIZER_OPTIONS}
    return [{"name": name, "options": dict(options), "experiment_fields": {k: defaults[k] for k in fields[name]}}
            for name, options in OPTIMIZER_OPTIONS.items()]


def networks() -> list[dict[str, Any]]:
    rows = []
    for name, net in PRESETS.items():
        row = {"name": name, "options": {"alpha_us": net.alpha * 1e6, "gbit_per_s": net.bandwidth * 8 / 1e9}}
        if net.devices_per_node > 1:
            row["options"].update(devices_per_node=net.devices_per_node,
                                  intra_gbit_per_s=(net.intra_bandwidth or net.bandwidth) * 8 / 1e9)
        rows.append(row)
    return rows


def accelerators() -> list[dict[str, Any]]:
    return [{"name": a.name, "options": {"fp32_tflops": a.fp32_tflops, "half_tflops": a.half_tflops,
                                         "memory_gb_per_s": a.memory_gbs}} for a in ACCELERATORS.values()]


def models() -> list[dict[str, Any]]:
    """Models ``whatif --model`` knows by name (``sim.cost.whatif.MODELS``): parameter count (built on the meta
    device: no memory, no random draws) and the per-worker batch their FLOPs are counted on."""
    import torch

    rows = []
    for name, (_, batch, example) in MODELS.items():
        factory, _, _ = named_model(name)
        with torch.device("meta"):
            module = factory()
        options = {"parameters": sum(p.numel() for p in module.parameters())}
        options["batch_per_worker"] = batch if example is not None else None  # None: no example input, no FLOPs
        rows.append({"name": name, "options": options})
    return rows


KINDS = {"tasks": tasks, "compressors": compressor_list, "optimizers": optimizers, "networks": networks,
         "accelerators": accelerators, "models": models}


def add_list(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=list(KINDS), metavar="{" + ",".join(KINDS) + "}",
                        help="what to list, e.g. tasks (with their task_options and defaults)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table, e.g. for scripts")
    add_import_option(parser)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (list, tuple, dict, str, bool)) or value is None else str(value)


def run_list(args: argparse.Namespace) -> int:
    rows = KINDS[args.kind]()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    width = max((len(r["name"]) for r in rows), default=0)
    for row in rows:
        options = ", ".join(f"{k}={_format(v)}" for k, v in row["options"].items()) or "(no options)"
        extra = ""
        if "experiment_fields" in row:
            extra = "; Experiment fields " + ", ".join(f"{k}={_format(v)}" for k, v in row["experiment_fields"].items())
        if row.get("origin", "built-in") != "built-in":
            extra += f"  [from {row['origin']}]"
        print(f"{row['name']:<{width}}  {options}{extra}")
    return 0
