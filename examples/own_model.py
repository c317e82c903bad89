"""Your own model, data, loss and optimizer in the simulator: run, sweep, compare, what-if.

    python examples/own_model.py                 # the whole walk-through (about a minute on one CPU core)
    python examples/own_model.py --quick         # tiny sizes (a few seconds)
    python -m sim run examples/own_model.toml --import examples.own_model   # the same task from the command line
    python -m sim list tasks --import examples.own_model

Importing this module registers two tasks: "marked-token" (sequence classification with attention: accuracy)
and "noisy-sine" (regression: test loss). docs/own_workload.md explains each step.
"""
from __future__ import annotations

import argparse
import math

import torch
from torch import nn
from torch.utils.data import Dataset

import sim
from sim.tasks import TASK_REGISTRY, custom_task, register_task

SEQ, FEATURES, CLASSES = 8, 6, 3


# -- 1. your model: any nn.Module (free parameters, attention, your own initialisation) ------------------------
class SequenceClassifier(nn.Module):
    """Embeds each token, adds a free positional parameter, attends, pools, classifies."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.position = nn.Parameter(torch.randn(SEQ, dim) * 0.1)  # a bare parameter: kept exactly as drawn here
        self.embed = nn.Linear(FEATURES, dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, SEQ, FEATURES)
        h = self.embed(x) + self.position  # (B, SEQ, dim)
        attended, _ = self.attention(h, h, h, need_weights=False)  # (B, SEQ, dim)
        return self.head((h + attended).mean(1))  # (B, CLASSES)


# -- 2. your data: a map-style Dataset (or plain tensors) ------------------------------------------------------
class MarkedTokens(Dataset):
    """Sequences of SEQ random tokens; feature 0 marks one token; the label is the class its features 1..3 point
    to. Solving it needs attention to the marked token (mean pooling alone sees a diluted signal)."""

    def __init__(self, samples: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(samples, SEQ, FEATURES, generator=g)  # (N, SEQ, FEATURES)
        marked = torch.randint(0, SEQ, (samples,), generator=g)  # (N,)
        self.x[:, :, 0] = 0.0
        self.x[torch.arange(samples), marked, 0] = 3.0
        self.y = self.x[torch.arange(samples), marked, 1:1 + CLASSES].argmax(-1)  # (N,)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


# -- 3. your loss: any (outputs, targets) -> scalar mean over the batch ----------------------------------------
def smoothed_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets, label_smoothing=0.05)


# -- 4. register tasks: keyword-only options with defaults become task_options --------------------------------
def marked_token_task(*, dtype: torch.dtype, dim: int = 16, samples: int = 2048, test_samples: int = 512,
                      split_seed: int = 0):
    test = MarkedTokens(test_samples, split_seed + 1)
    return custom_task("marked-token", model=lambda: SequenceClassifier(dim), train=MarkedTokens(samples, split_seed),
                       test=(test.x, test.y), loss=smoothed_cross_entropy, dtype=dtype)


def noisy_sine_task(*, dtype: torch.dtype, samples: int = 1024, hidden: int = 32):
    """Regression (float targets): the history reports the test loss; accuracy is NaN."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(samples + 256, 1, generator=g) * 2 * math.pi  # (N, 1)
    y = torch.sin(x) + 0.05 * torch.randn(x.shape, generator=g)  # (N, 1)
    model = lambda: nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))  # noqa: E731
    return custom_task("noisy-sine", model=model, train=(x[:samples], y[:samples]), test=(x[samples:], y[samples:]),
                       loss="mse", dtype=dtype)


def check_dim(options: dict) -> None:
    dim = options.get("dim", 16)
    if not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"Experiment.task_options: dim={dim!r} is invalid; allowed: an even integer >= 2 (2 heads)")


register_task("marked-token", marked_token_task, validate=check_dim)
register_task("noisy-sine", noisy_sine_task)


# -- 5. run, sweep, compare, what-if ---------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, e.g. for the tests")
    args = parser.parse_args(argv)
    steps, samples, seeds = (6, 128, [0, 1]) if args.quick else (150, 2048, [0, 1, 2])
    base = sim.Experiment(task="marked-token", task_options={"samples": samples}, workers=4, steps=steps,
                          batch_size=16, optimizer="adamw", lr=3e-3, weight_decay=1e-2, lr_warmup_steps=steps // 10,
                          compressor={"name": "powersgd", "rank": 2}, eval_every=0, seed=0)

    result = sim.run(base)  # one run: result.history has step, train_loss, test_accuracy, bits, ...
    print(f"one run: test accuracy {result.history.test_accuracy.iloc[-1]:.3f}, "
          f"{result.compression_ratio:.1f}x fewer bits than all-reduce")

    # identity (exact all-reduce) against PowerSGD rank 1, both from the same seeds: a paired comparison
    table = sim.sweep(base.replace(compressor={"name": "identity"}), grid={"compressor.name": ["identity", "powersgd"]},
                      seeds=seeds, progress=False)
    finals = table.groupby(["run", "seed"]).test_accuracy.last().unstack("seed")
    print("test accuracy by configuration and seed:\n" + finals.to_string(float_format=lambda v: f"{v:.3f}"))
    # paired differences over seeds (same seed, same data order and initialisation) with a 95% interval
    comparison = sim.compare(table, baseline="identity", by="compressor.name", metric="test_accuracy")
    print(comparison.to_string(index=False))

    regression = sim.run(sim.Experiment(task="noisy-sine", workers=4, steps=steps, batch_size=16, optimizer="adam",
                                        lr=1e-2, compressor={"name": "powersgd", "rank": 1}, eval_every=0))
    print(f"regression: test loss {regression.history.test_loss.iloc[-1]:.4f}")

    # what-if: the same model at 8 and 64 workers on 10 GbE, with 50 ms of compute per step on the target GPU
    whatif = sim.whatif(base, compressors=["identity", {"name": "powersgd", "rank": 2}], workers=[8, 64],
                        networks=["ethernet-10g"], compute=0.05, codec="none")
    print(whatif[["compressor", "workers", "step_s", "speedup"]].to_string(index=False))
    return {"result": result, "table": table, "comparison": comparison, "regression": regression, "whatif": whatif}


if __name__ == "__main__":
    assert "marked-token" in TASK_REGISTRY
    main()
