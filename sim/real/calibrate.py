"""Calibrate the alpha-beta model on this machine: time real all-reduce and all-gather over message sizes on
2, 3, 4 processes (gloo on 127.0.0.1), fit alpha and beta per collective, save a ``Network``, and report the
error on message sizes held out of the fit.

Fit: for every measurement i (collective op, p processes, n bytes, seconds t_i) the ring model of
``theory.collectives`` is linear in (alpha, beta): t = a_i alpha + b_i beta with a_i = 2(p-1), b_i = 2(p-1)/p n
(all-reduce) or a_i = p-1, b_i = (p-1) n (all-gather, n per process). We minimise the relative error
sum_i ((a_i alpha + b_i beta - t_i) / t_i)^2 over alpha, beta >= 0 (non-negative least squares), on every
other message size; the sizes in between are held out. With a knee k (``Network``'s piecewise beta: beta on
the first k bytes, beta_above beyond) the model stays linear, in (alpha, beta, beta_above); k is chosen
among the fitted sizes in ``KNEE_RANGE`` (or none) by Akaike's criterion, on the fitted sizes only.

Timing: sizes and ops in a fixed shuffled order, the repeats in rounds over all of them (60 for small
messages, 5 for the largest); each timed call follows a barrier; each call's time is the maximum over ranks
(the collective ends when its slowest rank does); a low quantile (``QUANTILE``) of the repeats is kept, the
median stored beside it.

Per ``nproc`` (what ``python -m sim calibrate --nproc p`` saves) and jointly over all p (one link per
collective for every p: a test of the model's p-scaling; on a machine with fewer cores than processes it
fails, as the scheduler, not the network, sets the time).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..cost.network import Network
from .distributed import exit_without_finalizers, private_directory
from .link import ShapedLink, enter_namespace, shaped_namespace

OPS = ("all_reduce", "all_gather")
#: The statistic kept per size: a low quantile of the repeats estimates the uncontended time (what a
#: dedicated machine does); the median mixes in preemption by unrelated processes on a shared machine. Both
#: are stored (``seconds`` = this quantile, ``seconds_median``, ``seconds_min``).
QUANTILE = 0.2
DEFAULT_SIZES = tuple(2**k for k in range(2, 26))  # 4 B .. 32 MiB, factor 2: every other one is held out


def _trials(size: int) -> int:
    # Small messages are cheap and their times bimodal under load (a rank scheduled or not): many repeats
    # keep the low quantile from jumping between the modes from one size to the next.
    return 60 if size < 2**16 else 12 if size < 2**22 else 5


def _call(op: str, x, out) -> None:
    import torch.distributed as dist

    if op == "all_reduce":
        dist.all_reduce(x)
    else:
        dist.all_gather(out, x)


def _worker(rank: int, nproc: int, init_method: str, backend: str, sizes, out_path: str,
            namespace: str | None = None) -> None:
    import torch
    import torch.distributed as dist

    if namespace is not None:  # a shaped link: this rank's sockets go through the namespace's loopback
        enter_namespace(namespace)
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)  # nproc processes share the cores: no intra-op oversubscription
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=nproc)
    # Every (op, size) in a fixed shuffled order, and the repeats in rounds over all of them: each size's
    # samples spread over the whole run, so a burst of load from other processes lands on every size a little
    # instead of bending one stretch of the curve (the neighbours a held-out size is predicted from).
    order = [(op, size) for op in OPS for size in sizes]
    order = [order[i] for i in torch.randperm(len(order), generator=torch.Generator().manual_seed(0)).tolist()]
    buffers = {}
    try:
        for op, size in order:
            x = torch.ones(max(1, size // 4))  # float32
            buffers[op, size] = (x, [torch.empty_like(x) for _ in range(nproc)] if op == "all_gather" else None)
            _call(op, *buffers[op, size])  # warm-up: connection set-up, allocation
        times = {key: [] for key in order}
        for trial in range(max(_trials(size) for size in sizes)):
            for op, size in order:
                if trial < _trials(size):
                    dist.barrier()
                    start = time.perf_counter()
                    _call(op, *buffers[op, size])
                    times[op, size].append(time.perf_counter() - start)
        rows = []
        for op, size in order:
            slowest = torch.tensor(times[op, size], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a collective ends when its slowest rank does
            ordered = sorted(slowest.tolist())
            rows.append({"op": op, "nproc": nproc, "bytes": buffers[op, size][0].numel() * 4,
                         "seconds": ordered[int(QUANTILE * (len(ordered) - 1))],
                         "seconds_median": statistics.median(ordered), "seconds_min": ordered[0]})
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))

    exit_without_finalizers()  # results written: no interpreter finalization to abort in


def measure(nproc: int, backend: str = "gloo", sizes=DEFAULT_SIZES, link: str | ShapedLink | None = None
            ) -> pd.DataFrame:
    """Seconds of all-reduce and all-gather for each size (bytes per process) on ``nproc`` processes, over this
    machine's loopback or, with ``link``, over a shaped link of that rate (sim/real/link.py)."""
    if not isinstance(nproc, int) or nproc < 2:
        raise ValueError(f"calibrate: nproc={nproc!r} is invalid; allowed: an integer >= 2")
    if backend != "gloo":
        raise ValueError(f"calibrate: backend={backend!r} is invalid; allowed: 'gloo' (CPU, 127.0.0.1)")
    if link is None:
        return _measure(nproc, backend, sizes, None)
    with shaped_namespace(ShapedLink.parse(link)) as namespace:
        return _measure(nproc, backend, sizes, namespace)


def _measure(nproc: int, backend: str, sizes, namespace: str | None) -> pd.DataFrame:
    import torch.multiprocessing as mp

    with private_directory("calibrate") as tmp:
        out = os.path.join(tmp, "rows.json")
        rendezvous = "file://" + os.path.join(tmp, "rendezvous")  # no TCP port to race for
        mp.spawn(_worker, args=(nproc, rendezvous, backend, tuple(sizes), out, namespace), nprocs=nproc, join=True)
        rows = pd.DataFrame(json.loads(Path(out).read_text()))  # in the shuffled order they were timed
        return rows.sort_values(["op", "bytes"]).reset_index(drop=True)


def sizes_for(link: str | ShapedLink | None, max_bytes: int | None = None) -> tuple[int, ...]:
    """The message sizes to time: ``DEFAULT_SIZES`` up to ``max_bytes``; on a shaped link by default only up to
    what crosses it in about one second (a 32 MiB all-reduce at 100 Mbit/s takes 5 s per call); the largest
    sizes must reach well past the bucket's burst, where the rate sets the time (the knee of the fit)."""
    if max_bytes is None:
        max_bytes = DEFAULT_SIZES[-1] if link is None else int(ShapedLink.parse(link).rate_bits / 8 * 1.0)
    return tuple(s for s in DEFAULT_SIZES if s <= max_bytes)


def design(op: str, nproc, n_bytes) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (a, b) of alpha and beta in the ring formula of ``op``."""
    p = np.asarray(nproc, dtype=float)
    n = np.asarray(n_bytes, dtype=float)
    if op == "all_reduce":
        return 2 * (p - 1), 2 * (p - 1) / p * n
    return p - 1, (p - 1) * n


#: Knee candidates (bytes per process): where beta is identifiable on both sides (below ~256 KiB latency
#: dominates a collective, so a knee there would fit noise) and messages leave the caches.
KNEE_RANGE = (2**18, 2**23)


@dataclass(frozen=True)
class Link:
    """A fitted collective: alpha, beta up to ``knee`` bytes, ``beta_above`` beyond (``Network``'s op link)."""

    alpha: float
    beta: float
    knee: float | None = None
    beta_above: float | None = None

    def as_op_link(self) -> dict:
        link = {"alpha": self.alpha, "bandwidth": 1.0 / self.beta}
        if self.knee is not None:
            link.update(knee_bytes=self.knee, bandwidth_above_knee=1.0 / self.beta_above)
        return link


def _columns(op: str, nproc, n_bytes, knee: float | None) -> np.ndarray:
    """Design matrix of (alpha, beta[, beta_above]): the ring formula with beta_eff(n) of ``Network``."""
    a, b = design(op, nproc, n_bytes)
    if knee is None:
        return np.stack([a, b], axis=1)
    n = np.asarray(n_bytes, dtype=float)
    per_byte = b / n
    return np.stack([a, per_byte * np.minimum(n, knee), per_byte * np.maximum(0.0, n - knee)], axis=1)


def _aic(residual: float, n: int, params: int) -> float:
    """Akaike's criterion of a least-squares fit: n ln(RSS / n) + 2 params (RSS floored at a relative error of
    1e-10 per point, so two exact fits tie and the simpler one wins)."""
    return n * math.log(max(residual**2 / n, 1e-20)) + 2 * params


def _fit_op(op: str, rows: pd.DataFrame) -> Link:
    """Non-negative least squares on relative error; a knee only where Akaike's criterion prefers it.

    The knee model contains the plain one, so on noisy data it always leaves a smaller residual; AIC charges
    it two more parameters (beta_above and k), so a knee is kept only for a real bend. Candidates: the
    fitted sizes in ``KNEE_RANGE`` with at least two fitted sizes on each side."""
    from scipy.optimize import nnls

    t = rows.seconds.to_numpy()
    sizes = sorted(set(rows.bytes))
    candidates = [float(k) for i, k in enumerate(sizes)
                  if KNEE_RANGE[0] <= k <= KNEE_RANGE[1] and i >= 1 and len(sizes) - 1 - i >= 2]
    best = None
    for knee in [None] + candidates:
        coef, residual = nnls(_columns(op, rows.nproc, rows.bytes, knee) / t[:, None], np.ones_like(t))
        score = _aic(residual, len(t), 2 if knee is None else 4)
        if best is None or score < best[0]:
            best = (score, knee, coef)
    _, knee, coef = best
    if knee is None:
        return Link(float(coef[0]), float(max(coef[1], 1e-15)))
    return Link(float(coef[0]), float(max(coef[1], 1e-15)), knee, float(max(coef[2], 1e-15)))


def fit(measurements: pd.DataFrame) -> dict[str, Link]:
    """{op: Link} by non-negative least squares on relative error (``_fit_op``)."""
    return {op: _fit_op(op, rows) for op, rows in measurements.groupby("op")}


def predict(links: dict[str, Link], measurements: pd.DataFrame) -> np.ndarray:
    out = np.empty(len(measurements))
    for i, (op, p, n) in enumerate(zip(measurements.op, measurements.nproc, measurements.bytes)):
        link = links[op]
        coef = [link.alpha, link.beta] + ([link.beta_above] if link.knee is not None else [])
        out[i] = float(_columns(op, [p], [n], link.knee)[0] @ np.asarray(coef))
    return out


@dataclass
class Calibration:
    networks: dict  # nproc -> Network fitted on that nproc's measurements
    joint: Network  # one fit over every nproc
    measurements: pd.DataFrame  # op, nproc, bytes, seconds, held_out, predicted, rel_error, *_joint

    def held_out_error(self, by=None, column: str = "rel_error") -> float | pd.Series:
        """Median absolute relative error on the held-out sizes (per group when ``by`` is given)."""
        held = self.measurements[self.measurements.held_out]
        if by is None:
            return float(held[column].abs().median())
        return held.groupby(by)[column].apply(lambda e: float(e.abs().median()))


def _network(links: dict[str, Link], name: str) -> Network:
    op_links = {op: link.as_op_link() for op, link in links.items()}
    return Network(alpha=links["all_reduce"].alpha, bandwidth=1.0 / links["all_reduce"].beta, algorithm="ring",
                   op_links=op_links, name=name)


def calibrate(nprocs=(2, 3, 4), backend: str = "gloo", sizes=DEFAULT_SIZES, measurements: pd.DataFrame | None = None,
              name: str = "calibrated-gloo-localhost", link: str | ShapedLink | None = None) -> Calibration:
    """Measure (unless ``measurements`` are given), fit on even-indexed sizes, evaluate on the odd ones.
    ``link``: measure over a shaped link of that rate (sim/real/link.py) instead of the bare loopback."""
    if measurements is None:
        measurements = pd.concat([measure(p, backend, sizes, link) for p in nprocs], ignore_index=True)
    data = measurements.reset_index(drop=True).copy()
    order = {size: i for i, size in enumerate(sorted(data.bytes.unique()))}
    data["held_out"] = [order[s] % 2 == 1 for s in data.bytes]
    networks, data["predicted"] = {}, np.nan
    for p, rows in data.groupby("nproc"):
        links = fit(rows[~rows.held_out])
        networks[int(p)] = _network(links, f"{name}-p{p}")
        data.loc[rows.index, "predicted"] = predict(links, rows)
    joint_links = fit(data[~data.held_out])
    data["predicted_joint"] = predict(joint_links, data)
    data["rel_error"] = (data.predicted - data.seconds) / data.seconds
    data["rel_error_joint"] = (data.predicted_joint - data.seconds) / data.seconds
    return Calibration(networks, _network(joint_links, name), data)


def fit_sync(gaps, collectives) -> float:
    """Seconds each collective costs inside a training loop beyond the alpha-beta model (``Network.sync``).

    ``gaps[i]``: measured minus predicted (without sync) seconds per step of real run i, which issues
    ``collectives[i]`` collectives per step. Least squares through the origin, gap = sync x collectives:

        sync = sum_i gap_i c_i / sum_i c_i^2,   clipped at 0

    Fit it on some runs (e.g. the uncompressed ones) and judge it on others.
    """
    g = np.asarray(gaps, dtype=float)
    c = np.asarray(collectives, dtype=float)
    if g.shape != c.shape or g.size == 0 or not np.isfinite(g).all() or not np.isfinite(c).all() or (c <= 0).any():
        raise ValueError(f"fit_sync: gaps and collectives are invalid (shapes {g.shape}, {c.shape}); allowed: "
                         "equal non-empty lengths, finite gaps, finite collectives > 0")
    return float(max(0.0, (g * c).sum() / (c * c).sum()))
