"""Bits one worker sends per step, and compression ratios, for every scheme of the zoo (closed forms).

Every formula counts the payload exactly as the compressors encode it (``compressors/*``), so the property
suite can hold ``agg.bits_per_step`` and the collective ledger to these numbers:

- values travel in the gradient's dtype (``value_bits``, 32 for float32), indices as int32;
- bit fields (signs, ternary codes) are packed into bytes per tensor: 8 ceil(d b / 8) bits for b bits each;
- a tensor's matrix view is n x m = shape[0] x prod(shape[1:]) (low-rank schemes).

Policies (``compressors.policies``): a tensor is compressed iff it is a matrix (ndim >= 2, or any tensor with
``compress_vectors``), it is not empty, and dense/compressed bits > ``min_compression_rate``; everything else
is sent dense. Compression ratio = dense bits / bits sent (PowerSGD paper, Table 3 and Section 5).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

Shape = tuple[int, ...]

# -- helpers -------------------------------------------------------------------------------------------------


def numel(shape: Shape) -> int:
    return math.prod(shape)


def matrix_view(shape: Shape) -> tuple[int, int]:
    """shape[0] x prod(shape[1:]); a scalar is 1 x 1 and a vector d x 1."""
    return (1, 1) if len(shape) == 0 else (shape[0], math.prod(shape[1:]))


def packed_bits(d: int, bits_each: int) -> int:
    """d fields of ``bits_each`` bits packed into whole bytes: 8 ceil(d b / 8)."""
    return 8 * math.ceil(d * bits_each / 8)


def level_int_bits(levels: int) -> int:
    """The smallest signed integer dtype holding -s..s: int8 up to s = 127, then int16, int32, int64."""
    for bits in (8, 16, 32, 64):
        if levels <= 2 ** (bits - 1) - 1:
            return bits
    raise ValueError(f"level_int_bits: levels={levels!r} is invalid; allowed: at most {2 ** 63 - 1}")


def qsgd_code_bits(levels: int) -> int:
    """Bits of one QSGD code: the 2s+1 signed levels -s..s as s + level in the smallest packable field (2 bits
    for s = 1, 4 bits up to s = 7), else the smallest signed integer dtype (``level_int_bits``)."""
    if levels == 1:
        return 2
    if levels <= 7:
        return 4
    return level_int_bits(levels)


def sparsity_k(d: int, ratio: float | None = None, k: int | None = None, owner: str = "sparsifier") -> int:
    """How many coordinates a sparsifier keeps: ``k`` if given (must be <= d), else max(1, round(ratio d))."""
    if k is not None:
        if k > d:
            raise ValueError(f"{owner}: k={k!r} is invalid for a tensor of {d} elements; allowed: an integer in [1, {d}]")
        return k
    if ratio is None:
        raise ValueError(f"{owner}: ratio=None is invalid without k; allowed: a number in (0, 1]")
    return min(d, max(1, round(ratio * d)))


# -- per-tensor closed forms (bits for one tensor of one worker) ---------------------------------------------


def dense_bits(d: int, value_bits: int = 32) -> int:
    return d * value_bits


def cast_bits(d: int, cast_to_bits: int = 16) -> int:
    """fp16 / bf16: every coordinate in 16 bits."""
    return d * cast_to_bits


def topk_bits(d: int, k: int, value_bits: int = 32, index_bits: int = 32) -> int:
    """Top-k: k values and k int32 indices (Stich et al. 2018; Lin et al. 2018 send the same pair)."""
    return k * (value_bits + index_bits)


def randomk_bits(d: int, k: int, value_bits: int = 32) -> int:
    """Random-k and random-block: k values; the coordinates come from the shared seed (no indices sent)."""
    return k * value_bits


def sign_bits(d: int) -> int:
    """signSGD / Signum: one packed bit per coordinate plus one 8-bit vote flag per tensor (0 = abstain, so a
    zero tensor decodes to 0)."""
    return packed_bits(d, 1) + 8


def scaled_sign_bits(d: int, value_bits: int = 32) -> int:
    """EF-signSGD: one packed bit per coordinate plus the scale ||x||_1/d."""
    return packed_bits(d, 1) + value_bits


def qsgd_bits(d: int, levels: int, value_bits: int = 32) -> int:
    """QSGD: a level in -s..s per coordinate (``qsgd_code_bits``: 2 or 4 bits packed into bytes for s <= 7, else
    the smallest int dtype) plus the norm ||x||_2."""
    code = qsgd_code_bits(levels)
    return (packed_bits(d, code) if code < 8 else d * code) + value_bits


def terngrad_bits(d: int, value_bits: int = 32) -> int:
    """TernGrad: a 2-bit code per coordinate (-1, 0, +1) packed four to a byte, plus the scale max|x|."""
    return packed_bits(d, 2) + value_bits


def natural_bits(d: int) -> int:
    """Natural compression: an 8-bit exponent (0 codes zero) plus a packed sign bit per coordinate (the
    paper's 9 bits per float32)."""
    return 8 * d + packed_bits(d, 1)


def svd_bits(n: int, m: int, rank: int, value_bits: int = 32) -> int:
    """Best rank-r: factors U_r S_r (n x r) and V_r (m x r) with r capped at min(n, m)."""
    return min(rank, n, m) * (n + m) * value_bits


def sketch_bits(n: int, m: int, rank: int, value_bits: int = 32) -> int:
    """Gaussian sketch: only M Omega (n x r); Omega comes from the shared seed."""
    return n * rank * value_bits


def atomo_bits(n: int, m: int, budget: int, value_bits: int = 32) -> int:
    """Spectral ATOMO: exactly s sampled triplets (systematic sampling), each a scaled u (n) and a v (m)."""
    return min(budget, n, m) * (n + m) * value_bits


def powersgd_bits(n: int, m: int, rank: int, value_bits: int = 32, num_iters_per_step: int = 1,
                  variant: str = "paper") -> float:
    """PowerSGD (Vogels et al. 2019, Algorithm 1): T r (n + m) values per matrix per step, r capped at
    min(n, m); the "alternating" variant sends one factor per iteration, T r (n + m) / 2 on average."""
    bits = num_iters_per_step * min(rank, n, m) * (n + m) * value_bits
    return bits if variant == "paper" else bits / 2


# -- whole models --------------------------------------------------------------------------------------------


def total_bits(shapes: Mapping[str, Shape], per_tensor: Callable[[Shape, int], float], value_bits: int = 32,
               min_compression_rate: float = 0.0, compress_vectors: bool = False) -> float:
    """Bits per step of a model under the partition policy: compressed tensors cost
    ``per_tensor(shape, value_bits)``, the others (vectors, empty tensors, tensors compressing by at most
    ``min_compression_rate``) go dense. The policy decides on float32 bits, as
    ``compressors.policies.compression_rule`` does."""
    total = 0.0
    for shape in shapes.values():
        shape = tuple(shape)
        d = numel(shape)
        compressed = (len(shape) >= 2 or compress_vectors) and d > 0
        if compressed:
            sent = per_tensor(shape, 32)
            compressed = sent == 0 or dense_bits(d, 32) / sent > min_compression_rate
        total += per_tensor(shape, value_bits) if compressed else dense_bits(d, value_bits)
    return total


def compression_ratio(shapes: Mapping[str, Shape], bits: float, value_bits: int = 32) -> float:
    """Dense bits / bits sent (the paper's "compression" column)."""
    dense = sum(dense_bits(numel(tuple(s)), value_bits) for s in shapes.values())
    return dense / bits if bits else math.inf


#: Each scheme's defaults for the options that change its bits (mirroring ``compressors.make``'s defaults).
SCHEME_DEFAULTS: dict[str, dict] = {
    "identity": {"min_compression_rate": 0.0, "compress_vectors": True},
    "dense": {"min_compression_rate": 0.0, "compress_vectors": True},
    "powersgd": {"rank": 1, "num_iters_per_step": 1, "variant": "paper", "min_compression_rate": 2.0},
    "fp16": {}, "bf16": {},
    "topk": {"ratio": None, "k": None},
    "randomk": {"ratio": None, "k": None},
    "random_block": {"ratio": None, "k": None},
    "sign": {}, "scaled_sign": {}, "signum": {},
    "qsgd": {"levels": 16},
    "terngrad": {}, "natural": {},
    "svd": {"rank": 1}, "lowrank_sketch": {"rank": 1}, "atomo": {"rank": 1},
}
#: Defaults every zoo scheme shares (identity and powersgd override the rate above).
POLICY_DEFAULTS = {"min_compression_rate": 1.0, "compress_vectors": False}
#: Options that do not change the bits (accepted and ignored by ``scheme_bits``).
NEUTRAL_OPTIONS = {"error_feedback", "seed", "warm_start", "orthogonalization", "epsilon", "scaled", "momentum",
                   "start_compressing_after_num_steps"}
DEFAULT_SPARSITY_RATIO = 0.01


def scheme_per_tensor(scheme: str, **options) -> Callable[[Shape, int], float]:
    """The per-tensor bits of ``scheme`` with ``options`` as a function of (shape, value_bits)."""
    o = options
    ratio = DEFAULT_SPARSITY_RATIO if o.get("ratio") is None and o.get("k") is None else o.get("ratio")

    def sparse_k(shape: Shape) -> int:
        return sparsity_k(numel(shape), ratio, o.get("k"), owner=scheme)

    table: dict[str, Callable[[Shape, int], float]] = {
        "identity": lambda s, v: dense_bits(numel(s), v),
        "dense": lambda s, v: dense_bits(numel(s), v),
        "powersgd": lambda s, v: powersgd_bits(*matrix_view(s), o["rank"], v, o["num_iters_per_step"], o["variant"]),
        "fp16": lambda s, v: cast_bits(numel(s), 16),
        "bf16": lambda s, v: cast_bits(numel(s), 16),
        "topk": lambda s, v: topk_bits(numel(s), sparse_k(s), v),
        "randomk": lambda s, v: randomk_bits(numel(s), sparse_k(s), v),
        "random_block": lambda s, v: randomk_bits(numel(s), sparse_k(s), v),
        "sign": lambda s, v: sign_bits(numel(s)),
        "signum": lambda s, v: sign_bits(numel(s)),
        "scaled_sign": lambda s, v: scaled_sign_bits(numel(s), v),
        "qsgd": lambda s, v: qsgd_bits(numel(s), o["levels"], v),
        "terngrad": lambda s, v: terngrad_bits(numel(s), v),
        "natural": lambda s, v: natural_bits(numel(s)),
        "svd": lambda s, v: svd_bits(*matrix_view(s), o["rank"], v),
        "lowrank_sketch": lambda s, v: sketch_bits(*matrix_view(s), o["rank"], v),
        "atomo": lambda s, v: atomo_bits(*matrix_view(s), o["rank"], v),
    }
    return table[scheme]


def scheme_bits(scheme: str, shapes: Mapping[str, Shape], value_bits: int = 32, **options) -> float:
    """Bits one worker sends per step with ``compressors.make(scheme, **options)`` on these shapes (after any
    warm-up), from the closed forms above and the partition policy."""
    if scheme not in SCHEME_DEFAULTS:
        raise ValueError(f"scheme_bits: scheme={scheme!r} is invalid; allowed: {', '.join(sorted(SCHEME_DEFAULTS))}")
    allowed = set(SCHEME_DEFAULTS[scheme]) | set(POLICY_DEFAULTS) | NEUTRAL_OPTIONS
    for name in options:
        if name not in allowed:
            raise ValueError(f"scheme_bits: option {name!r} is invalid for {scheme!r}; allowed: {', '.join(sorted(allowed))}")
    o = {**POLICY_DEFAULTS, **SCHEME_DEFAULTS[scheme], **options}
    per = scheme_per_tensor(scheme, **{k: v for k, v in o.items() if k not in POLICY_DEFAULTS})
    return total_bits(shapes, per, value_bits, o["min_compression_rate"], o["compress_vectors"])


def scheme_ratio(scheme: str, shapes: Mapping[str, Shape], value_bits: int = 32, **options) -> float:
    """Compression ratio of ``scheme`` on these shapes: dense bits / ``scheme_bits``."""
    return compression_ratio(shapes, scheme_bits(scheme, shapes, value_bits, **options), value_bits)


def steps_per_epoch(dataset_size: int, workers: int, batch_per_worker: int, drop_last: bool = True) -> int:
    """Optimizer steps in one pass over the data with a global batch of workers x batch_per_worker."""
    global_batch = workers * batch_per_worker
    return dataset_size // global_batch if drop_last else math.ceil(dataset_size / global_batch)


def epoch_megabytes(bits_per_step: float, dataset_size: int, workers: int, batch_per_worker: int,
                    drop_last: bool = True, megabyte: int = 2 ** 20) -> float:
    """Data one worker sends per epoch, in MB of ``megabyte`` bytes (2^20 by default: the PowerSGD paper's
    1023 MB for dense SGD on ResNet-18 is 24 steps x 44,695,848 bytes / 2^20)."""
    return steps_per_epoch(dataset_size, workers, batch_per_worker, drop_last) * bits_per_step / 8 / megabyte
