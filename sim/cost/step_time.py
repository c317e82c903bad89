"""Seconds of one data-parallel step, priced from the ledger of a real simulated step.

    step = compute + encode/decode + (communication not hidden behind the backward pass)

Overlap model ("buckets", the DDP scheme): the gradient is cut into K buckets of ``bucket_bytes`` (DDP's
default cap: 25 MiB) of the model's dense gradient; backward produces them at a uniform rate (bucket i ready
at B * (bytes of buckets 1..i) / total, B the backward time: an assumption, gradients of early layers come
last in reality). Each bucket runs the step's whole sequence of collectives on its share of every record's
payload, one after the other (PowerSGD's P then Q: each pays its own latency, in every bucket); buckets use
one communication channel in order: end_i = max(ready_i, end_{i-1}) + sum_r T_r(share_i). The exposed
communication is end_K - B. "none": all collectives after the backward pass, each record once, whole.
Encode/decode is never overlapped (it runs on the compute stream in the DDP hooks), so it adds in full.
Collective times: ``Network.time`` (``theory.collectives``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from compressors.comm import LedgerRecord
from .network import Network, OPS, check_workers
from .presets import resolve_network


OVERLAPS = ("buckets", "none")
DDP_BUCKET_BYTES = 25 * 2**20  # torch DistributedDataParallel(bucket_cap_mb=25)
BACKWARD_FRACTION = 2 / 3  # backward ~ 2x forward in FLOPs (Kaplan et al. 2020, sec. 2.1)


@dataclass(frozen=True)
class StepTime:
    compute: float  # forward + backward, seconds
    codec: float  # encode + decode, seconds
    comm: float  # all collectives back to back, seconds
    exposed: float  # communication not hidden behind the backward pass, seconds
    collectives: int  # collectives issued (records x buckets)
    bits: int  # payload bits one worker sends

    @property
    def total(self) -> float:
        return self.compute + self.codec + self.exposed

    @property
    def comm_share(self) -> float:
        """Fraction of the step spent waiting for the network."""
        return self.exposed / self.total if self.total > 0 else 0.0


def check_records(records: Iterable[LedgerRecord], workers: int) -> list[LedgerRecord]:
    check_workers(workers)
    out = list(records)
    for record in out:
        if record.op not in OPS:
            raise ValueError(f"cost model: records op={record.op!r} is invalid; allowed: {', '.join(OPS)}")
        if record.workers != workers:
            raise ValueError(f"cost model: records come from a ledger with workers={record.workers}, "
                             f"priced for workers={workers}; field 'workers' must match")
        if record.bits < 0:
            raise ValueError(f"cost model: records bits={record.bits!r} is invalid; allowed: >= 0")
    return out


def _nonnegative(field: str, value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok:
        raise ValueError(f"cost model: {field}={value!r} is invalid; allowed: a finite number >= 0")
    return float(value)


def bucket_shares(dense_bytes: float, bucket_bytes: float) -> list[float]:
    """Fractions of the gradient in each DDP bucket, in the order backward fills them."""
    if dense_bytes <= 0:
        return [1.0]
    full, rest = divmod(dense_bytes, bucket_bytes)
    sizes = [bucket_bytes] * int(full) + ([rest] if rest > 0 else [])
    return [s / dense_bytes for s in sizes]


def step_time(network: Network, records: Iterable[LedgerRecord], workers: int, compute_seconds: float = 0.0,
              codec_seconds: float = 0.0, overlap: str = "buckets", backward_fraction: float = BACKWARD_FRACTION,
              bucket_bytes: float = DDP_BUCKET_BYTES, dense_bytes: float | None = None) -> StepTime:
    """Price one step. ``dense_bytes``: the model's gradient bytes, to cut buckets the same way for every
    compressor (default: the step's own payload, which gives a compressed step fewer, smaller buckets)."""
    if not isinstance(network, Network):
        raise ValueError(f"cost model: network={network!r} is invalid; allowed: a Network (see resolve_network)")
    records = check_records(records, workers)
    compute_seconds = _nonnegative("compute_seconds", compute_seconds)
    codec_seconds = _nonnegative("codec_seconds", codec_seconds)
    if overlap not in OVERLAPS:
        raise ValueError(f"cost model: overlap={overlap!r} is invalid; allowed: {', '.join(OVERLAPS)}")
    if not (isinstance(backward_fraction, (int, float)) and 0 <= backward_fraction <= 1):
        raise ValueError(f"cost model: backward_fraction={backward_fraction!r} is invalid; allowed: in [0, 1]")
    if not (isinstance(bucket_bytes, (int, float)) and bucket_bytes > 0):
        raise ValueError(f"cost model: bucket_bytes={bucket_bytes!r} is invalid; allowed: a number > 0")
    bits = sum(r.bits for r in records)

    def price(share: float) -> float:
        return sum(network.time(r.op, r.bits / 8 * share, workers) for r in records)

    whole = price(1.0)
    if overlap == "none" or not records:
        return StepTime(compute_seconds, codec_seconds, whole, whole, len(records), bits)
    dense = bits / 8 if dense_bytes is None else _nonnegative("dense_bytes", dense_bytes)
    shares = bucket_shares(dense, bucket_bytes)
    backward = compute_seconds * backward_fraction
    end, ready, comm = 0.0, 0.0, 0.0
    for share in shares:
        ready += backward * share
        seconds = price(share)
        comm += seconds
        end = max(ready, end) + seconds
    exposed = max(0.0, end - backward)
    return StepTime(compute_seconds, codec_seconds, comm, exposed, len(records) * len(shares), bits)


def price_step(network, records, workers: int, compute_seconds: float = 0.0, **options) -> float:
    """Seconds of one step from that step's ledger records (``network``: anything ``resolve_network`` takes)."""
    return step_time(resolve_network(network), records, workers, compute_seconds, **options).total
