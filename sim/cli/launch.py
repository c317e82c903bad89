"""``python -m sim.launch``: run an Experiment on real processes, under torchrun or on its own.

    torchrun --nproc_per_node 4 -m sim.launch --experiment '{"workers": 64, "compressor": {"name": "powersgd"}}'
    python -m sim.launch --nproc 2 --experiment exp.toml --out results/real      # spawns its own processes
    python -m sim.launch --nproc 2 --experiment exp.json --out result.pt         # the Result object itself

``--experiment`` is a .toml/.json config read by the same loader as ``python -m sim run`` (``sim.workflow.config``: an
unknown key is a one-line error naming it; ``imports`` and ``--import`` load your tasks and compressors), or the
fields as inline JSON. Under torchrun (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set) each process joins the
group with ``init_method="env://"`` and emulates ``workers / WORLD_SIZE`` workers (``--workers-per-process``);
otherwise ``sim.run_distributed`` spawns ``--nproc`` processes. Rank 0 prints the final metrics and, with
``--out DIR``, stores the run in the ``DIR/runs/<run_id>/`` layout that ``sim.load_results`` reads (with
``--out FILE.pt``: saves the ``Result`` with ``torch.save``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch

from compressors.serialization import loads_json
from .. import checkpoint
from ..real.distributed import run_distributed, run_on_rank
from ..workflow.config import apply_overrides, from_mapping, import_modules, load_config, parse_assignment
from ..workflow.store import ResultsStore
from .arguments import Parser, add_import_option, positive_int, positive_number, run_command

PROG = "python -m sim.launch"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(prog=PROG, description="Run an Experiment on real processes, under torchrun or on its own "
                                           "(docs/cli.md).")
    parser.add_argument("--experiment", default="{}",
                        help="a .toml/.json config (its base experiment, as python -m sim run), e.g. --experiment "
                             "exp.toml, or Experiment fields as JSON, e.g. "
                             "--experiment '{\"workers\": 4, \"steps\": 50}'")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set steps=100 --set compressor.rank=4 (repeatable)")
    parser.add_argument("--device", default=None,
                        help="where each process computes, e.g. --device cuda (the current GPU of each rank; "
                             "default: the experiment's device, else cpu); the same as --set device=cuda")
    parser.add_argument("--nproc", type=positive_int, default=2,
                        help="processes to spawn when not under torchrun, e.g. --nproc 4 (default 2)")
    parser.add_argument("--workers-per-process", type=positive_int, default=None,
                        help="workers each process emulates, e.g. --workers-per-process 8 "
                             "(default workers / processes)")
    parser.add_argument("--backend", default="gloo", choices=("gloo", "nccl"),
                        help="torch.distributed backend, e.g. --backend nccl on GPUs (default gloo)")
    parser.add_argument("--link", default=None,
                        help="spawned processes talk over a real link of this rate: a network namespace whose "
                             "loopback is shaped by tc (root and iproute2 needed; gloo), e.g. --link 100mbit")
    parser.add_argument("--timeout", type=positive_number, default=60.0,
                        help="seconds any collective may take, e.g. --timeout 300 (default 60)")
    parser.add_argument("--out", default=None,
                        help="a results directory, e.g. --out results/real (read with sim.load_results), or a .pt "
                             "file for the Result object, e.g. --out result.pt")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="every process writes its checkpoints here, e.g. --checkpoint-dir ckpt")
    parser.add_argument("--checkpoint-every", type=positive_int, default=None,
                        help="steps between checkpoints, e.g. --checkpoint-every 100")
    parser.add_argument("--resume-from", default=None,
                        help="a checkpoint directory: continue from the newest step every process holds, e.g. "
                             "--resume-from ckpt")
    add_import_option(parser)
    return parser.parse_args(argv)


def load_experiment(text: str, overrides: dict | None = None):
    """The Experiment of a .toml/.json config file or of inline JSON, through ``sim.workflow.config``: as ``python -m sim
    run``, the config's base experiment (its ``[sweep]`` table is validated, and used by ``python -m sim sweep``)."""
    if text.endswith((".toml", ".json")) or os.path.exists(text):
        config = load_config(text, overrides)  # the file's imports must be named by --import (already imported)
    else:
        try:
            fields = loads_json(text)
        except ValueError as error:
            raise ValueError(f"sim.launch: experiment={text!r} is invalid; allowed: an existing .toml/.json config or "
                             f"a JSON object of Experiment fields (not JSON: {error})") from None
        if not isinstance(fields, dict):
            raise ValueError(f"sim.launch: experiment={text!r} is invalid; allowed: a .toml/.json config or a JSON "
                             "object of Experiment fields")
        config = from_mapping(apply_overrides(fields, overrides or {}), source="--experiment")
    return config.experiment  # as `python -m sim run`: the base experiment (a [sweep] table is for `sweep`)


def checkpointing(args: argparse.Namespace) -> dict:
    """``run_distributed``'s checkpoint arguments from the command line, validated (ValueError naming the field)."""
    options = {"checkpoint_dir": args.checkpoint_dir, "checkpoint_every": args.checkpoint_every,
               "resume_from": args.resume_from}
    checkpoint.check_options(**options)
    return options


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return run_command(lambda: launch(args), PROG)


def launch(args: argparse.Namespace) -> int:
    import_modules(args.imports, "command line", "--import")
    overrides = dict(parse_assignment(t, many=False) for t in args.set)
    if args.device is not None:
        overrides["device"] = args.device
    experiment = load_experiment(args.experiment, overrides)
    options = checkpointing(args)  # bad checkpoint options fail here, before any process group exists
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun (or any env:// launcher)
        import torch.distributed as dist

        if args.link is not None:
            raise ValueError("sim.launch: --link is invalid under torchrun; allowed: --link when sim.launch spawns "
                             "the processes itself (or start torchrun inside a shaped namespace yourself)")
        if args.backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(args.backend, init_method="env://",
                                timeout=datetime.timedelta(seconds=args.timeout))
        rank, world = dist.get_rank(), dist.get_world_size()
        k = args.workers_per_process if args.workers_per_process is not None else experiment.workers // world
        if k < 1 or k * world != experiment.workers:
            raise ValueError(f"sim.launch: workers_per_process={k} is invalid for WORLD_SIZE={world} and "
                             f"workers={experiment.workers}; allowed: WORLD_SIZE * workers_per_process == workers")
        results = run_on_rank(rank, world, [experiment], [k], args.timeout, options)
        dist.destroy_process_group()
        result = results[0] if results else None
    else:
        result = run_distributed(experiment, nproc=args.nproc, backend=args.backend,
                                 workers_per_process=args.workers_per_process, collective_timeout=args.timeout,
                                 link=args.link, **options)
    if result is not None:
        last = result.history.iloc[-1].to_dict()
        print(json.dumps({k: v for k, v in last.items() if isinstance(v, (int, float))}, default=float))
        if args.out:
            save(result, experiment, args.out)
    return 0


def save(result, experiment, out: str) -> None:
    """``out.pt``: the Result (torch.save); anything else: a results directory (``sim.workflow.store`` layout)."""
    if out.endswith(".pt"):
        torch.save(result, out)
        return

    folder = ResultsStore(Path(out)).write(experiment, result)
    print(f"results in {out} (sim.load_results({out!r})): {folder.name}")
