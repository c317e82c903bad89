"""``make demo``: a PowerSGD rank sweep on digits-cnn with 8 workers.

Prints a table (final test accuracy, bits per step, compression ratio, mean compression error) and writes
results/demo/summary.csv, results/demo/history.csv and results/demo/accuracy.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from .experiment import Experiment
from .io import write_atomically  # re-exported: older code imports it from here
from .runner import run

DEFAULT = Experiment(task="digits-cnn", workers=8, steps=300, batch_size=32, lr=0.05, momentum=0.9,
                     weight_decay=1e-4, eval_every=25, seed=0)
COMPRESSORS = [
    {"name": "identity"},
    {"name": "powersgd", "rank": 1, "error_feedback": "local"},
    {"name": "powersgd", "rank": 2, "error_feedback": "local"},
    {"name": "powersgd", "rank": 4, "error_feedback": "local"},
]


def label(spec: dict) -> str:
    return spec["name"] if "rank" not in spec else f"{spec['name']} r={spec['rank']}"


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT.steps)
    parser.add_argument("--out", type=Path, default=Path("results/demo"))
    args = parser.parse_args(argv)
    base = DEFAULT.replace(steps=args.steps)
    summaries, histories = [], []
    for spec in COMPRESSORS:
        result = run(base.replace(compressor=spec), progress=True)
        h = result.history.assign(compressor=label(spec))
        histories.append(h)
        summaries.append({
            "compressor": label(spec),
            "final_test_accuracy": round(100 * result.final("test_accuracy"), 2),
            "bits_per_step": int(result.bits_per_step),
            "compression_ratio": round(result.compression_ratio, 1),
            "mean_compression_error": round(float(h["compression_error"].mean()), 3),
            "seconds": round(result.wall_seconds, 1),
        })
        print(f"  {label(spec):14s} accuracy {summaries[-1]['final_test_accuracy']:.2f}%  "
              f"({summaries[-1]['seconds']} s)", flush=True)
    summary = pd.DataFrame(summaries)
    history = pd.concat(histories, ignore_index=True)
    print()
    print(f"digits-cnn, {base.workers} workers, {base.steps} steps, batch {base.batch_size} per worker")
    print(summary.to_string(index=False))
    write_atomically(args.out / "summary.csv", lambda p: summary.to_csv(p, index=False))
    write_atomically(args.out / "history.csv", lambda p: history.to_csv(p, index=False))
    write_atomically(args.out / "accuracy.png", lambda p: plot(history, p))
    print(f"\nwrote {args.out}/summary.csv, history.csv, accuracy.png")
    return summary


def plot(history: pd.DataFrame, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_steps, ax_bits) = plt.subplots(1, 2, figsize=(10, 4))
    for name, h in history.groupby("compressor", sort=False):
        evaluated = h.dropna(subset=["test_accuracy"])
        ax_steps.plot(evaluated["step"], 100 * evaluated["test_accuracy"], label=name)
        ax_bits.plot(evaluated["bits"] / 8e6, 100 * evaluated["test_accuracy"], label=name)
    ax_steps.set(xlabel="step", ylabel="test accuracy (%)", title="accuracy vs steps")
    ax_bits.set(xlabel="MB sent per worker", ylabel="test accuracy (%)", title="accuracy vs bits", xscale="log")
    for ax in (ax_steps, ax_bits):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    from sim.allocator import keep_freed_memory

    keep_freed_memory()  # this process is ours: big per-worker tensors reuse freed memory (see sim/allocator.py)
    main()
