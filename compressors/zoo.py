"""Registry entries of the compressor zoo (identity and PowerSGD register in ``zoo_core``).

Every factory builds ``compose(kernel, ...)`` = Warmup(Partition(ErrorFeedback(kernel))), so every
compressor takes the same policy options:

- ``error_feedback``: "none" | "local" | "averaged" | "ef21" | "local_scaled" (local around C / (1 + omega) for an
  unbiased C: see ``error_feedback.py``). Defaults follow each method's paper: "local"
  for the biased/contractive ones that were proposed with memory (topk, randomk, random_block, scaled_sign,
  svd), "none" for the unbiased ones (qsgd, terngrad, natural, lowrank_sketch, atomo), for the near-exact
  casts (fp16, bf16) and for the majority-vote ones (sign, signum).
- ``min_compression_rate`` (default 1.0: a tensor is compressed only if that sends fewer bits than dense
  float32), ``compress_vectors`` (default False: biases and norms go dense, as in the PowerSGD paper),
  ``start_compressing_after_num_steps`` (default 0).

Sparsifiers take ``ratio`` (in (0, 1]) or ``k`` (an integer <= every compressed tensor's size), not both;
neither means ratio = 0.01. Random compressors take ``seed`` (default: the seed given to ``init``).
"""
from __future__ import annotations

from theory.bits import DEFAULT_SPARSITY_RATIO
from .base import Aggregator
from .cast import Cast
from .lowrank_baselines import Atomo, LowRankSketch, SVD
from .options import MAX_SEED, check_bool, check_float, check_int, invalid
from .policies import compose
from .quantize import Natural, QSGD, TernGrad
from .registry import register
from .signs import ScaledSign, Sign, Signum
from .sparsify import RandomBlock, RandomK, TopK
from .zoo_core import check_policies



def _policies(owner, kernel, error_feedback, min_compression_rate, compress_vectors,
              start_compressing_after_num_steps) -> Aggregator:
    check_policies(owner, error_feedback, min_compression_rate, start_compressing_after_num_steps)
    check_bool(owner, "compress_vectors", compress_vectors)
    return compose(kernel, error_feedback=error_feedback, min_compression_rate=min_compression_rate,
                   compress_vectors=compress_vectors,
                   start_compressing_after_num_steps=start_compressing_after_num_steps)


def _sparsity(owner: str, ratio, k):
    if ratio is not None and k is not None:
        raise invalid(owner, "ratio", ratio, f"ratio or k, not both (k={k!r} was given too)")
    if k is not None:
        return None, check_int(owner, "k", k, minimum=1)
    if ratio is None:
        return DEFAULT_SPARSITY_RATIO, None
    return check_float(owner, "ratio", ratio, minimum=0.0, maximum=1.0, min_inclusive=False), None


def _seed(owner: str, seed):
    return None if seed is None else check_int(owner, "seed", seed, minimum=0, maximum=MAX_SEED)


def _rank(owner: str, rank):
    return check_int(owner, "rank", rank, minimum=1)


def _make_cast(name):
    def factory(*, error_feedback: str = "none", min_compression_rate: float = 1.0, compress_vectors: bool = False,
                start_compressing_after_num_steps: int = 0) -> Aggregator:
        return _policies(name, Cast(name), error_feedback, min_compression_rate, compress_vectors,
                         start_compressing_after_num_steps)
    factory.__name__ = f"make_{name}"
    factory.__doc__ = f"Cast to {name} and all-reduce (deterministic delta = 1 - u^2). Default: no error feedback."
    return factory


register("fp16")(_make_cast("fp16"))
register("bf16")(_make_cast("bf16"))


@register("topk")
def make_topk(*, ratio: float | None = None, k: int | None = None, error_feedback: str = "local",
              min_compression_rate: float = 1.0, compress_vectors: bool = False,
              start_compressing_after_num_steps: int = 0) -> Aggregator:
    """Top-k magnitudes, values + int32 indices all-gathered. Default: local error feedback (Stich et al. 2018)."""
    ratio, k = _sparsity("topk", ratio, k)
    return _policies("topk", TopK(ratio, k), error_feedback, min_compression_rate, compress_vectors,
                     start_compressing_after_num_steps)


def _make_random_sparsifier(name, cls):
    def factory(*, ratio: float | None = None, k: int | None = None, scaled: bool = False,
                error_feedback: str = "local", min_compression_rate: float = 1.0, compress_vectors: bool = False,
                start_compressing_after_num_steps: int = 0, seed: int | None = None) -> Aggregator:
        r, kk = _sparsity(name, ratio, k)
        check_bool(name, "scaled", scaled)
        return _policies(name, cls(r, kk, scaled, _seed(name, seed)), error_feedback, min_compression_rate,
                         compress_vectors, start_compressing_after_num_steps)
    factory.__name__ = f"make_{name}"
    factory.__doc__ = (f"{name}: shared-seed coordinates, all-reduced; scaled=True is unbiased (d/k). "
                       "Default: unscaled with local error feedback (Stich et al. 2018).")
    return factory


register("randomk")(_make_random_sparsifier("randomk", RandomK))
register("random_block")(_make_random_sparsifier("random_block", RandomBlock))


@register("sign")
def make_sign(*, error_feedback: str = "none", min_compression_rate: float = 1.0, compress_vectors: bool = False,
              start_compressing_after_num_steps: int = 0) -> Aggregator:
    """signSGD with majority vote (Bernstein et al. 2018). Default: no error feedback."""
    return _policies("sign", Sign(), error_feedback, min_compression_rate, compress_vectors,
                     start_compressing_after_num_steps)


@register("scaled_sign")
def make_scaled_sign(*, error_feedback: str = "local", min_compression_rate: float = 1.0,
                     compress_vectors: bool = False, start_compressing_after_num_steps: int = 0) -> Aggregator:
    """||x||_1/d sign(x), mean of the workers' messages (EF-signSGD). Default: local error feedback."""
    return _policies("scaled_sign", ScaledSign(), error_feedback, min_compression_rate, compress_vectors,
                     start_compressing_after_num_steps)


@register("signum")
def make_signum(*, momentum: float = 0.9, error_feedback: str = "none", min_compression_rate: float = 1.0,
                compress_vectors: bool = False, start_compressing_after_num_steps: int = 0) -> Aggregator:
    """Sign of a local momentum, majority vote (Bernstein et al. 2018). Default: no error feedback."""
    beta = check_float("signum", "momentum", momentum, minimum=0.0, maximum=1.0, max_inclusive=False)
    return _policies("signum", Signum(beta), error_feedback, min_compression_rate, compress_vectors,
                     start_compressing_after_num_steps)


@register("qsgd")
def make_qsgd(*, levels: int = 16, error_feedback: str = "none", min_compression_rate: float = 1.0,
              compress_vectors: bool = False, start_compressing_after_num_steps: int = 0,
              seed: int | None = None) -> Aggregator:
    """QSGD with ``levels`` levels (Alistarh et al. 2017), private rounding. Default: no error feedback."""
    levels = check_int("qsgd", "levels", levels, minimum=1, maximum=2 ** 31 - 1)
    return _policies("qsgd", QSGD(levels, _seed("qsgd", seed)), error_feedback, min_compression_rate,
                     compress_vectors, start_compressing_after_num_steps)


@register("terngrad")
def make_terngrad(*, error_feedback: str = "none", min_compression_rate: float = 1.0, compress_vectors: bool = False,
                  start_compressing_after_num_steps: int = 0, seed: int | None = None) -> Aggregator:
    """TernGrad (Wen et al. 2017), private rounding, 2-bit codes. Default: no error feedback."""
    return _policies("terngrad", TernGrad(_seed("terngrad", seed)), error_feedback, min_compression_rate,
                     compress_vectors, start_compressing_after_num_steps)


@register("natural")
def make_natural(*, error_feedback: str = "none", min_compression_rate: float = 1.0, compress_vectors: bool = False,
                 start_compressing_after_num_steps: int = 0, seed: int | None = None) -> Aggregator:
    """Natural compression (Horvath et al. 2019): random rounding to powers of two. Default: no error feedback."""
    return _policies("natural", Natural(_seed("natural", seed)), error_feedback, min_compression_rate,
                     compress_vectors, start_compressing_after_num_steps)


@register("svd")
def make_svd(*, rank: int = 1, error_feedback: str = "local", min_compression_rate: float = 1.0,
             compress_vectors: bool = False, start_compressing_after_num_steps: int = 0) -> Aggregator:
    """Best rank-r per worker (exact SVD), factors all-gathered. Default: local error feedback."""
    return _policies("svd", SVD(_rank("svd", rank)), error_feedback, min_compression_rate, compress_vectors,
                     start_compressing_after_num_steps)


@register("lowrank_sketch")
def make_lowrank_sketch(*, rank: int = 1, error_feedback: str = "none", min_compression_rate: float = 1.0,
                        compress_vectors: bool = False, start_compressing_after_num_steps: int = 0,
                        seed: int | None = None) -> Aggregator:
    """Unbiased Gaussian sketch M Omega Omega^T / r, shared Omega, all-reduced. Default: no error feedback."""
    return _policies("lowrank_sketch", LowRankSketch(_rank("lowrank_sketch", rank), _seed("lowrank_sketch", seed)),
                     error_feedback, min_compression_rate, compress_vectors, start_compressing_after_num_steps)


@register("atomo")
def make_atomo(*, rank: int = 1, error_feedback: str = "none", min_compression_rate: float = 1.0,
               compress_vectors: bool = False, start_compressing_after_num_steps: int = 0,
               seed: int | None = None) -> Aggregator:
    """Spectral ATOMO with a budget of ``rank`` triplets (Wang et al. 2018). Default: no error feedback."""
    return _policies("atomo", Atomo(_rank("atomo", rank), _seed("atomo", seed)), error_feedback,
                     min_compression_rate, compress_vectors, start_compressing_after_num_steps)
