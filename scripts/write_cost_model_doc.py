"""Write docs/cost_model.md (and its figure): calibrate the alpha-beta model on this machine's gloo
collectives, report held-out error, and print the what-if table for the paper's ResNet-18.

    .venv/bin/python scripts/write_cost_model_doc.py                 # measures (about 1-3 minutes)
    .venv/bin/python scripts/write_cost_model_doc.py --measurements results/calibration-gloo.csv
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def markdown(frame: pd.DataFrame, floatfmt: str = "{:.3g}") -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        cells = [floatfmt.format(v) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(data: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, (op, rows) in zip(axes, data.groupby("op")):
        for p, part in rows.groupby("nproc"):
            line, = ax.plot(part.bytes, part.seconds, "o", ms=3, label=f"measured p={p}")
            ax.plot(part.bytes, part.predicted, "-", color=line.get_color(), lw=1, label=f"model p={p}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"gloo {op}, 127.0.0.1")
        ax.set_xlabel("bytes per process")
    axes[0].set_ylabel("seconds")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from sim.cost import PRESETS, whatif
    from sim.cost.calibrate import calibrate

    parser = argparse.ArgumentParser()
    parser.add_argument("--measurements", default=None, help="reuse a CSV written by a previous run")
    parser.add_argument("--nproc", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--out", default=str(ROOT / "docs" / "cost_model.md"))
    args = parser.parse_args()

    measured = pd.read_csv(args.measurements) if args.measurements else None
    result = calibrate(tuple(args.nproc), measurements=measured)
    results = ROOT / "results"
    results.mkdir(exist_ok=True)
    result.measurements.to_csv(results / "calibration-gloo.csv", index=False)
    for p, net in result.networks.items():
        net.save(results / f"network-gloo-p{p}.json")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure(result.measurements, out.parent / "cost_model_calibration.png")

    errors = pd.DataFrame({"per-nproc fit": result.held_out_error(["op", "nproc"]),
                           "one fit for all nproc": result.held_out_error(["op", "nproc"], "rel_error_joint")})
    errors = errors.reset_index()
    fits = pd.DataFrame([{"nproc": p, "op": op, "alpha (us)": link["alpha"] * 1e6,
                          "bandwidth (GB/s)": link["bandwidth"] / 1e9}
                         for p, net in result.networks.items() for op, link in net.op_links.items()])
    presets = pd.DataFrame([{"preset": name, "alpha (us)": n.alpha * 1e6, "bandwidth (Gbit/s)": n.bandwidth * 8 / 1e9,
                             "devices/node": n.devices_per_node,
                             "intra (Gbit/s)": (n.intra_bandwidth or n.bandwidth) * 8 / 1e9}
                            for name, n in PRESETS.items()])
    table = whatif("resnet18_cifar", compressors=[f"powersgd:rank={r}" for r in (1, 2, 4)], workers=[4, 16, 64],
                   networks=["ethernet-1g", "ethernet-10g", "infiniband-100g", "dgx1-ethernet-10g", "nvlink"],
                   compute="v100")
    wide = table.pivot_table(index=["network", "workers"], columns="compressor", values="speedup").reset_index()
    step = table.pivot_table(index=["network", "workers"], columns="compressor", values="step_s").reset_index()
    cpu = os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    text = f"""# The cost model: from the ledger to seconds

Written by `scripts/write_cost_model_doc.py` on {datetime.date.today()} ({platform.machine()}, {cpu} cores,
load average {load:.1f} when it finished). Code: `sim/cost/`, formulas: `theory/collectives.py`.

## Model

step = compute + encode/decode + communication not hidden behind the backward pass.

- Each ledger record (op, bits one worker sends, workers) is priced by the alpha-beta formula of the network's
  algorithm (`theory.collectives`): ring all-reduce 2(p-1) alpha + 2(p-1)/p n beta, ring all-gather
  (p-1)(alpha + m beta), tree, recursive doubling, Rabenseifner, parameter server; two-level networks do
  intra-node reduce-scatter, inter-node all-reduce, intra-node all-gather.
- Overlap ("buckets", DDP's scheme): the dense gradient is cut into 25 MiB buckets produced at a uniform rate
  during backward (2/3 of compute); every bucket runs the step's collectives in order, each paying its
  latency (PowerSGD: P, Q and the uncompressed vectors: 3 collectives per bucket); exposed communication is
  what runs past the end of backward. "none": everything after backward.
- Encode/decode: measured on this CPU (one worker's `aggregate`, minus the dense path's) or, with an
  accelerator preset, matmul FLOPs at 40% of peak plus 4 passes over the gradient at memory bandwidth.
- Compute: measured, or forward FLOPs (torch's flop counter) x 3 over 40% of the accelerator's peak.

An all-gather compressor beats a dense ring all-reduce only above the compression ratio
rho* = n beta / (alpha + 2 n beta / p) (= p/2 without latency); `tests/test_cost_step_time.py` checks that
the priced ledger flips exactly there.

## Presets

Sources for every figure are in `sim/cost/presets.py` (bandwidths: the standards' line rates; latencies:
typical small-message figures, the least certain numbers: calibrate for anything that matters).

{markdown(presets)}

## Calibration on this machine (gloo, 127.0.0.1)

`python -m sim calibrate --backend gloo --nproc 2 3 4` times all-reduce and all-gather from 4 B to 32 MiB
(factor-2 steps), fits alpha and beta per collective on every other size (relative least squares, alpha,
beta >= 0) and reports the error on the sizes in between. Seconds per size: the 20th percentile of the
repeats (each repeat the slowest rank), the uncontended time; the median is stored beside it in
`results/calibration-gloo.csv`.

Fitted links (saved as `results/network-gloo-p<n>.json`):

{markdown(fits)}

Held-out median |relative error| (target <= 20%):

{markdown(errors, "{:.1%}")}

Overall held-out median |relative error|, per-nproc fits: **{result.held_out_error():.1%}**; one fit for all
nproc: {result.held_out_error(column='rel_error_joint'):.1%}.

![measured vs model](cost_model_calibration.png)

Caveats. This machine has {cpu} cores: with 3 or 4 processes the collectives are CPU-bound and preempted, so
the time is set by the scheduler more than by any link, and one (alpha, beta) for all p fits worse than one
per p. Other jobs running on the machine during calibration add noise that no model of the network can
predict. Gloo's all-gather of more than a few MiB allocates a fresh output buffer per call (page faults),
which bends its curve upward beyond what a linear beta can follow.

## What-if: the paper's ResNet-18 (V100 compute, 128 images per worker)

`python -m sim whatif --model resnet18_cifar --rank 1 2 4 --workers 4 16 64 --network ethernet-1g
ethernet-10g infiniband-100g dgx1-ethernet-10g nvlink --compute v100`

Speedup of each compressor over the dense all-reduce (below 1: compression does not pay):

{markdown(wide)}

Seconds per step:

{markdown(step, "{:.4f}")}
"""
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
