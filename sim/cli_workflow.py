"""The ``run`` and ``sweep`` subcommands of ``python -m sim``.

    python -m sim run configs/digits_powersgd.toml --out results/one --set compressor.rank=4
    python -m sim sweep configs/powersgd_rank_sweep.toml --grid compressor.rank=1,2,4 \\
        --grid compressor.warm_start=true,false --seeds 0,1,2 --out results/rank_sweep

Values on the command line are parsed as bool (true/false), None (none/null), int, float, else string. ``--grid``
replaces the config file's grid entry for that key (other keys of ``[sweep.grid]`` stay); ``--seeds``
replaces its seeds. Each finished run is written to ``--out`` as it completes; running the same command again
skips complete runs (see ``sim.store``). A progress bar counts runs, an inner one steps.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .config import load_config, parse_assignment, parse_seeds


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a .toml or .json experiment file (see configs/)")
    parser.add_argument("--out", default=None, help="results directory (default results/<config name>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set steps=100 --set compressor.rank=4 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_run(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)


def add_sweep(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a swept field and its values, e.g. compressor.rank=1,2,4 (repeatable)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2")


def _prepare(args: argparse.Namespace):
    overrides = dict(parse_assignment(text, many=False) for text in args.set)
    config = load_config(args.config, overrides)
    base = config.experiment
    out = Path(args.out) if args.out else Path("results") / Path(args.config).stem
    return config, base, out


def run_run(args: argparse.Namespace) -> int:
    from .store import sweep_to_dir

    _, base, out = _prepare(args)
    table = sweep_to_dir(base, out, progress=not args.no_progress, log=print)
    _print_summary(table, out)
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    from .config import parse_sweep
    from .store import sweep_to_dir

    config, base, out = _prepare(args)
    grid = dict(config.grid)
    grid.update(parse_assignment(text, many=True) for text in args.grid)
    grid, _ = parse_sweep({"grid": grid}, base)  # validate command-line values before any run
    seeds = parse_seeds(args.seeds) if args.seeds else config.sweep_seeds
    table = sweep_to_dir(base, out, grid=grid, seeds=seeds, progress=not args.no_progress, log=print)
    _print_summary(table, out)
    return 0


def _print_summary(table, out: Path) -> None:
    """Last logged value of the main metrics per configuration, mean over seeds."""
    if table.empty:
        return
    metrics = [c for c in ("test_accuracy", "test_perplexity", "test_loss", "bits") if c in table]
    last = table.groupby(["run", "seed"], sort=False)[metrics].agg(lambda s: s.dropna().iloc[-1] if
                                                                   s.notna().any() else float("nan"))
    summary = last.groupby(level="run", sort=False).mean()
    summary["seeds"] = last.groupby(level="run", sort=False).size()
    print(summary.to_string(float_format=lambda v: f"{v:.4g}"))
    print(f"results in {out} (sim.load_results({str(out)!r}))")
