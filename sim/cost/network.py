"""The network a step is priced on: alpha-beta links, an all-reduce algorithm, and an optional two-level topology.

A flat network is one link type between every pair of workers: latency ``alpha`` (seconds per message) and
``bandwidth`` (bytes per second; beta = 1 / bandwidth). A hierarchical network groups ``devices_per_node``
workers per node on a fast intra-node link (``intra_alpha``, ``intra_bandwidth``) and connects nodes by the
inter-node link (``alpha``, ``bandwidth``, shared by all devices of a node). For p workers and d devices per
node, N = p / d nodes:

    all-reduce(n)  = ring reduce-scatter(n, d, intra) + all-reduce_algorithm(n, N, inter) + ring all-gather(n/d, d, intra)
    all-gather(m)  = ring all-gather(m, d, intra) + all-gather_algorithm(d m, N, inter) + ring all-gather((N-1) m, d, intra)

(the two-level scheme of NCCL/Horovod hierarchical all-reduce; the inter-node phase moves the node's whole
share through its one NIC). p <= d is one node: the flat formula on the intra link. d = 1 is the flat network.
Formulas: ``theory.collectives``. ``op_links`` overrides the inter-node link per collective (what ``calibrate``
fits: gloo's all-reduce and all-gather have different effective alpha and beta). An op link may carry a
knee: ``knee_bytes`` k and ``bandwidth_above_knee``; then a message of n bytes (per worker; in a two-level
all-gather's inter-node phase, the node's d x m) pays beta on its first k bytes and beta_above on the rest,
i.e. the formulas run with

    beta_eff(n) = (min(n, k) beta + max(0, n - k) beta_above) / n

(a piecewise Hockney model, as MPI libraries tune per message-size range: on one host, messages beyond the
caches move at memory speed).

``sync`` (seconds, default 0) is added once to every collective: what a collective costs inside a running
training loop beyond its alpha-beta time measured after a barrier (on this project's CPU machine mostly the
hand-off that wakes a waiting rank through the backend's threads; also arrival skew and preemption). The
alpha-beta fit of ``calibrate`` cannot see it (it times collectives right after a barrier); ``fit_sync``
estimates it from real training steps. Presets leave it 0: a dedicated cluster's ranks run on their own cores.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from compressors.serialization import loads_json
from theory import collectives as tc

ALGORITHMS = tc.ALL_REDUCE_ALGORITHMS
OPS = ("all_reduce", "all_gather")
GBIT = 1e9 / 8  # bytes per second in one Gbit/s
_LINK_KEYS = {"alpha", "bandwidth"}
_KNEE_KEYS = {"knee_bytes", "bandwidth_above_knee"}
GBYTE = 1e9

# all-gather counterpart of each all-reduce algorithm (a tree gathers as a ring does: (p-1) m bytes arrive)
_ALL_GATHER = {
    "ring": tc.ring_all_gather,
    "tree": tc.ring_all_gather,
    "recursive_doubling": tc.recursive_doubling_all_gather,
    "rabenseifner": tc.recursive_doubling_all_gather,
    "parameter_server": tc.parameter_server_all_gather,
}


def _positive(owner: str, field_name: str, value, allow_zero: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        allowed = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise ValueError(f"{owner}: {field_name}={value!r} is invalid; allowed: {allowed}")
    return float(value)


@dataclass(frozen=True)
class Network:
    """alpha: seconds per message; bandwidth: bytes per second (beta = 1 / bandwidth). See the module docstring."""

    alpha: float
    bandwidth: float
    algorithm: str = "ring"
    devices_per_node: int = 1
    intra_alpha: float | None = None  # None: the inter-node link's value
    intra_bandwidth: float | None = None
    op_links: dict = field(default_factory=dict)  # {"all_reduce": {"alpha": a, "bandwidth": b}, ...}
    sync: float = 0.0  # seconds added to every collective issued from a busy loop (see the module docstring)
    name: str = ""

    def __post_init__(self):
        owner = f"Network({self.name or 'unnamed'})"
        _positive(owner, "alpha", self.alpha, allow_zero=True)
        _positive(owner, "bandwidth", self.bandwidth, allow_zero=False)
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"{owner}: algorithm={self.algorithm!r} is invalid; allowed: {', '.join(ALGORITHMS)}")
        d = self.devices_per_node
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise ValueError(f"{owner}: devices_per_node={d!r} is invalid; allowed: an integer >= 1")
        if self.intra_alpha is not None:
            _positive(owner, "intra_alpha", self.intra_alpha, allow_zero=True)
        if self.intra_bandwidth is not None:
            _positive(owner, "intra_bandwidth", self.intra_bandwidth, allow_zero=False)
        _positive(owner, "sync", self.sync, allow_zero=True)
        if not isinstance(self.op_links, dict):
            raise ValueError(f"{owner}: op_links={self.op_links!r} is invalid; allowed: a dict op -> link")
        for op, link in self.op_links.items():
            if op not in OPS:
                raise ValueError(f"{owner}: op_links key {op!r} is invalid; allowed: {', '.join(OPS)}")
            if not isinstance(link, dict) or set(link) not in (_LINK_KEYS, _LINK_KEYS | _KNEE_KEYS):
                raise ValueError(f"{owner}: op_links[{op!r}]={link!r} is invalid; allowed: a dict with exactly "
                                 "'alpha' and 'bandwidth', optionally with both 'knee_bytes' and "
                                 "'bandwidth_above_knee'")
            _positive(owner, f"op_links[{op!r}].alpha", link["alpha"], allow_zero=True)
            _positive(owner, f"op_links[{op!r}].bandwidth", link["bandwidth"], allow_zero=False)
            if "knee_bytes" in link:
                _positive(owner, f"op_links[{op!r}].knee_bytes", link["knee_bytes"], allow_zero=False)
                _positive(owner, f"op_links[{op!r}].bandwidth_above_knee", link["bandwidth_above_knee"],
                          allow_zero=False)

    # -- links ---------------------------------------------------------------------------------------------
    @property
    def beta(self) -> float:
        return 1.0 / self.bandwidth

    def inter_link(self, op: str, n_bytes: float = 0.0) -> tuple[float, float]:
        """(alpha, beta) of the inter-node (flat) link for this collective, beta for an ``n_bytes`` message
        (``beta_eff(n)`` when the op's link has a knee; see the module docstring)."""
        link = self.op_links.get(op)
        if link is None:
            return self.alpha, self.beta
        beta = 1.0 / float(link["bandwidth"])
        if "knee_bytes" in link and n_bytes > link["knee_bytes"]:
            knee, above = float(link["knee_bytes"]), 1.0 / float(link["bandwidth_above_knee"])
            beta = (knee * beta + (n_bytes - knee) * above) / n_bytes
        return float(link["alpha"]), beta

    def intra_link(self) -> tuple[float, float]:
        alpha = self.alpha if self.intra_alpha is None else self.intra_alpha
        bandwidth = self.bandwidth if self.intra_bandwidth is None else self.intra_bandwidth
        return alpha, 1.0 / bandwidth

    def flat_intra(self) -> Network:
        """The one-node network: the intra link, flat, same algorithm."""
        alpha, beta = self.intra_link()
        return Network(alpha=alpha, bandwidth=1.0 / beta, algorithm=self.algorithm, name=f"{self.name}/intra")

    def nodes(self, workers: int) -> int:
        """N = p / d (1 when p <= d). p must be a multiple of d when it spans several nodes."""
        check_workers(workers)
        d = self.devices_per_node
        if workers <= d:
            return 1
        if workers % d:
            raise ValueError(f"Network({self.name}): workers={workers} is invalid for devices_per_node={d}; "
                             f"allowed: <= {d} or a multiple of {d}")
        return workers // d

    # -- collective times -----------------------------------------------------------------------------------
    def all_reduce_time(self, n_bytes: float, workers: int) -> float:
        """Seconds to all-reduce an n-byte vector on ``workers`` workers."""
        nodes = self.nodes(workers)
        if self.devices_per_node == 1:
            alpha, beta = self.inter_link("all_reduce", n_bytes)
            return tc.all_reduce(n_bytes, workers, alpha, beta, self.algorithm)
        if nodes == 1:
            return self.flat_intra().all_reduce_time(n_bytes, workers)
        d = self.devices_per_node
        a_in, b_in = self.intra_link()
        alpha, beta = self.inter_link("all_reduce", n_bytes)
        return (tc.ring_reduce_scatter(n_bytes, d, a_in, b_in)
                + tc.all_reduce(n_bytes, nodes, alpha, beta, self.algorithm)
                + tc.ring_all_gather(n_bytes / d, d, a_in, b_in))

    def all_gather_time(self, m_bytes: float, workers: int) -> float:
        """Seconds to all-gather m bytes from each of ``workers`` workers."""
        nodes = self.nodes(workers)
        gather = _ALL_GATHER[self.algorithm]
        if self.devices_per_node == 1:
            alpha, beta = self.inter_link("all_gather", m_bytes)
            return gather(m_bytes, workers, alpha, beta)
        if nodes == 1:
            return self.flat_intra().all_gather_time(m_bytes, workers)
        d = self.devices_per_node
        a_in, b_in = self.intra_link()
        alpha, beta = self.inter_link("all_gather", d * m_bytes)
        return (tc.ring_all_gather(m_bytes, d, a_in, b_in)
                + gather(d * m_bytes, nodes, alpha, beta)
                + tc.ring_all_gather((nodes - 1) * m_bytes, d, a_in, b_in))

    def time(self, op: str, payload_bytes: float, workers: int) -> float:
        """Price one collective: ``payload_bytes`` is what ONE worker contributes (the ledger's bits / 8);
        the alpha-beta time plus ``sync`` (none for one worker: nothing to wait for)."""
        sync = self.sync if workers > 1 else 0.0
        if op == "all_reduce":
            return self.all_reduce_time(payload_bytes, workers) + sync
        if op == "all_gather":
            return self.all_gather_time(payload_bytes, workers) + sync
        raise ValueError(f"Network.time: op={op!r} is invalid; allowed: {', '.join(OPS)}")

    # -- persistence ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Network:
        if not isinstance(data, dict):
            raise ValueError(f"Network.from_dict: data={data!r} is invalid; allowed: a dict")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Network: field {unknown[0]!r} is invalid; allowed: {', '.join(sorted(known))}")
        for required in ("alpha", "bandwidth"):
            if required not in data:
                raise ValueError(f"Network: field {required!r} is missing; allowed: {', '.join(sorted(known))}")
        return cls(**data)

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path) -> Network:
        return cls.from_dict(loads_json(Path(path).read_text()))  # nesting bounded: a ValueError, never recursion

    def with_(self, **changes) -> Network:
        return replace(self, **changes)


def check_workers(workers) -> int:
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"cost model: workers={workers!r} is invalid; allowed: an integer >= 1")
    return workers
