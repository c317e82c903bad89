"""The ``run`` and ``sweep`` subcommands of ``python -m sim``.

    python -m sim run configs/digits_powersgd.toml --out results/one --set compressor.rank=4
    python -m sim sweep configs/powersgd_rank_sweep.toml --grid compressor.rank=1,2,4 \\
        --grid compressor.warm_start=true,false --seeds 0,1,2 --out results/rank_sweep

Values on the command line are parsed as bool (true/false), None (none/null), int, float, else string. ``--grid``
replaces the config file's grid entry for that key (other keys of ``[sweep.grid]`` stay); ``--seeds``
replaces its seeds. Each finished run is written to ``--out`` as it completes; running the same command again
skips complete runs and resumes the one in progress from its checkpoint (see ``sim.workflow.store``). In a terminal a
progress bar counts runs and an inner one steps; otherwise (a log file, a pipe, a batch job) each finished run
prints one line. ``--processes N`` runs N at a time in local processes; ``--shard I/N`` runs only the I-th of N
slices of the runs (one cluster job each: docs/cluster.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..workflow.config import load_config, parse_assignment, parse_seeds, parse_sweep
from ..workflow.sweep import SweepError, check_shard, sweep_to_dir
from .arguments import add_import_option, count, positive_int


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a .toml or .json experiment file, e.g. configs/powersgd_rank_sweep.toml")
    parser.add_argument("--out", default=None,
                        help="results directory, e.g. --out results/rank_sweep (default results/<config name>); "
                             "read it with sim.load_results")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set steps=100 --set compressor.rank=4 "
                             "--set compressor=powersgd:rank=2 --set optimizer_options.eps=1e-6 (repeatable)")
    parser.add_argument("--device", default=None,
                        help="where every run computes, e.g. --device cuda or --device cuda:1 (default: the "
                             "config's device, else cpu); the same as --set device=cuda")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress output at all, e.g. for tests (outside a terminal progress is already "
                             "one line per finished run)")
    parser.add_argument("--checkpoint-every", type=count, default=100, metavar="N",
                        help="the run in progress writes a checkpoint every N steps into its results folder, so "
                             "running the same command after an interruption resumes it, e.g. --checkpoint-every 50 "
                             "(default 100; 0: never)")
    add_import_option(parser)


def add_run(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)


def add_sweep(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a swept field and its distinct values, e.g. --grid compressor.rank=1,2,4, or whole "
                             "compressors as specs: --grid compressor=identity,powersgd:rank=2:warm_start=false,"
                             "topk:ratio=0.01 (repeatable; docs/cli.md)")
    parser.add_argument("--seeds", default=None, metavar="S1,S2",
                        help="distinct comma-separated seeds, e.g. --seeds 0,1,2 (not with --grid seed=...)")
    parser.add_argument("--processes", type=positive_int, default=1, metavar="N",
                        help="run N experiments at a time in local processes (one torch thread each), e.g. "
                             "--processes 4 (default 1); a failed run does not stop the others")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="run only the I-th of N slices of grid x seeds (every N-th run, from the I-th; "
                             "1 <= I <= N), e.g. --shard 2/4 in the second of 4 cluster jobs; "
                             "sim.load_results([DIR1, DIR2, ...]) merges the slices (docs/cluster.md)")


def progress_mode(args: argparse.Namespace) -> bool | str:
    """True: bars (a terminal); "lines": one line per finished run (anything else); False: --no-progress."""
    if args.no_progress:
        return False
    return True if sys.stderr.isatty() else "lines"


def _prepare(args: argparse.Namespace):
    overrides = dict(parse_assignment(text, many=False) for text in args.set)
    if args.device is not None:
        overrides["device"] = args.device
    config = load_config(args.config, overrides)  # the file's imports must be named by --import (already imported)
    base = config.experiment
    out = Path(args.out) if args.out else Path("results") / Path(args.config).stem
    return config, base, out


def run_run(args: argparse.Namespace) -> int:
    _, base, out = _prepare(args)
    table = sweep_to_dir(base, out, progress=progress_mode(args), log=print, checkpoint_every=args.checkpoint_every)
    _print_summary(table, out)
    return 0


def run_sweep(args: argparse.Namespace) -> int:

    config, base, out = _prepare(args)
    grid = dict(config.grid)
    grid.update(parse_assignment(text, many=True) for text in args.grid)
    if args.seeds and "seed" in grid:
        raise ValueError("command line: --seeds is invalid together with a grid over 'seed'; allowed: one of them, "
                         "e.g. --seeds 0,1,2 alone")
    seeds = parse_seeds(args.seeds) if args.seeds else config.seeds
    # validate command-line values (and distinctness) before any run
    grid, seeds = parse_sweep({"grid": grid, "seeds": list(seeds)}, base)
    shard = check_shard(args.shard)
    try:
        table = sweep_to_dir(base, out, grid=grid, seeds=seeds or (base.seed,), progress=progress_mode(args),
                             log=print, checkpoint_every=args.checkpoint_every, processes=args.processes, shard=shard)
    except SweepError as error:
        print(f"python -m sim sweep: error: {error}", file=sys.stderr)
        return 1
    _print_summary(table, out)
    return 0


def _print_summary(table, out: Path) -> None:
    """Last logged value of the main metrics per configuration, mean over seeds."""
    if table.empty:
        return
    metrics = [c for c in ("val_accuracy", "test_accuracy", "test_perplexity", "test_loss", "bits") if c in table]
    last = table.groupby(["run", "seed"], sort=False)[metrics].agg(lambda s: s.dropna().iloc[-1] if
                                                                   s.notna().any() else float("nan"))
    summary = last.groupby(level="run", sort=False).mean()
    summary["seeds"] = last.groupby(level="run", sort=False).size()
    print(summary.to_string(float_format=lambda v: f"{v:.4g}"))
    print(f"results in {out} (sim.load_results({str(out)!r}))")
