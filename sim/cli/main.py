"""Command line: ``python -m sim <subcommand> ...``.

    python -m sim whatif --model resnet18_cifar --compressor identity --compressor powersgd:rank=2 \\
        --workers 4 16 64 --network ethernet-10g infiniband-100g --compute v100 --csv out.csv --png out.png
    python -m sim calibrate --backend gloo --nproc 2 --out results/network-gloo-p2.json

    python -m sim list tasks            # also: compressors, optimizers, networks, accelerators, models
    python -m sim run examples/own_model.toml --import examples.own_model

Each subcommand is a pair (add its arguments to a subparser, run it from the parsed namespace) listed in
``SUBCOMMANDS``; adding one is one function pair and one line there. A bad value is a one-line error and
exit status 2; Ctrl-C a one-line message (``sim.cli.arguments``). docs/cli.md describes every command.
"""
from __future__ import annotations

import argparse

from . import listing, runs
from ..cost import whatif
from ..cost.whatif import format_does_it_pay
from ..experiment import Experiment
from ..real.calibrate import calibrate, sizes_for
from ..real.link import ShapedLink
from ..tasks import TASK_REGISTRY
from ..workflow.config import import_modules
from .arguments import Parser, add_import_option, positive_int, run_command


# -- whatif ----------------------------------------------------------------------------------------------------
def add_whatif(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="resnet18_cifar",
                        help="a model known by name (python -m sim list models: resnet18_cifar, resnet50, vit_b16, "
                             "bert_base, gpt2, ...) or a task name (python -m sim list tasks), e.g. --model resnet50 "
                             "or --model digits-mlp (default resnet18_cifar)")
    parser.add_argument("--compressor", action="append", default=None, metavar="NAME[:OPTION=VALUE:...]",
                        help="repeatable, e.g. --compressor powersgd:rank=2 --compressor topk:ratio=0.01 "
                             "(identity, the baseline, is always added)")
    parser.add_argument("--rank", type=positive_int, nargs="*", default=None,
                        help="shortcut: one powersgd entry per rank, e.g. --rank 1 2 4")
    parser.add_argument("--workers", type=positive_int, nargs="+", default=[16],
                        help="worker counts, e.g. --workers 4 16 64 (default 16)")
    parser.add_argument("--network", nargs="+", default=["ethernet-10g"],
                        help="presets (python -m sim list networks) or saved .json networks, e.g. "
                             "--network ethernet-10g infiniband-100g (default ethernet-10g)")
    parser.add_argument("--compute", default=None,
                        help="seconds per step, an accelerator (python -m sim list accelerators) or 'measure', "
                             "e.g. --compute 0.12 or --compute v100")
    parser.add_argument("--accelerator", default=None,
                        help="the target GPU when --compute is seconds: encode/decode is then priced from FLOPs on "
                             "it, else 0, e.g. --compute 0.12 --accelerator a100 (python -m sim list accelerators)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="the FLOP rate an accelerator's FLOP counts are priced at: auto (default) is what "
                             "training on it uses, mixed precision at the fp16/bf16 tensor-core rate; fp32 prices "
                             "the fp32 peak, e.g. --precision fp32")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="per-worker batch for FLOP counting, e.g. --batch-size 128")
    parser.add_argument("--overlap", default="buckets", choices=["buckets", "none"],
                        help="overlap communication with the backward pass by DDP buckets or not, e.g. --overlap none")
    parser.add_argument("--codec", default="auto", choices=["auto", "measure", "flops", "none"],
                        help="encode/decode cost: from FLOPs, measured here, or none, e.g. --codec none")
    parser.add_argument("--csv", default=None, help="write the table here, e.g. --csv whatif.csv")
    parser.add_argument("--png", default=None, help="plot speedup vs workers here, e.g. --png whatif.png")
    add_import_option(parser)


def run_whatif(args: argparse.Namespace) -> int:

    specs = list(args.compressor or [])
    specs += [{"name": "powersgd", "rank": r} for r in (args.rank or [])]
    if not specs:
        specs = ["identity", "powersgd:rank=1", "powersgd:rank=2", "powersgd:rank=4"]
    compute = args.compute
    if compute is not None:
        try:
            compute = float(compute)
        except ValueError:
            pass
    source = args.model
    if source in TASK_REGISTRY or "-" in source:  # a task name (yours too, with --import): price an Experiment

        source = Experiment(task=source, workers=max(args.workers), batch_size=args.batch_size or 32)
    table = whatif(source, compressors=specs, workers=args.workers, networks=args.network, compute=compute,
                   codec=args.codec, overlap=args.overlap, batch_size=args.batch_size, accelerator=args.accelerator,
                   precision=args.precision)

    print(format_does_it_pay(table))  # the long table (every time column and its source) goes to --csv
    if args.csv:
        table.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    if args.png:
        plot_speedup(table, args.png)
        print(f"wrote {args.png}")
    return 0


def plot_speedup(table, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    networks = list(dict.fromkeys(table.network))
    fig, axes = plt.subplots(1, len(networks), figsize=(4 * len(networks), 3.2), sharey=True, squeeze=False)
    for ax, net in zip(axes[0], networks):
        part = table[table.network == net]
        for name, rows in part.groupby("compressor", sort=False):
            ax.plot(rows.workers, rows.speedup, marker="o", label=name)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(net)
        ax.set_xlabel("workers")
    axes[0][0].set_ylabel("speedup vs all-reduce")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- calibrate -------------------------------------------------------------------------------------------------
def add_calibrate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="gloo", choices=["gloo"], help="the torch.distributed backend, e.g. gloo")
    parser.add_argument("--nproc", type=positive_int, nargs="+", default=[2],
                        help="process counts, e.g. --nproc 2 3 4 (default 2)")
    parser.add_argument("--out", default=None,
                        help="Network JSON, e.g. --out results/net.json (default results/network-<backend>-p<nproc>"
                             ".json; one per nproc)")
    parser.add_argument("--max-bytes", type=positive_int, default=None,
                        help="largest message timed, in bytes, e.g. --max-bytes 4194304 (default 32 MiB; on a "
                             "--link what crosses it in about a second)")
    parser.add_argument("--link", default=None,
                        help="time the collectives over a real link of this rate, a network namespace whose "
                             "loopback is shaped by tc (root and iproute2 needed), e.g. --link 100mbit")
    parser.add_argument("--csv", default=None, help="write the measurements and predictions here, e.g. --csv cal.csv")


def run_calibrate(args: argparse.Namespace) -> int:
    import pandas as pd

    link = ShapedLink.parse(args.link) if args.link is not None else None  # a bad rate fails before any process
    name = f"calibrated-gloo-{link.label()}" if link is not None else "calibrated-gloo-localhost"
    result = calibrate(tuple(args.nproc), args.backend, sizes_for(link, args.max_bytes), name=name, link=link)
    for p, network in result.networks.items():
        path = _out_path(args.out, args.backend, p, many=len(result.networks) > 1, link=link)
        network.save(path)
        print(f"nproc={p}: {network.to_dict()['op_links']}  -> {path}")
        if link is not None:
            print(link_summary(network, link, p))
    with pd.option_context("display.width", 200, "display.float_format", "{:.3g}".format):
        print("held-out median |relative error| per collective and nproc (fit per nproc):")
        print(result.held_out_error(["op", "nproc"]).to_string())
        if len(result.networks) > 1:
            print("same, one fit over all nproc:")
            print(result.held_out_error(["op", "nproc"], "rel_error_joint").to_string())
    print(f"held-out median |relative error|: {result.held_out_error():.1%}")
    if args.csv:
        result.measurements.to_csv(args.csv, index=False)
    return 0


def link_summary(network, link: ShapedLink, nproc: int) -> str:
    """The fit beside the configured rate. Every rank's bytes cross the one shaped loopback, so a ring all-reduce
    of p ranks moves 2(p-1)n bytes through it while the ring formula charges each rank 2(p-1)/p n: the fitted
    per-rank bandwidth is expected at rate / p. Messages within the token bucket's burst pass at loopback speed
    (the fit's knee); the sustained bandwidth is the one above the knee."""
    fit = network.op_links["all_reduce"]
    sustained = fit.get("bandwidth_above_knee", fit["bandwidth"]) * 8 / 1e6  # Mbit/s
    knee = f", knee at {fit['knee_bytes'] / 1024:.0f} KiB" if "knee_bytes" in fit else ""
    expected = link.rate_bits / nproc / 1e6
    return (f"  link {link.label()}: fitted all-reduce alpha {fit['alpha'] * 1e6:.0f} us{knee}, sustained "
            f"bandwidth {sustained:.1f} Mbit/s per rank; configured {link.rate_bits / 1e6:g} Mbit/s shared by "
            f"{nproc} ranks = {expected:.1f} Mbit/s per rank ({sustained / expected:.0%} of it)")


def _out_path(out, backend: str, p: int, many: bool, link: ShapedLink | None = None) -> str:
    import os

    if out is None:
        return f"results/network-{backend}-{link.label() + '-' if link is not None else ''}p{p}.json"
    if not many:
        return out
    stem, ext = os.path.splitext(out)
    return f"{stem}-p{p}{ext or '.json'}"


#: name -> (add arguments, run); another subcommand is one more line here.
SUBCOMMANDS = {
    "list": (listing.add_list, listing.run_list, "what exists: tasks, compressors, optimizers, networks, ..."),
    "run": (runs.add_run, runs.run_run, "run one experiment from a .toml/.json config"),
    "sweep": (runs.add_sweep, runs.run_sweep, "grid x seeds into a results dir that survives kill"),
    "whatif": (add_whatif, run_whatif, "time per step of compressors x workers x networks"),
    "calibrate": (add_calibrate, run_calibrate, "fit alpha, beta to real collectives on this machine"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m sim", description="The compressed-SGD simulator. docs/cli.md has every command.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (add, run, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add(sub)
        sub.set_defaults(handler=run, prog=sub.prog)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> int:
        import_modules(getattr(args, "imports", []), "command line", "--import")
        return args.handler(args)

    return run_command(command, args.prog)
