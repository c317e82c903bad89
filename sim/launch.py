"""``python -m sim.launch``: run an Experiment on real processes, under torchrun or on its own.

    torchrun --nproc_per_node 4 -m sim.launch --experiment '{"workers": 64, "compressor": {"name": "powersgd"}}'
    python -m sim.launch --nproc 2 --experiment exp.json --out result.pt      # spawns its own processes

Under torchrun (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set) each process joins the group with
``init_method="env://"`` and emulates ``workers / WORLD_SIZE`` workers (``--workers-per-process``);
otherwise ``sim.run_distributed`` spawns ``--nproc`` processes. Rank 0 prints the final metrics and, with
``--out``, saves the ``Result`` with ``torch.save``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sim.launch", description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="{}", help="Experiment fields as JSON, or a path to a JSON file")
    parser.add_argument("--nproc", type=int, default=2, help="processes to spawn when not under torchrun")
    parser.add_argument("--workers-per-process", type=int, default=None)
    parser.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds any collective may take")
    parser.add_argument("--out", default=None, help="where rank 0 saves the Result (torch.save)")
    parser.add_argument("--checkpoint-dir", default=None, help="every process writes its checkpoints here")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    parser.add_argument("--resume-from", default=None,
                        help="a checkpoint directory: continue from the newest step every process holds")
    return parser.parse_args(argv)


def load_experiment(text: str):
    from .experiment import Experiment

    fields = json.load(open(text)) if os.path.exists(text) else json.loads(text)
    if not isinstance(fields, dict):
        raise ValueError(f"sim.launch: experiment={text!r} is invalid; allowed: a JSON object of Experiment fields")
    return Experiment(**fields)


def checkpointing(args: argparse.Namespace) -> dict:
    """``run_distributed``'s checkpoint arguments from the command line, validated (ValueError naming the field)."""
    from . import checkpoint

    options = {"checkpoint_dir": args.checkpoint_dir, "checkpoint_every": args.checkpoint_every,
               "resume_from": args.resume_from}
    checkpoint.check_options(**options)
    return options


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    experiment = load_experiment(args.experiment)
    options = checkpointing(args)  # bad checkpoint options fail here, before any process group exists
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun (or any env:// launcher)
        import torch.distributed as dist

        from .distributed import run_on_rank

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
        from .distributed import run_distributed

        result = run_distributed(experiment, nproc=args.nproc, backend=args.backend,
                                 workers_per_process=args.workers_per_process, collective_timeout=args.timeout,
                                 **options)
    if result is not None:
        last = result.history.iloc[-1].to_dict()
        print(json.dumps({k: v for k, v in last.items() if isinstance(v, (int, float))}, default=float))
        if args.out:
            torch.save(result, args.out)
    return 0


if __name__ == "__main__":
    code = main()
    if code == 0 and "RANK" in os.environ:  # a torchrun rank, its result saved and its group destroyed
        from sim.distributed import exit_without_finalizers

        exit_without_finalizers()  # no interpreter finalization for gloo's threads to abort in
    sys.exit(code)
