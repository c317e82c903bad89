"""Collective costs in the alpha-beta (Hockney) model: time = (messages) * alpha + (bytes on the busiest link) * beta.

Symbols (as in the sources): p workers; n bytes of the vector being reduced (all-reduce, reduce-scatter,
broadcast) or m bytes that ONE worker contributes (all-gather); alpha the per-message latency in seconds;
beta = 1 / bandwidth, seconds per byte. Assumptions of every formula: full-duplex links, one port per worker
(a worker sends and receives one message at a time), no contention, reduction arithmetic free (gamma = 0).
p need not be a power of two for ring algorithms; the logarithmic algorithms use ceil(log2 p) rounds, which is
exact for powers of two and the usual approximation otherwise (Thakur et al. add a pre-/post-step there).

Sources:
- [TRG05] R. Thakur, R. Rabenseifner, W. Gropp, "Optimization of Collective Communication Operations in
  MPICH", IJHPCA 19(1), 2005. Sections 4.1-4.5 give the costs used below.
- [PY09] P. Patarasuk, X. Yuan, "Bandwidth optimal all-reduce algorithms for clusters of workstations",
  JPDC 69(2), 2009: the ring all-reduce is bandwidth-optimal, 2 (p-1)/p n beta is a lower bound.
- [NCCL] NVIDIA nccl-tests, doc/PERFORMANCE.md: "bus bandwidth" busbw = algbw * factor, factor
  2(p-1)/p for all-reduce, (p-1)/p for reduce-scatter and all-gather, 1 for broadcast and reduce.
- [PS14] M. Li et al., "Scaling Distributed Machine Learning with the Parameter Server", OSDI 2014 (the
  architecture; the cost below is the alpha-beta reading of one server that receives and sends every push/pull).
"""
from __future__ import annotations

import math

ALL_REDUCE_ALGORITHMS = ("ring", "tree", "recursive_doubling", "rabenseifner", "parameter_server")


def _check(n: float, p: int, alpha: float, beta: float) -> None:
    if not (isinstance(p, int) and not isinstance(p, bool)) or p < 1:
        raise ValueError(f"theory.collectives: workers p={p!r} is invalid; allowed: an integer >= 1")
    for name, value in (("n", n), ("alpha", alpha), ("beta", beta)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)) or not math.isfinite(value) \
                or value < 0:
            raise ValueError(f"theory.collectives: {name}={value!r} is invalid; allowed: a finite number >= 0")


def log2_ceil(p: int) -> int:
    """ceil(log2 p): the number of rounds of a binomial tree or recursive doubling (0 for p = 1)."""
    return (p - 1).bit_length()


# -- all-reduce ------------------------------------------------------------------------------------------------

def ring_all_reduce(n: float, p: int, alpha: float, beta: float) -> float:
    """Ring all-reduce = ring reduce-scatter + ring all-gather [PY09; TRG05 sec. 4.5]:

        T = 2 (p - 1) alpha + 2 (p - 1) / p * n * beta.

    Bandwidth-optimal [PY09]; latency linear in p.
    """
    _check(n, p, alpha, beta)
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * n * beta


def tree_all_reduce(n: float, p: int, alpha: float, beta: float) -> float:
    """Binomial-tree reduce to a root, then binomial-tree broadcast, whole vector per message [TRG05 sec. 4.3-4.4]:

        T = 2 ceil(log2 p) (alpha + n beta).

    Latency-optimal order (log p), but every round sends the whole vector: bad for large n.
    """
    _check(n, p, alpha, beta)
    return 2 * log2_ceil(p) * (alpha + n * beta)


def recursive_doubling_all_reduce(n: float, p: int, alpha: float, beta: float) -> float:
    """Recursive doubling, whole vector exchanged in each of log p rounds [TRG05 sec. 4.5]:

        T = ceil(log2 p) (alpha + n beta).

    The MPICH choice for short messages.
    """
    _check(n, p, alpha, beta)
    return log2_ceil(p) * (alpha + n * beta)


def rabenseifner_all_reduce(n: float, p: int, alpha: float, beta: float) -> float:
    """Rabenseifner: reduce-scatter by recursive halving, then all-gather by recursive doubling [TRG05 sec. 4.5]:

        T = 2 ceil(log2 p) alpha + 2 (p - 1) / p * n * beta.

    Bandwidth term of the ring, latency term of the tree: the MPICH choice for long messages.
    """
    _check(n, p, alpha, beta)
    return 2 * log2_ceil(p) * alpha + 2 * (p - 1) / p * n * beta


def parameter_server_all_reduce(n: float, p: int, alpha: float, beta: float) -> float:
    """One parameter server [PS14]: every worker pushes n bytes, the server sums, every worker pulls n bytes.
    The server's link carries p n bytes in, then p n bytes out:

        T = 2 (alpha + p n beta).

    (p = 1: no network, T = 0.) Linear in p on the bandwidth term: the bottleneck that ring all-reduce removes.
    """
    _check(n, p, alpha, beta)
    return 0.0 if p == 1 else 2 * (alpha + p * n * beta)


ALL_REDUCE = {
    "ring": ring_all_reduce,
    "tree": tree_all_reduce,
    "recursive_doubling": recursive_doubling_all_reduce,
    "rabenseifner": rabenseifner_all_reduce,
    "parameter_server": parameter_server_all_reduce,
}


def all_reduce(n: float, p: int, alpha: float, beta: float, algorithm: str = "ring") -> float:
    """All-reduce of n bytes on p workers with the named algorithm (one of ``ALL_REDUCE_ALGORITHMS``)."""
    if algorithm not in ALL_REDUCE:
        raise ValueError(f"theory.collectives: algorithm={algorithm!r} is invalid; allowed: "
                         + ", ".join(ALL_REDUCE_ALGORITHMS))
    return ALL_REDUCE[algorithm](n, p, alpha, beta)


# -- reduce-scatter, all-gather, broadcast -------------------------------------------------------------------

def ring_reduce_scatter(n: float, p: int, alpha: float, beta: float) -> float:
    """Ring reduce-scatter of an n-byte vector (each worker ends with n/p reduced bytes) [TRG05 sec. 4.4]:

        T = (p - 1) alpha + (p - 1) / p * n * beta.
    """
    _check(n, p, alpha, beta)
    return (p - 1) * alpha + (p - 1) / p * n * beta


def ring_all_gather(m: float, p: int, alpha: float, beta: float) -> float:
    """Ring all-gather, each worker contributing m bytes (so each receives (p-1) m) [TRG05 sec. 4.1]:

        T = (p - 1) alpha + (p - 1) m beta.

    Linear in p at fixed m: a compressed payload that cannot be summed in place (top-k indices, signs,
    quantized levels) is gathered, and its cost grows with the number of workers.
    """
    _check(m, p, alpha, beta)
    return (p - 1) * (alpha + m * beta)


def recursive_doubling_all_gather(m: float, p: int, alpha: float, beta: float) -> float:
    """Recursive-doubling all-gather, m bytes per worker [TRG05 sec. 4.1]:

        T = ceil(log2 p) alpha + (p - 1) m beta.
    """
    _check(m, p, alpha, beta)
    return log2_ceil(p) * alpha + (p - 1) * m * beta


def parameter_server_all_gather(m: float, p: int, alpha: float, beta: float) -> float:
    """A server collects p payloads of m bytes and sends all of them to every worker (nothing to sum):

        T = 2 alpha + (p m + p * p m) beta      (in: p m; out: p m to each of p workers).
    """
    _check(m, p, alpha, beta)
    return 0.0 if p == 1 else 2 * alpha + (p * m + p * p * m) * beta


def binomial_broadcast(n: float, p: int, alpha: float, beta: float) -> float:
    """Binomial-tree broadcast of n bytes [TRG05 sec. 4.2]:  T = ceil(log2 p) (alpha + n beta)."""
    _check(n, p, alpha, beta)
    return log2_ceil(p) * (alpha + n * beta)


def scatter_allgather_broadcast(n: float, p: int, alpha: float, beta: float) -> float:
    """Van de Geijn long-message broadcast: binomial scatter then ring all-gather [TRG05 sec. 4.2]:

        T = (ceil(log2 p) + p - 1) alpha + 2 (p - 1) / p * n * beta.
    """
    _check(n, p, alpha, beta)
    return (log2_ceil(p) + p - 1) * alpha + 2 * (p - 1) / p * n * beta


# -- bus bandwidth (nccl-tests) -------------------------------------------------------------------------------

BUS_BANDWIDTH_FACTORS = {
    "all_reduce": lambda p: 2 * (p - 1) / p,
    "reduce_scatter": lambda p: (p - 1) / p,
    "all_gather": lambda p: (p - 1) / p,
    "broadcast": lambda p: 1.0,
    "reduce": lambda p: 1.0,
    "alltoall": lambda p: (p - 1) / p,
}


def bus_bandwidth_factor(op: str, p: int) -> float:
    """nccl-tests' busbw / algbw [NCCL]: 2(p-1)/p for all-reduce, (p-1)/p for reduce-scatter, all-gather and
    all-to-all, 1 for broadcast and reduce. algbw = S / t with S the operation's size (for all-gather: the
    gathered total p m). busbw is then comparable to the link's bandwidth whatever p is: an optimal ring
    at alpha = 0 has busbw = 1 / beta exactly.
    """
    if op not in BUS_BANDWIDTH_FACTORS:
        raise ValueError(f"theory.collectives: op={op!r} is invalid; allowed: " + ", ".join(BUS_BANDWIDTH_FACTORS))
    _check(0, p, 0, 0)
    return BUS_BANDWIDTH_FACTORS[op](p)


def bus_bandwidth(op: str, size: float, seconds: float, p: int) -> float:
    """busbw = (size / seconds) * factor(op, p), bytes per second [NCCL]."""
    if not seconds > 0:
        raise ValueError(f"theory.collectives: seconds={seconds!r} is invalid; allowed: a number > 0")
    return size / seconds * bus_bandwidth_factor(op, p)


# -- all-gather compressor vs dense all-reduce -----------------------------------------------------------------

def all_gather_beats_ring_all_reduce(n: float, rho: float, p: int, alpha: float, beta: float) -> bool:
    """Whether gathering a payload compressed rho-fold (m = n / rho bytes per worker) is faster than a dense
    ring all-reduce of n bytes:

        (p-1)(alpha + n beta / rho)  <  2 (p-1) alpha + 2 (p-1)/p n beta
        <=>  n beta / rho  <  alpha + 2 n beta / p          (p >= 2)
        <=>  rho  >  rho* = n beta / (alpha + 2 n beta / p).

    At alpha = 0 this is rho > p / 2 [the bandwidth argument of PY09 applied to the compressed gather]; latency
    lowers the threshold (the gather pays p-1 latencies, the all-reduce 2(p-1)). Strict: a tie is not a win.
    """
    if not rho > 0:
        raise ValueError(f"theory.collectives: rho={rho!r} is invalid; allowed: a number > 0")
    return ring_all_gather(n / rho, p, alpha, beta) < ring_all_reduce(n, p, alpha, beta)


def crossover_compression_ratio(n: float, p: int, alpha: float, beta: float) -> float:
    """rho* = n beta / (alpha + 2 n beta / p): the compression ratio above which a ring all-gather of n / rho
    bytes per worker beats a dense ring all-reduce of n bytes (p / 2 when alpha = 0). Infinite for p = 1
    (nothing to communicate, nothing to win); 0 when n beta = 0.
    """
    _check(n, p, alpha, beta)
    if p == 1:
        return math.inf
    denominator = alpha + 2 * n * beta / p
    return 0.0 if n * beta == 0 else n * beta / denominator
