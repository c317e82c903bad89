"""``make demo``: a PowerSGD rank sweep on Fashion-MNIST (LeNet-5, 8 simulated workers, 5 seeds).

Exact all-reduce vs PowerSGD rank 1, 2, 4 with error feedback, every configuration on the same seeds. Prints
each configuration's mean final test accuracy, its paired difference to the exact all-reduce with a 95%
confidence interval (``sim.compare``: "not distinguishable" when the interval contains 0), bits per step and
compression ratio, and writes results/demo/{summary.csv,history.csv,accuracy.png}. Runs in two processes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from compressors import Identity, make
from ..allocator import keep_freed_memory
from ..analysis import compare
from ..experiment import Experiment
from ..simulation import Simulation
from ..workflow.io import write_atomically
from ..workflow.sweep import sweep


DEFAULT = Experiment(task="fashion-mnist-cnn", workers=8, steps=300, batch_size=32, lr=0.05, momentum=0.9,
                     eval_every=50, seed=0)
SEEDS = (0, 1, 2, 3, 4)
COMPRESSORS = [
    {"name": "identity"},
    {"name": "powersgd", "rank": 1, "error_feedback": "local"},
    {"name": "powersgd", "rank": 2, "error_feedback": "local"},
    {"name": "powersgd", "rank": 4, "error_feedback": "local"},
]


def label(spec: dict) -> str:
    return "exact" if spec["name"] == "identity" else f"{spec['name']} r={spec['rank']}"


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT.steps, help="training steps per run (e.g. 300)")
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds per configuration, >= 2 (e.g. 5)")
    parser.add_argument("--task", default=DEFAULT.task, help="a task name (e.g. fashion-mnist-cnn, digits-cnn)")
    parser.add_argument("--processes", type=int, default=2, help="runs at a time in worker processes (e.g. 2)")
    parser.add_argument("--out", type=Path, default=Path("results/demo"), help="output folder")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error(f"--seeds {args.seeds}: at least 2 seeds are needed for a confidence interval")
    base = DEFAULT.replace(steps=args.steps, task=args.task)
    seeds = list(range(args.seeds))
    print(f"{base.task}, {base.workers} workers, {base.steps} steps, batch {base.batch_size} per worker, "
          f"seeds {seeds}: {len(COMPRESSORS) * len(seeds)} runs in {args.processes} processes", flush=True)
    history = sweep(base, grid={"compressor": COMPRESSORS}, seeds=seeds, processes=args.processes)
    history["label"] = [label(spec) for spec in history["compressor"]]
    summary = summarize(history, base)
    print()
    print(summary.to_string(index=False))
    print("\ndiff: mean over seeds of (configuration - exact) in accuracy points, paired on seeds; "
          "[95% CI] Student-t; 'not distinguishable' when the interval contains 0.")
    write_atomically(args.out / "summary.csv", lambda p: summary.to_csv(p, index=False))
    write_atomically(args.out / "history.csv", lambda p: history.drop(columns="compressor").to_csv(p, index=False))
    write_atomically(args.out / "accuracy.png", lambda p: plot(history, p))
    print(f"\nwrote {args.out}/summary.csv, history.csv, accuracy.png")
    return summary


def summarize(history: pd.DataFrame, base: Experiment) -> pd.DataFrame:
    """One row per configuration: accuracy (mean over seeds), paired difference to exact with its CI, bits."""

    shapes = Simulation(base).shapes
    dense = Identity().bits_per_step(shapes, dtype=base.torch_dtype)
    diffs = compare(history, baseline="exact", metric="test_accuracy", by="label").set_index("label")
    finals = history.dropna(subset=["test_accuracy"]).sort_values("step").groupby(["label", "seed"]).last()
    rows = []
    for spec in COMPRESSORS:
        name = label(spec)
        bits = make(**spec).bits_per_step(shapes, dtype=base.torch_dtype)
        row = {"compressor": name, "test_accuracy_%": round(100 * finals.loc[name, "test_accuracy"].mean(), 2)}
        if name in diffs.index:
            d = diffs.loc[name]
            row.update({"diff_vs_exact": f"{100 * d.mean_diff:+.2f}",
                        "95%_CI": f"[{100 * d.ci_low:+.2f}, {100 * d.ci_high:+.2f}]", "verdict": d.verdict})
        else:
            row.update({"diff_vs_exact": "", "95%_CI": "", "verdict": "baseline"})
        row.update({"bits_per_step": int(bits), "compression_ratio": round(dense / bits, 1)})
        rows.append(row)
    return pd.DataFrame(rows)


def plot(history: pd.DataFrame, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_steps, ax_bits) = plt.subplots(1, 2, figsize=(10, 4))
    evaluated = history.dropna(subset=["test_accuracy"])
    for name, h in evaluated.groupby("label", sort=False):
        mean = h.groupby("step").agg(accuracy=("test_accuracy", "mean"), low=("test_accuracy", "min"),
                                     high=("test_accuracy", "max"), bits=("bits", "mean"))
        (line,) = ax_steps.plot(mean.index, 100 * mean["accuracy"], label=name)
        ax_steps.fill_between(mean.index, 100 * mean["low"], 100 * mean["high"], color=line.get_color(), alpha=0.2)
        ax_bits.plot(mean["bits"] / 8e6, 100 * mean["accuracy"], label=name)
    ax_steps.set(xlabel="step", ylabel="test accuracy (%)", title="accuracy vs steps (mean, min-max over seeds)")
    ax_bits.set(xlabel="MB sent per worker", ylabel="test accuracy (%)", title="accuracy vs bits", xscale="log")
    for ax in (ax_steps, ax_bits):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    keep_freed_memory()  # this process is ours: big per-worker tensors reuse freed memory (see sim/allocator.py)
    main()
