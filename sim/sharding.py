"""Splitting the training set over workers, and each worker's batches.

- ``"iid"``: a seeded permutation cut into W near-equal shards.
- ``"label_skew"``: for each class, its samples are divided among workers in proportions drawn from
  Dirichlet(alpha) (Hsu, Qi, Brown 2019). alpha -> infinity approaches iid; alpha = 0.1 gives most
  workers a few classes. Every worker gets at least one sample.

Batches are a pure function of (seed, worker, step): epoch-wise shuffling without replacement when a shard
holds at least one batch, sampling with replacement otherwise, so any worker count runs and a resumed run
sees the same data order without storing sampler state.
"""
from __future__ import annotations

import numpy as np
import torch

SHARDINGS = ("iid", "label_skew")


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def make_shards(labels: torch.Tensor, workers: int, mode: str, alpha: float, seed: int) -> list[torch.Tensor]:
    n = len(labels)
    if mode == "iid":
        order = _rng(seed, 1).permutation(n)
        return [torch.as_tensor(part, dtype=torch.long) for part in np.array_split(order, workers)]
    rng = _rng(seed, 2)
    labels_np = labels.cpu().numpy()
    parts: list[list[int]] = [[] for _ in range(workers)]
    for cls in np.unique(labels_np):
        members = rng.permutation(np.flatnonzero(labels_np == cls))
        cuts = (np.cumsum(rng.dirichlet(np.full(workers, alpha))) * len(members)).astype(int)[:-1]
        for w, chunk in enumerate(np.split(members, cuts)):
            parts[w].extend(chunk.tolist())
    for w in range(workers):  # no worker may be empty: take one sample from the largest shard
        if not parts[w]:
            donor = max(range(workers), key=lambda i: len(parts[i]))
            parts[w].append(parts[donor].pop())
    return [torch.as_tensor(sorted(p), dtype=torch.long) for p in parts]


class BatchSampler:
    """Global sample indices of each worker's batch at a given step."""

    def __init__(self, shards: list[torch.Tensor], batch_size: int, seed: int):
        self.shards = shards
        self.batch_size = batch_size
        self.seed = seed
        self._epoch_order: dict[int, tuple[int, torch.Tensor]] = {}  # worker -> (epoch, shard in that epoch's order): a cache only

    def worker_batch(self, worker: int, step: int) -> torch.Tensor:
        shard = self.shards[worker]
        size, b = len(shard), self.batch_size
        if size < b:
            picks = _rng(self.seed, 3, worker, step).integers(0, size, b)
            return shard[torch.as_tensor(picks)]
        per_epoch = size // b
        epoch, position = divmod(step, per_epoch)
        cached = self._epoch_order.get(worker)
        if cached is None or cached[0] != epoch:  # once per epoch: the shard permuted, then batches are slices
            cached = (epoch, shard[torch.as_tensor(_rng(self.seed, 4, worker, epoch).permutation(size))])
            self._epoch_order[worker] = cached
        return cached[1][position * b:(position + 1) * b]

    def batch(self, workers: range, step: int) -> torch.Tensor:
        return torch.stack([self.worker_batch(w, step) for w in workers])  # (k, B)
